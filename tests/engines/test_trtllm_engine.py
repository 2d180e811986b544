"""TensorRT-LLM's per-row generation logits, rows of unequal lengths (one stopped at its end token), turned into the
per-step [B, V] tensors every engine hands `finish_result`, and compared with a reference that fed the finished
row pad_id as engines/greedy.py does."""

from __future__ import annotations

import math

import pytest
import torch

from engines.base import GenerationResult, finish_result
from engines.compare import compare_results
from engines.trtllm_engine import generation_steps

V = 6


class Tok:
    def decode(self, ids, skip_special_tokens=True):
        return " ".join(map(str, ids))


def rows(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, V, generator=g, dtype=torch.float16) for n in lengths]


def test_rows_of_unequal_lengths_become_steps():
    logits = rows([3, 1, 2])
    with pytest.raises(RuntimeError):  # what trtllm_engine.py did: torch.stack needs equal lengths
        torch.stack(logits)
    steps = generation_steps(logits, [3, 1, 2])
    assert len(steps) == 3 and all(s.shape == (3, V) and s.dtype == torch.float32 for s in steps)
    for b, x in enumerate(logits):
        for t in range(3):
            if t < x.shape[0]:
                assert torch.equal(steps[t][b], x[t].float())
            else:  # stopped: TensorRT-LLM computed nothing there
                assert torch.isnan(steps[t][b]).all()
    result = finish_result(Tok(), [[1, 2, 0], [0], [4, 0]], torch.ones(3, 5, dtype=torch.long), steps, True, None,
                           None, {})
    assert result.logits.shape == (3, 3, V)


def test_beam_axis_and_mismatched_lengths():
    logits = rows([2, 2])
    beam = generation_steps([x[None] for x in logits], [2, 2])  # [1, T, V], the beam axis of width 1
    assert all(torch.equal(a, b) for a, b in zip(beam, generation_steps(logits, [2, 2]), strict=True))
    with pytest.raises(ValueError, match="for 3 generated tokens"):
        generation_steps(logits, [2, 3])
    with pytest.raises(ValueError, match="no generation logits"):
        generation_steps([logits[0], None], [2, 2])


def result(tokens, logits):
    return GenerationResult(tokens=tokens, text=["" for _ in tokens], prompt_lengths=[5] * len(tokens),
                            logits=logits)


def test_compare_skips_only_what_a_stopped_row_did_not_compute():
    logits = rows([3, 1])
    engine = torch.stack(generation_steps(logits, [3, 1]), dim=1)
    reference = engine.clone()
    reference[1, 1:] = torch.randn(2, V)  # the reference fed the finished row pad_id: logits nobody reads
    tokens = [[1, 2, 3], [9]]
    got = compare_results(result(tokens, engine), result(tokens, reference), atol=1e-4)
    assert got.passed and got.tokens_equal and got.steps_compared == 3 and not math.isnan(got.max_abs_logit_diff)
    live_nan = engine.clone()
    live_nan[0, 1, 2] = float("nan")  # a NaN while row 0 was still generating is a broken engine
    assert not compare_results(result(tokens, live_nan), result(tokens, reference), atol=1e-4).passed
