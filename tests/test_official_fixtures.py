"""Every method against its authors' code: the kept sets of the op specs, the PyTorch reference and the ONNX
engine equal the golden fixtures `scripts/make_official_fixtures.py` wrote from the official implementations
(KVCache-Factory's SnapKV / PyramidKV / H2O, kvpress's ChunkKV, KVzip's own scoring, PyramidInfer's own model) on the
tiny presets. The fixtures are data: no official code runs here.

Conventions that differ, and how the fixtures were made to line up (the script's docstring has the details):
* budgets: the project's C is a cache length; kvpress and KVzip take a ratio, set so that they keep as many;
* KVzip: the first `sinks` prompt tokens play its system prompt (no chat template, an empty postfix); the
  project counts them in C, the official code keeps them on top of its ratio;
* ChunkKV: the window's chunks are always kept here; kvpress ranks them first by a score (+1 over the max);
* PyramidInfer: the official model is LLaMA's, so tiny-mistral runs here without its sliding window; the
  generation fixture cuts nothing in the prefill (decay 1.0), holds R fixed (a recent ratio whose
  int(ratio * tokens) stays 4) and ends before any layer's second compression: the official code recomputes R
  from the tokens seen at every step, and its trigger compares the tokens seen in total (DynamicCache.seen_tokens)
  with each layer's own length, so a layer whose prefill or last compression cut tokens compresses earlier and
  then every few steps there, where the project compresses every layer every `update_interval` tokens.
Ties are not an issue on these inputs (random weights, float32): the comparisons are exact.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from engines.hf_model import capture_prefill
from engines.ort_engine import OrtEngine
from engines.reference import ReferenceEngine
from exporter.checkpoint import LoadedModel, load_model
from exporter.onnx.export import build_onnx_engine
from methods import make_policy

FIXTURES = Path(__file__).parent / "fixtures" / "official"
CASES = sorted(p.stem for p in FIXTURES.glob("*.npz"))
# methods whose selection is one op per layer on the prefill's q/k/v
PER_LAYER = ("snapkv", "pyramidkv", "h2o", "chunkkv")


def load(case: str) -> dict:
    with np.load(FIXTURES / f"{case}.npz", allow_pickle=False) as f:
        data = {k: f[k] for k in f.files}
    n = int(data["positions"])
    out = {"ids": data["input_ids"].tolist(), "meta": json.loads(str(data["meta"])),
           "kept": np.unpackbits(data["kept"], axis=-1, count=n).astype(bool)}
    if "after" in data:
        out["after"] = np.unpackbits(data["after"], axis=-1, count=int(data["after_positions"])).astype(bool)
        out["tokens"] = data["tokens"].tolist()
    if "official_scores" in data:
        out["scores"] = data["official_scores"]
    return out


def cases(*methods: str) -> list[str]:
    return [c for c in CASES if load(c)["meta"]["method"] in methods]


def policy_of(meta: dict):
    opts = {k: v for k, v in meta["policy"].items() if k != "name"}
    return make_policy(meta["policy"]["name"], **opts)


def model_of(meta: dict) -> LoadedModel:
    loaded = load_model(meta["model"])
    if meta["method"] == "pyramidinfer":  # the official model has no sliding window
        loaded = dataclasses.replace(loaded, spec=dataclasses.replace(loaded.spec, sliding_window=None))
    return loaded


def as_mask(kept: list[torch.Tensor], n: int) -> np.ndarray:
    """Per layer [1, Hc, k] positions (-1 unused) -> [L, Hc, n] bool."""
    mask = np.zeros((len(kept), kept[0].shape[1], n), dtype=bool)
    for layer, idx in enumerate(kept):
        for head, row in enumerate(idx[0].tolist()):
            mask[layer, head, [p for p in row if p >= 0]] = True
    return mask


def assert_same(got: np.ndarray, want: np.ndarray, what: str, scores: np.ndarray | None = None) -> None:
    """Equal kept sets per layer and head. With `scores` [L, Hc, n] (the selection's own, after pooling), sets of
    the same size may differ by positions that tie at the cut: max pooling copies a peak to its neighbours, and
    torch.topk (the official codes) breaks such ties arbitrarily where the project takes the lower position."""
    for layer in range(want.shape[0]):
        for head in range(want.shape[1]):
            a, b = set(np.flatnonzero(got[layer, head])), set(np.flatnonzero(want[layer, head]))
            if a != b and scores is not None and len(a) == len(b):
                tied = {float(scores[layer, head, p]) for p in a ^ b}
                kept = [float(scores[layer, head, p]) for p in a & b if np.isfinite(scores[layer, head, p])]
                if len(tied) == 1 and min(kept) >= tied.pop():
                    continue
            assert a == b, (f"{what}: layer {layer} head {head}: Jaccard {len(a & b) / len(a | b):.3f}, "
                            f"only here {sorted(a - b)[:10]}, only official {sorted(b - a)[:10]}")


def snapkv_scores(policy, records, q: int) -> np.ndarray:
    """SnapKV's pooled scores per layer and KV head, -inf outside the prefix: [L, Hkv, q] (the op spec's steps)."""
    from trt_plugins.pyramidkv_select import observation_positions, observation_scores, pool_scores

    lengths = torch.tensor([q])
    out = []
    for r in records:
        hkv = r["key"].shape[1]
        raw = observation_scores(r["query"].transpose(1, 2), r["key"], lengths,
                                 observation_positions(lengths, q, policy.window, "window"))
        raw = raw.view(1, hkv, -1, q).mean(dim=2)
        prefix = torch.arange(q) < q - policy.window
        pooled = pool_scores(raw.masked_fill(~prefix, 0.0), policy.kernel, policy.pooling)
        out.append(pooled.masked_fill(~prefix, float("-inf"))[0])
    return torch.stack(out).numpy()


@pytest.fixture(scope="module")
def captured():
    """The FullKV prefill's attention inputs per model, checked against the fixtures' checksums."""
    store: dict[str, list] = {}

    def get(case: str) -> tuple[dict, list]:
        fx = load(case)
        model = fx["meta"]["model"]
        if model not in store:
            store[model] = capture_prefill(load_model(model), fx["ids"])
        records = store[model]
        sums = [float(r["key"].abs().sum()) for r in records]
        np.testing.assert_allclose(sums, fx["meta"]["key_checksums"], rtol=1e-4,
                                   err_msg="the tiny model's prefill changed: regenerate the fixtures")
        return fx, records

    return get


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    store: dict[str, tuple[OrtEngine, ReferenceEngine]] = {}

    def get(case: str) -> tuple[OrtEngine, ReferenceEngine]:
        if case not in store:
            meta = load(case)["meta"]
            loaded, policy = model_of(meta), policy_of(meta)
            out = tmp_path_factory.mktemp("official") / case
            build_onnx_engine(loaded, policy, out, max_input_len=512)
            store[case] = (OrtEngine(out), ReferenceEngine(loaded, policy))
        return store[case]

    return get


def test_every_method_has_fixtures_on_both_tiny_models():
    have = {(load(c)["meta"]["method"], load(c)["meta"]["model"]) for c in CASES}
    for method in ("snapkv", "pyramidkv", "h2o", "chunkkv", "kvzip", "pyramidinfer"):
        assert {(method, "tiny-llama3"), (method, "tiny-mistral")} <= have, method
    chunks = {load(c)["meta"]["chunks"] for c in cases("kvzip")}
    assert chunks == {1, 3}, "KVzip with one scoring chunk and with several"


@pytest.mark.parametrize("case", cases(*PER_LAYER))
def test_op_spec_equals_official(case, captured):
    fx, records = captured(case)
    policy = policy_of(fx["meta"])
    q = len(fx["ids"])
    budgets = policy.layer_selected(len(records), q)
    kept, shared = [], {}
    for layer, r in enumerate(records):
        idx, _, _ = policy.select(r["query"].transpose(1, 2), r["key"], r["value"], torch.tensor([q]), budgets[layer],
                                  layer, shared)
        kept.append(idx)
    ties = snapkv_scores(policy, records, q) if fx["meta"]["method"] in ("snapkv", "pyramidkv") else None
    assert_same(as_mask(kept, q), fx["kept"], "op spec", ties)


@pytest.mark.parametrize("case", [c for c in CASES if "generation" not in c])
def test_reference_and_onnx_engine_keep_what_the_official_code_keeps(case, engines, captured):
    fx = load(case)
    ort_engine, reference = engines(case)
    n = len(fx["ids"])
    ties = None
    if fx["meta"]["method"] in ("snapkv", "pyramidkv"):
        ties = snapkv_scores(policy_of(fx["meta"]), captured(case)[1], n)
    want = reference.generate([fx["ids"]], 1, return_indices=True)
    assert_same(as_mask(want.kept_indices, n), fx["kept"], "reference", ties)
    got = ort_engine.generate([fx["ids"]], 1, return_indices=True)
    assert_same(as_mask(got.kept_indices, n), fx["kept"], "onnx engine", ties)


@pytest.mark.parametrize("case", cases("kvzip"))
def test_kvzip_scores_equal_the_official_scores(case, engines, monkeypatch):
    """Not only the kept sets: the reference's scores of every context pair are the official `_get_score`'s."""
    import methods.kvzip as reference_module

    fx = load(case)
    _, reference = engines(case)
    seen = []
    real = reference_module.kvzip_select

    def spy(scores, *args, **kwargs):
        seen.append([s.clone() for s in scores])
        return real(scores, *args, **kwargs)

    monkeypatch.setattr(reference_module, "kvzip_select", spy)
    reference.generate([fx["ids"]], 1)
    sinks = fx["meta"]["policy"]["sinks"]
    got = torch.stack([s[0, :, sinks:] for s in seen[0]]).numpy()  # [L, Hkv, context]
    np.testing.assert_allclose(got, fx["scores"], atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("case", cases("pyramidinfer"))
def test_pyramidinfer_generation_equals_official(case, engines, monkeypatch):
    """The official model's greedy tokens, and every layer's cache after them (through the generation stage's
    first compression in the `-generation` fixtures), on the reference and on the ONNX engine."""
    from methods import pyramidinfer_stage
    from methods.pyramidinfer import PyramidInferPolicy

    fx = load(case)
    steps, total = len(fx["tokens"]), fx["after"].shape[-1]
    fed = len(fx["ids"]) + steps - 1  # the last token is generated, never fed
    if "generation" in case:  # the fixture holds a generation-stage compression in every layer
        assert bool((fx["after"].sum(-1) < fed).all()) and bool((fx["kept"].sum(-1) == len(fx["ids"])).all())
    ort_engine, reference = engines(case)
    last: dict[int, torch.Tensor] = {}
    real_stage = PyramidInferPolicy.reference_decode

    def spy(self, state, layer, cache, weights):
        real_stage(self, state, layer, cache, weights)
        last[layer] = cache.positions.clone()

    monkeypatch.setattr(PyramidInferPolicy, "reference_decode", spy)
    want = reference.generate([fx["ids"]], steps)
    assert want.tokens[0] == fx["tokens"]
    assert_same(as_mask([last[i] for i in sorted(last)], total), fx["after"], "reference after generation")
    stages = []
    real_evict = pyramidinfer_stage.GenerationStage.evict_if_due

    def keep(self):
        stages.append(self)
        return real_evict(self)

    monkeypatch.setattr(pyramidinfer_stage.GenerationStage, "evict_if_due", keep)
    got = ort_engine.generate([fx["ids"]], steps)
    assert got.tokens[0] == fx["tokens"]
    positions = [torch.from_numpy(p) for p in stages[-1].positions]
    assert_same(as_mask(positions, total), fx["after"], "onnx engine after generation")
