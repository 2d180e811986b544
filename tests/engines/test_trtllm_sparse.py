"""The TensorRT-LLM sparse-attention hook's output, built on CPU: what the context phase keeps per KV head
equals the op specification with the per-request budget, in RocketKV's layout (sorted positions relative to each
sequence, offsets); and without TensorRT-LLM a checkpoint cannot be run, which says so in one line."""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner

from engines.trtllm_sparse import context_indices
from pkv_cli import main
from trt_plugins.pyramidkv_select import pyramidkv_select

H, HKV, D = 4, 2, 8


def test_context_indices_equal_the_spec_per_sequence():
    g = torch.Generator().manual_seed(0)
    lens = [40, 9, 25]  # the middle one is shorter than the budget: kept whole
    qkv = torch.randn(sum(lens), (H + 2 * HKV) * D, generator=g)
    indices, offsets = context_indices(qkv, lens, H, HKV, D, budget=12, window=4)
    assert indices.dtype == torch.int32 and offsets.tolist() == [0, 12, 21, 33]
    start = 0
    for b, n in enumerate(lens):
        q, k, _ = qkv[start : start + n].split([H * D, HKV * D, HKV * D], dim=-1)
        segment = indices[:, offsets[b] : offsets[b + 1]]
        if n < 12:
            assert segment.tolist() == [list(range(n))] * HKV
        else:
            want, _, _ = pyramidkv_select(q.view(1, n, H, D), k.view(n, HKV, D).transpose(0, 1)[None],
                                          torch.zeros(1, HKV, n, D), torch.tensor([n]), 8, 4)
            assert torch.equal(segment.long(), want[0])
            assert all(row == sorted(row) for row in segment.tolist()), "sorted, as the C++ compaction needs"
        start += n


def test_running_a_checkpoint_without_tensorrt_llm_is_one_line(tmp_path):
    pytest.importorskip("torch")
    try:
        import tensorrt_llm  # noqa: F401
        pytest.skip("TensorRT-LLM is installed here")
    except ImportError:
        pass
    out = tmp_path / "ckpt"
    assert CliRunner().invoke(main, ["build", "--backend", "trtllm", "--out", str(out)]).exit_code == 0
    r = CliRunner().invoke(main, ["generate", "--engine", str(out), "--prompt", "hi"])
    assert r.exit_code == 2 and "tensorrt-llm==1.2" in r.stderr and "Traceback" not in r.stderr
