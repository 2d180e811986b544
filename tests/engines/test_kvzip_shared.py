"""One prefill and one scoring pass for every KVzip budget (methods.kvzip.KVzipScoring): each budget selecting from the
shared scores generates exactly what KVzip at that budget generates on its own (tokens, every step's logits bit for
bit, kept index sets, per-layer budgets), on the reference and on the onnxruntime engine, both tiny models
(Mistral's sliding window), with one and several scoring chunks, for prompts kept whole and compressed."""

from __future__ import annotations

import pytest
import torch

from engines.ort_engine import OrtEngine
from engines.ort_shared import OrtSharedPrefill
from engines.reference import ReferenceEngine
from exporter.checkpoint import load_model
from exporter.onnx.export import build_onnx_engine
from methods import make_policy
from methods.kvzip import KVzipCaptured
from pkv_core.errors import UserInputError
from tests.engines.test_shared_prefill import MODELS, assert_runner_cells, assert_same, prompt

# score_chunk 16 and sinks 2: prompts of 20 tokens score in 2 chunks, of 150 in 10 (later chunks' prompt + postfix)
OPTIONS = {"score_chunk": 16, "sinks": 2, "postfix": 3}
BUDGETS = (12, 32, 100)  # 100: the 20- and 40-token prompts are kept whole, the 150-token one compressed
LENGTHS = (20, 40, 150)


def cells() -> list:
    return [make_policy("kvzip", kv_budget=c, **OPTIONS) for c in BUDGETS]


def test_one_group_per_scoring_setting():
    """The budget is not part of the group; every other option is (they change the scores)."""
    groups = {p.prefill_group for p in cells()}
    assert len(groups) == 1
    for other in ({"sinks": 3}, {"score_chunk": 8}, {"postfix": 2}):
        assert make_policy("kvzip", kv_budget=32, **(OPTIONS | other)).prefill_group not in groups
    assert make_policy("snapkv").prefill_group == "observation" and make_policy("full").prefill_group is None
    assert not make_policy("kvzip").shares_prefill  # it does not share the observation group's prefill


@pytest.mark.parametrize("model", MODELS)
def test_reference_budgets_from_one_scoring_pass(model):
    loaded = load_model(model)
    layers, new = loaded.spec.num_layers, 4
    engine = ReferenceEngine(loaded, make_policy("full"))
    policies = cells()
    prompts = {n: prompt(n) for n in LENGTHS}
    shared = {n: engine.shared_prefill(ids, policies, new) for n, ids in prompts.items()}
    for n in LENGTHS:  # scored only when some budget compresses the prompt
        assert all(isinstance(c, KVzipCaptured) for c in shared[n].state)
        scored = any(p.compresses_prompt(layers, n) for p in policies)
        assert (shared[n].state[0].scores is not None) == scored
    kept = {n: set() for n in LENGTHS}
    for policy in policies:
        alone = ReferenceEngine(loaded, policy)
        for n, ids in prompts.items():
            got = engine.generate_shared(shared[n], policy, new, return_logits=True, return_indices=True)
            assert_same(alone.generate([ids], new, return_logits=True, return_indices=True), got)
            kept[n].add(str([k.tolist() for k in got.kept_indices]))
    assert len(kept[150]) == len(BUDGETS)  # every budget keeps another set: real selections were compared
    # a prompt no budget compresses skips the scoring pass and keeps the caches whole
    whole = policies[-1]
    short = engine.shared_prefill(prompts[40], [whole], new)
    assert short.state[0].scores is None
    got = engine.generate_shared(short, whole, new, return_logits=True, return_indices=True)
    assert_same(ReferenceEngine(loaded, whole).generate([prompts[40]], new, return_logits=True, return_indices=True),
                got)


def test_reference_cell_records_the_scores_it_ranked_by():
    """`inspect` on a shared cell: the same scores the cell's own prefill records (sinks NaN)."""
    loaded = load_model("tiny-llama3")
    policy = cells()[0]
    ids = prompt(150)
    engine = ReferenceEngine(loaded, make_policy("full"))
    shared = engine.shared_prefill(ids, [policy], 4)
    got = engine.generate_shared(shared, policy, 4, return_scores=True)
    alone = ReferenceEngine(loaded, policy).generate([ids], 4, return_scores=True)
    for a, b in zip(alone.scores, got.scores, strict=True):
        assert torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num())


@pytest.fixture(scope="module")
def kvzip_engines(tmp_path_factory):
    """kvzip_engines(model) -> (the shared engine: KVzip at the first budget with the scoring capture, {policy: its
    own engine})."""
    cache: dict = {}

    def get(model: str):
        if model not in cache:
            loaded, policies = load_model(model), cells()
            root = tmp_path_factory.mktemp("kvzip-shared")
            build_onnx_engine(loaded, policies[0].shared_engine_policy(), root / "shared", max_input_len=1024,
                              shared_prefill=policies[0].shared_capture(policies))
            alone = {}
            for p in policies:
                build_onnx_engine(loaded, p, root / f"C{p.kv_budget}", max_input_len=1024)
                alone[p] = OrtEngine(root / f"C{p.kv_budget}")
            cache[model] = (OrtEngine(root / "shared"), alone)
        return cache[model]

    return get


@pytest.mark.parametrize("model", MODELS)
def test_onnx_budgets_from_one_scoring_pass(kvzip_engines, model):
    engine, alone = kvzip_engines(model)
    policies = cells()
    decode = (engine.dir / "decode.onnx").read_bytes()
    assert all((e.dir / "decode.onnx").read_bytes() == decode for e in alone.values())  # one decode for every C
    assert engine.manifest["shared_prefill"] == {"graph": "shared_prefill.onnx", "group": policies[0].prefill_group,
                                                 "scores": []}
    assert_runner_cells(OrtSharedPrefill(engine, policies), alone, LENGTHS)


def test_onnx_capture_refuses_another_group(kvzip_engines):
    engine, _ = kvzip_engines("tiny-llama3")
    for other in (make_policy("kvzip", kv_budget=32, **(OPTIONS | {"sinks": 3})), make_policy("snapkv")):
        with pytest.raises(UserInputError, match="serves the group 'kvzip-s2-c16-p3'"):
            OrtSharedPrefill(engine, [other])
