"""Adding a method, shown end to end on a toy: "random keep", a baseline that keeps a pseudo-random part of every
prompt's prefix (and the window).

The method below is exactly what a module methods/random_keep.py would hold (CONTRIBUTING.md, "Adding a method"):
one dataclass with its options, its budgets (inherited: uniform C - w per layer), its selection in PyTorch (the
reference) and as graph nodes (the ONNX engine), and the backends it runs on. It is registered with one line, and
then `plan`, `generate`, `build` and `compare` run it, their options and `--help` include its own, and the parity
matrix (tests/matrix.py) picks it up: no other file of the product is touched.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from engines.reference import ReferenceEngine
from methods import backends, make_policy
from methods.budgeted import BudgetedPolicy
from methods.options import non_negative, option
from methods.registry import register, unregister
from pkv_cli import main
from tests import matrix
from trt_plugins.onnx_patterns import top_with_window, window_positions
from trt_plugins.pyramidkv_select import (
    gather_kept,
    prefix_lengths,
    row_budgets,
    topk_lowest_index_first,
)

MODULUS = 1_000_003  # a prime above every position: the scores are distinct, and exact in float32
STRIDE = 7919


@dataclass(frozen=True)
class RandomKeepPolicy(BudgetedPolicy):
    """Random keep: each layer keeps a pseudo-random `selected` of every prompt's prefix (the same for all heads),
    plus the window. What any scoring must beat."""

    name: ClassVar[str] = "random_keep"
    runs_on: ClassVar[frozenset[str]] = frozenset({backends.ONNXRUNTIME})
    seed: int = option(0, "seed of the pseudo-random order (the layer is mixed in)", check=non_negative)

    def offset(self, layer: int) -> int:
        return (self.seed * 31 + layer) * 104729

    def select(self, queries, keys, values, lengths, selected, layer=0, shared=None):
        """keys / values [B, Hkv, q, d], lengths [B] -> (kept [B, Hkv, k + w'], K, V), the op layout."""
        b, hkv, q, _ = keys.shape
        lengths, budgets = row_budgets(lengths, selected, self.window, q)
        pos = torch.arange(q)
        scores = ((pos * STRIDE + self.offset(layer)) % MODULUS).float().expand(b, q)  # [B, q]
        scores = scores.masked_fill(pos >= prefix_lengths(lengths, self.window)[:, None], float("-inf"))
        picks = topk_lowest_index_first(scores[:, None].expand(b, hkv, q), budgets)
        return gather_kept(keys, values, picks, lengths, self.window)

    def graph_select(self, lay, layer, queries, k4, v4, lengths, selected, shared):
        """The same scores as graph nodes, then the shared top-k + window + gather (trt_plugins.onnx_patterns)."""
        g = lay.g
        q = g.dim(k4, 2)
        _, prefix, _ = window_positions(g, q, lengths, self.window)
        pos = g.op("Range", g.const(0), g.scalar(q), g.const(1))  # [q]
        scores = g.op("Cast", g.op("Mod", g.op("Add", g.op("Mul", pos, g.const(STRIDE)), g.const(self.offset(layer))),
                                   g.const(MODULUS)), to=1)  # float32 [q]
        in_prefix = g.op("Less", g.unsqueeze(pos, [0]), g.unsqueeze(prefix, [1]))  # [B, q]
        scores = g.op("Where", in_prefix, g.unsqueeze(scores, [0]), g.const(float("-inf"), np.float32))
        scores = g.op("Expand", g.unsqueeze(scores, [1]), g.concat(g.dim(k4, 0), g.const([lay.s.num_kv_heads]), q))
        names = (g.fresh("kept"), g.fresh("keys"), g.fresh("values"))
        return top_with_window(g, scores, selected, k4, v4, lengths, q, lay.s.num_kv_heads, lay.s.head_dim,
                               self.window, names)


@pytest.fixture
def random_keep():
    register(RandomKeepPolicy)  # the one registry line (methods/registry.py: METHOD_MODULES)
    yield RandomKeepPolicy
    unregister(RandomKeepPolicy.name)


def cli(*args: str):
    return CliRunner().invoke(main, list(args))


LONG = "The quick brown fox jumps over the lazy dog while the cat naps in the sun. " * 2


def test_plan_and_the_generated_options(random_keep):
    r = cli("plan", "--policy", "random_keep", "--kv-budget", "32", "--window", "4", "--seed", "3", "--context", "200",
            "--json")
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert d["policy"] == "random_keep" and d["hyperparameters"] == {"kv_budget": 32, "window": 4, "seed": 3}
    assert [row["cached"] for row in d["layers"]] == [32] * len(d["layers"]) and d["regime"] == "uniform"
    assert "--seed" in cli("plan", "--help").stdout and "random_keep: seed of the pseudo-random order" in \
        " ".join(cli("plan", "--help").stdout.split())
    bad = cli("plan", "--policy", "random_keep", "--seed", "-1", "--context", "200")
    assert bad.exit_code == 2 and bad.stderr.strip() == "error: --seed must be a non-negative integer (got -1)"
    foreign = cli("plan", "--policy", "random_keep", "--beta", "3", "--context", "200")
    assert foreign.exit_code == 2 and "policy 'random_keep' has no option --beta" in foreign.stderr
    refused = cli("build", "--policy", "random_keep", "--target", "tensorrt", "--out", "never-written")
    assert refused.exit_code == 2 and "cannot run on --backend onnx --target tensorrt" in refused.stderr


def test_reference_keeps_its_picks_and_the_window(random_keep, tiny):
    policy = make_policy("random_keep", kv_budget=32, window=4, seed=1)
    result = ReferenceEngine(tiny, policy).generate([LONG, "Hi"], 4, return_indices=True)
    n = result.prompt_lengths[0]
    for layer, kept in enumerate(result.kept_indices):
        held = [int(x) for x in kept[0, 0] if x >= 0]
        assert len(held) == 32 and held[-4:] == list(range(n - 4, n)) and held == sorted(held)
        order = sorted(range(n - 4), key=lambda p: (-((p * STRIDE + policy.offset(layer)) % MODULUS), p))
        assert held[:-4] == sorted(order[:28])  # the 28 best pseudo-random scores of the prefix
        assert all(torch.equal(kept[0, 0], head) for head in kept[0])  # every head alike
        short = result.prompt_lengths[1]  # shorter than the budget: kept whole
        assert [int(x) for x in kept[1, 0] if x >= 0] == list(range(short))


def test_onnx_engine_equals_the_reference_through_build_and_compare(random_keep, tmp_path):
    out = tmp_path / "engine"
    r = cli("build", "--model", "tiny-mistral", "--policy", "random_keep", *matrix.flags("random_keep", seed=5),
            "--max-input-len", "256", "--out", str(out))
    assert r.exit_code == 0, r.output
    r = cli("compare", "--engine", str(out), "--prompt-len", "120", "--batch", "2", "--max-new-tokens", "6", "--json")
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert d["passed"] and d["tokens_equal"] and d["index_agreement"] == 1.0 and d["max_abs_logit_diff"] <= 1e-4


def test_the_parity_matrix_picks_it_up(random_keep, built_engine):
    """Registered, the method is one more case of tests/matrix.py on the targets it lists: the same check as
    tests/engines/test_ort_engine.py's parity test, here for the toy."""
    assert ("random_keep", {}) in matrix.cases() and matrix.targets("random_keep") == ["onnxruntime"]
    engine, reference = built_engine("tiny-llama3", "random_keep")
    prompts = [LONG, "Short prompt, left padded.", LONG[:100] + " and then?"]
    got = engine.generate(prompts, 8, return_logits=True, return_indices=True)
    want = reference.generate(prompts, 8, return_logits=True, return_indices=True)
    assert got.tokens == want.tokens and got.selected == want.selected
    assert all(torch.equal(a.sort(-1).values, b.sort(-1).values)
               for a, b in zip(got.kept_indices, want.kept_indices, strict=True))
    assert (got.logits - want.logits).abs().max().item() <= 1e-4
