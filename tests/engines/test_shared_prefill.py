"""One prefill serving many selections (methods.shared_prefill): each (method, budget) selecting from a shared
prefill generates exactly what it generates on its own (tokens, every step's logits bit for bit, kept index sets,
per-layer budgets), on the reference and on the onnxruntime engine, both tiny models (Mistral's sliding window),
in every budget regime: prompt shorter than the budget (kept whole), PyramidKV's uniform band, the pyramid."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from engines.ort_engine import OrtEngine
from engines.ort_shared import OrtSharedPrefill
from engines.reference import ReferenceEngine
from exporter.checkpoint import load_model
from exporter.onnx.export import build_onnx_engine
from methods import POLICIES, make_policy, options_for
from methods.shared_prefill import score_kinds
from pkv_core.errors import UserInputError
from tests import matrix

# Every registered method that shares a sweep's prefill (with its defaults), from the registry as tests/matrix.py
SHARED = [name for name, cls in POLICIES.items() if cls().shares_prefill]
MODELS = ["tiny-llama3", "tiny-mistral"]  # tiny-mistral's window (48) is shorter than the longer prompts


def prompt(n: int, seed: int = 0) -> list[int]:
    g = torch.Generator().manual_seed(seed + n)
    return torch.randint(3, 250, (n,), generator=g).tolist()


def assert_same(alone, shared) -> None:
    assert shared.tokens == alone.tokens
    assert torch.equal(shared.logits, alone.logits)  # bit for bit, every step
    assert shared.selected == alone.selected
    assert len(shared.kept_indices) == len(alone.kept_indices)
    for a, b in zip(alone.kept_indices, shared.kept_indices, strict=True):
        assert torch.equal(a, b)


def regimes(policy, layers: int, lengths: list[int]) -> set[str]:
    return {policy.regime(policy.layer_selected(layers, n)) for n in lengths}


@pytest.mark.parametrize("model", MODELS)
def test_reference_cells_from_one_prefill(model):
    """15 cells (5 methods x C = 24, 48, 100, w = 4) on prompts of 30, 70 and 150 tokens: PyramidKV is uniform at
    (24, 30), (48, 70), (100, 150), a pyramid at (24, 70+), (48, 150), and keeps everything at (48, 30), (100, <150)."""
    loaded = load_model(model)
    layers, lengths, new = loaded.spec.num_layers, [30, 70, 150], 4
    cells = [make_policy(n, **options_for(n, {"kv_budget": c, "window": 4, "chunk_size": 4}))
             for n in SHARED for c in (24, 48, 100)]
    pyramid = [p for p in cells if p.name == "pyramidkv"]
    assert set.union(*(regimes(p, layers, lengths) for p in pyramid)) == {
        "no-compression (context too short)", "uniform", "pyramid"}
    engine = ReferenceEngine(loaded, make_policy("full"))
    prompts = {n: prompt(n) for n in lengths}
    shared = {n: engine.shared_prefill(ids, cells, new) for n, ids in prompts.items()}
    for n in lengths:  # scores only of the kinds some cell compressing the prompt ranks by (none: StreamingLLM)
        assert set(shared[n].state[0].scores) == set(score_kinds([p for p in cells if p.compresses_prompt(layers, n)]))
    kept = {n: set() for n in lengths}
    for policy in cells:
        alone = ReferenceEngine(loaded, policy)
        for n, ids in prompts.items():
            got = engine.generate_shared(shared[n], policy, new, return_logits=True, return_indices=True)
            assert_same(alone.generate([ids], new, return_logits=True, return_indices=True), got)
            if policy.compresses_prompt(layers, n):
                kept[n].add(str([k.tolist() for k in got.kept_indices]))
    # the cells differ: the checks above compare real selections, not one cache every cell shares
    assert all(len(kept[n]) > 1 for n in (70, 150))


@pytest.fixture(scope="module")
def capture_engine(tmp_path_factory):
    """capture_engine(model) -> the FullKV engine with the shared-prefill graph for the matrix's cells (one per
    method at C = 32, w = 4: tests/matrix.py, the settings of the `built_engine` parity engines)."""
    cache: dict = {}

    def get(model: str) -> OrtEngine:
        if model not in cache:
            out = tmp_path_factory.mktemp("shared") / model
            build_onnx_engine(load_model(model), make_policy("full"), out, max_input_len=1024,
                              shared_prefill=matrix_policies()[0].shared_capture(matrix_policies()))
            cache[model] = OrtEngine(out)
        return cache[model]

    return get


def matrix_policies() -> list:
    return [make_policy(n, **matrix.small(n, **matrix.DEFAULTS.get(n, {}))) for n in SHARED]


@pytest.mark.parametrize("model", MODELS)
def test_onnx_cells_from_one_prefill(built_engine, capture_engine, model):
    """Each method's own engine and its selection graph on the shared capture: the same generation, bit for bit,
    for prompts of 20 (kept whole), 40 (PyramidKV uniform: 32 <= 40 < 56) and 150 tokens (pyramid)."""
    engine = capture_engine(model)
    policies = matrix_policies()
    runner = OrtSharedPrefill(engine, policies)
    decode = (engine.dir / "decode.onnx").read_bytes()
    cells = {}
    for policy in policies:
        cells[policy], _ = built_engine(model, policy.name)
        assert cells[policy].policy == policy
        assert (cells[policy].dir / "decode.onnx").read_bytes() == decode  # FullKV's decode graph serves them all
    layers = engine.spec.num_layers
    pyramid = next(p for p in policies if p.name == "pyramidkv")
    assert regimes(pyramid, layers, [20, 40, 150]) == {"no-compression (context too short)", "uniform", "pyramid"}
    assert_runner_cells(runner, cells, (20, 40, 150))


def assert_runner_cells(runner, engines: dict, lengths) -> None:
    """Every cell of `engines` ({policy: its own engine}) selecting from `runner`'s shared prefill of prompts of
    `lengths` tokens generates what its own engine generates (8 new tokens)."""
    for n in lengths:
        ids = prompt(n, seed=1)
        shared = runner.shared_prefill(ids, list(engines), 8)
        for policy, own in engines.items():
            alone = own.generate([ids], 8, return_logits=True, return_indices=True)
            assert_same(alone, runner.generate_shared(shared, policy, 8, return_logits=True, return_indices=True))


def test_onnx_capture_refuses_scores_it_lacks(capture_engine):
    other = make_policy("snapkv", kv_budget=32, window=8)  # the engine scores the last 4 queries, not 8
    with pytest.raises(UserInputError, match="does not compute the scores window8"):
        OrtSharedPrefill(capture_engine("tiny-llama3"), [other])


def test_manifest_records_the_capture(capture_engine):
    manifest = capture_engine("tiny-llama3").manifest
    assert manifest["shared_prefill"] == {"graph": "shared_prefill.onnx", "group": "observation",
                                          "scores": [["all", 0], ["window", 4]]}
    assert "shared_prefill.onnx" in manifest["onnx"]["graphs"] and Path(manifest["onnx"]["weights"]).name


@pytest.mark.parametrize("name,kw", [("pyramidkv", {"granularity": "query-head"}), ("kvzip", {}),
                                     ("pyramidinfer", {}), ("full", {})])
def test_who_shares_the_prefill(name, kw):
    """Query-head caches decode through another graph than FullKV's; KVzip and PyramidInfer select elsewhere."""
    assert not make_policy(name, **kw).shares_prefill
    assert {"streamingllm", "h2o", "snapkv", "pyramidkv", "chunkkv"} <= set(SHARED)
