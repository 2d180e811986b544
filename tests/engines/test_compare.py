"""The comparison exists to catch disagreement: every failing path reports FAIL (exit 1), never crashes."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from engines.base import GenerationResult
from engines.compare import compare_results, first_divergence, jaccard
from exporter.checkpoint import LoadedModel, load_model
from exporter.weights import RandomWeights
from pkv_cli import main
from tests.conftest import write_checkpoint


def result(tokens, logits, kept=None):
    return GenerationResult(tokens=tokens, text=["" for _ in tokens], prompt_lengths=[5] * len(tokens),
                            logits=logits, kept_indices=kept)


def test_tokens_diverging_in_a_batch_with_different_lengths():
    v = 7
    a = torch.zeros(2, 4, v)
    b = torch.zeros(2, 2, v)  # the reference stopped early (EOS) for every row
    b[1, 1, 3] = 5.0
    got = compare_results(result([[1, 2, 3, 4], [1, 2, 3, 4]], a), result([[1, 2], [1, 9]], b), atol=1e-4)
    assert not got.passed and not got.tokens_equal and got.first_divergence == 1
    assert got.steps_compared == 2 and got.max_abs_logit_diff == pytest.approx(5.0)


def test_logits_beyond_tolerance_and_index_sets_that_differ():
    logits = torch.randn(3, 2, 5)
    kept_a = [torch.tensor([[[0, 1, 2]], [[0, 1, 2]], [[0, 1, 2]]])]
    kept_b = [torch.tensor([[[0, 1, 3]], [[0, 1, 2]], [[0, 1, 2]]])]
    same = compare_results(result([[1, 2]] * 3, logits, kept_a), result([[1, 2]] * 3, logits.clone(), kept_a))
    assert same.passed and same.index_agreement == 1.0
    shifted = compare_results(result([[1, 2]] * 3, logits + 1e-3, kept_a), result([[1, 2]] * 3, logits, kept_a))
    assert not shifted.passed and not shifted.logits_within_tolerance
    other = compare_results(result([[1, 2]] * 3, logits, kept_a), result([[1, 2]] * 3, logits, kept_b))
    assert not other.passed and other.index_agreement == pytest.approx((0.5 + 1 + 1) / 3)


def test_nan_logits_fail_even_where_both_sides_are_nan():
    """Issue 31 case 2: a NaN difference is a failure, never a pass (checked here, not left to Polygraphy)."""
    nan = torch.full((1, 2, 5), float("nan"))
    for got, want in ((nan, nan.clone()), (nan, torch.zeros(1, 2, 5)), (torch.zeros(1, 2, 5), nan)):
        c = compare_results(result([[0, 0]], got), result([[0, 0]], want), atol=1e30)
        assert not c.passed and not c.logits_within_tolerance and c.logits_within_tolerance is False


def test_first_divergence_and_jaccard_edges():
    assert first_divergence([[1, 2], [3]], [[1, 2], [3, 4]]) == 1
    assert first_divergence([[1]], [[1]]) is None
    assert jaccard(torch.tensor([[-1, -1]]), torch.tensor([[-1, -1]])) == 1.0
    with pytest.raises(ValueError):
        jaccard(torch.zeros(2, 3), torch.zeros(3, 3))


@pytest.mark.parametrize("batch", ["1", "2", "3"])
def test_cli_compare_against_other_weights_fails_cleanly(tmp_path_factory, batch):
    """The same architecture with other weights (another model is refused before anything runs: issue 31)."""
    engine = tmp_path_factory.getbasetemp() / "cmp-engine"
    other = tmp_path_factory.getbasetemp() / "cmp-other-weights"
    if not engine.exists():
        r = CliRunner().invoke(main, ["build", "--model", "tiny-llama3", "--kv-budget", "32", "--window", "4",
                                      "--max-input-len", "512", "--out", str(engine)])
        assert r.exit_code == 0, r.output
        spec = load_model("tiny-llama3").spec
        write_checkpoint(LoadedModel(spec, "seed 1", RandomWeights(spec, seed=1), None, True), other)
    for json_flag in ([], ["--json"]):
        r = CliRunner().invoke(main, ["compare", "--engine", str(engine), "--model", str(other), "--prompt-len",
                                      "300", "--batch", batch, "--max-new-tokens", "8", *json_flag])
        assert r.exit_code == 1, r.output
        assert "Traceback" not in r.stderr and r.stderr.strip().splitlines() == [
            "error: engine and reference disagree beyond tolerance"]
        if json_flag:
            d = json.loads(r.stdout)
            assert not d["passed"] and not d["tokens_equal"]
        else:
            assert "-> FAIL" in r.stdout
