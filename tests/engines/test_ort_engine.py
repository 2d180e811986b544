"""The onnxruntime engine against the PyTorch reference: every policy, both tiny models, both graph targets, fp32."""

from pathlib import Path

import pytest
import torch

from engines.compare import compare_results
from engines.ort_engine import OrtEngine
from engines.reference import ReferenceEngine
from exporter.checkpoint import load_model
from exporter.onnx.export import build_onnx_engine
from methods import make_policy
from pkv_core.errors import UserInputError
from tests import matrix

LONG = "The quick brown fox jumps over the lazy dog while the cat naps in the sun. " * 2
PROMPTS = [LONG, "Short prompt, left padded.", LONG[:100] + " and then?", "Hi"]
MODELS = ["tiny-llama3", "tiny-mistral"]
# Every registered method on every graph target it runs on (tests/matrix.py), on both tiny models.
PARITY = [(model, name, kw, target) for name, kw in matrix.cases() for target in matrix.targets(name)
          for model in MODELS]


def kept_sets(kept: torch.Tensor) -> list[list[int]]:
    """[Hc, n] unpadded kept positions -> per head the sorted positions actually held (-1 slots dropped)."""
    return [sorted(x for x in head if x >= 0) for head in kept.tolist()]


@pytest.mark.parametrize("model,name,kw,target", PARITY,
                         ids=[f"{matrix.case_id(n, kw)}-{m}-{t}" for m, n, kw, t in PARITY])
def test_parity_with_reference(built_engine, model, name, kw, target):
    ort_engine, reference = built_engine(model, name, kw, target)
    got = ort_engine.generate(PROMPTS, 12, return_logits=True, return_indices=True)
    want = reference.generate(PROMPTS, 12, return_logits=True, return_indices=True)
    assert got.tokens == want.tokens
    assert got.selected == want.selected
    for a, b in zip(got.kept_indices, want.kept_indices, strict=True):
        assert torch.equal(a.sort(-1).values, b.sort(-1).values)  # identical kept index sets
    assert (got.logits - want.logits).abs().max().item() <= 1e-4
    result = compare_results(got, want, "onnxruntime")
    assert result.passed and result.index_agreement == 1.0 and result.first_divergence is None


@pytest.mark.parametrize("model,name,target", [(m, n, t) for n in ("pyramidkv", "kvzip", "pyramidinfer")
                                               for t in matrix.targets(n) for m in MODELS])
def test_batched_equals_alone(built_engine, model, target, name):
    ort_engine, _ = built_engine(model, name, target=target)
    prompts = [LONG, LONG[:90] + "!", LONG[:45], "Short prompt, left padded.", "Hi"]  # every regime in one batch
    batched = ort_engine.generate(prompts, 8, return_logits=True, return_indices=True)
    for b, prompt in enumerate(prompts):
        alone = ort_engine.generate([prompt], 8, return_logits=True, return_indices=True)
        assert alone.tokens[0] == batched.tokens[b]
        steps = alone.logits.shape[1]  # a prompt that hits EOS alone stops earlier than the batch
        torch.testing.assert_close(alone.logits[0], batched.logits[b, :steps], atol=1e-4, rtol=1e-4)
        for layer in range(len(alone.kept_indices)):
            assert kept_sets(alone.kept_indices[layer][0]) == kept_sets(batched.kept_indices[layer][b])


def test_compression_is_real(built_engine):
    """Guard for the parity test: the compressed engine differs from the full one and holds fewer bytes."""
    full, _ = built_engine("tiny-llama3", "full")
    pyramid, _ = built_engine("tiny-llama3", "pyramidkv")
    a = full.generate([LONG], 12, return_logits=True)
    b = pyramid.generate([LONG], 12, return_logits=True)
    assert not torch.allclose(a.logits[:, 1:], b.logits[:, 1:])
    assert b.kv_bytes_after_prefill < a.kv_bytes_after_prefill


def test_kvzip_heads_hold_different_lengths_and_bytes_are_reported(built_engine):
    """KVzip's one top-k over every layer and head gives heads and layers different lengths: the engine reports
    the bytes it holds (each layer padded to its longest head) and the ideal (the kept pairs alone), which is what
    `plan` counts: C pairs per head on average."""
    from exporter.plan import make_plan

    engine, reference = built_engine("tiny-llama3", "kvzip")
    result = engine.generate([LONG], 1, return_indices=True)
    counts = [(k[0] >= 0).sum(-1).tolist() for k in result.kept_indices]  # [layer][head]
    assert len({c for layer in counts for c in layer}) > 1, "per-head lengths"
    assert sum(map(sum, counts)) == 32 * engine.spec.num_layers * engine.spec.num_kv_heads
    plan = make_plan(engine.spec, reference.policy, result.prompt_lengths[0], 1, "fp32")
    assert result.kv_bytes_ideal == plan["kv_bytes_compressed"]
    assert result.kv_bytes_after_prefill >= result.kv_bytes_ideal
    assert result.kv_bytes_after_prefill == sum(
        2 * max(c) * engine.spec.num_kv_heads * engine.spec.head_dim * 4 for c in counts)
    # issue 31 case 13: the reference (generate --model) reports the same two numbers, where it reported none
    want = reference.generate([LONG], 1)
    assert (want.kv_bytes_after_prefill, want.kv_bytes_ideal) == (result.kv_bytes_after_prefill,
                                                                   result.kv_bytes_ideal)


@pytest.mark.parametrize("model", ["tiny-llama3", "tiny-mistral"])
def test_pyramidinfer_compresses_while_generating(built_engine, model, monkeypatch):
    """The generation stage really runs: evict.onnx compacts the caches every `update_interval` tokens once R + E
    tokens were generated (lengths shrink below prefill + generated), and the tokens then differ from a run that
    never compresses while generating, on the engine as on the reference (which agree)."""
    from methods import pyramidinfer_stage

    # The matrix's generation-stage case. Geometric: under the cosine default the random tiny-mistral emits EOS
    # after 8 tokens, before the first compression (R + E = 10 tokens); the stage does not depend on that schedule.
    kw = dict(matrix.VARIANTS)["pyramidinfer"]
    engine, reference = built_engine(model, "pyramidinfer", kw)
    calls = []
    original = pyramidinfer_stage.GenerationStage.evict_if_due

    def spy(self):
        before = [n.copy() for n in self.lengths]
        replaced = original(self)
        if replaced:
            calls.append((before, [n.copy() for n in self.lengths]))
        return replaced

    monkeypatch.setattr(pyramidinfer_stage.GenerationStage, "evict_if_due", spy)
    got = engine.generate([LONG], 24, return_logits=True)
    assert len(calls) >= 3 and all((after[0] < before[0]).all() for before, after in calls)
    never, never_ref = built_engine(model, "pyramidinfer", kw | {"update_interval": 10_000})
    other = never.generate([LONG], 24, return_logits=True)
    assert not torch.allclose(got.logits, other.logits)
    want = reference.generate([LONG], 24, return_logits=True)
    assert got.tokens == want.tokens and (got.logits - want.logits).abs().max().item() <= 1e-4


@pytest.mark.parametrize("name", ["kvzip", "pyramidinfer"])
def test_methods_with_their_own_graph_stages_need_onnxruntime(tmp_path, name):
    """KVzip's reconstruction Loop and PyramidInfer's gathering between layers have no TensorRT plugin."""
    loaded = load_model("tiny-llama3")
    with pytest.raises(UserInputError, match="--backend onnx --target onnxruntime only"):
        build_onnx_engine(loaded, make_policy(name), tmp_path / "e", target="tensorrt")
    assert not (tmp_path / "e").exists()


@pytest.mark.parametrize("name", ["pyramidkv", "pyramidinfer"])
def test_kv_bytes_held_equal_the_plan(built_engine, name):
    from exporter.plan import make_plan

    engine, reference = built_engine("tiny-llama3", name)
    prompt = LONG
    result = engine.generate([prompt], 1)
    plan = make_plan(engine.spec, reference.policy, result.prompt_lengths[0], 1, "fp32")
    assert result.kv_bytes_after_prefill == plan["kv_bytes_compressed"]
    assert reference.generate([prompt], 1).kv_bytes_after_prefill == plan["kv_bytes_compressed"]


def test_prompt_longer_than_engine_accepts(built_engine):
    engine, _ = built_engine("tiny-llama3", "snapkv")
    with pytest.raises(UserInputError, match="accepts at most 1024"):
        engine.generate(["x" * 2000], 2)


def test_fp16_engine_runs_close_to_fp32(tmp_path):
    loaded = load_model("tiny-llama3")
    policy = make_policy("pyramidkv", kv_budget=32, window=4)
    build_onnx_engine(loaded, policy, tmp_path / "fp16", dtype="fp16")
    got = OrtEngine(Path(tmp_path / "fp16")).generate([LONG], 4, return_logits=True)
    want = ReferenceEngine(loaded, policy).generate([LONG], 4, return_logits=True)
    assert (got.logits[:, 0] - want.logits[:, 0]).abs().max().item() < 0.1


def test_decode_updates_each_layer_cache_in_place(built_engine):
    """onnxruntime target: the buffer bound as past and present is written at the row's next slot, nothing else
    moves, and no new cache tensor is allocated per step."""
    import numpy as np

    engine, _ = built_engine("tiny-mistral", "pyramidkv")
    ids, mask = [list(range(60, 160)), list(range(70, 110))], None
    from engines.base import encode_batch

    input_ids, mask, positions = encode_batch(engine.tokenizer, ids, engine.pad_id, 1024, 4, padding_side="right")
    out = engine.run_prefill(input_ids.numpy(), mask.numpy(), positions.numpy(), 3)
    cache = {k: v for k, v in out.items() if k.startswith("present.")}
    before = {k: v.numpy().copy() for k, v in cache.items()}
    pointers = {k: v.data_ptr() for k, v in cache.items()}
    lengths = [out[f"kv_lengths.{i}"].numpy() for i in range(engine.spec.num_layers)]
    kept = {f"kept_indices.{i}": out[f"kept_indices.{i}"] for i in range(engine.spec.num_layers)}
    binding, step = engine.decode_binding(cache, kept)
    step(np.array([5, 6]), np.array([100, 40]), lengths)
    outputs = dict(zip(engine.decode_outputs, binding.get_outputs(), strict=True))
    for name, buffer in cache.items():
        assert outputs[name].data_ptr() == pointers[name] == buffer.data_ptr(), "the same buffer, updated in place"
        layer = int(name.split(".")[1])
        after = buffer.numpy()
        for b, n in enumerate(lengths[layer]):
            np.testing.assert_array_equal(after[b, :, :n], before[name][b, :, :n])  # kept tokens untouched
            assert not np.array_equal(after[b, :, n], before[name][b, :, n])  # the new token's slot written
            np.testing.assert_array_equal(after[b, :, n + 1 :], 0)


@pytest.mark.parametrize("target", ["onnxruntime", "tensorrt"])
def test_graph_ops_per_target(built_engine, target):
    import onnx

    engine, _ = built_engine("tiny-llama3", "pyramidkv", target=target)
    ops = {}
    for graph in ("prefill", "decode"):
        model = onnx.load(str(engine.dir / f"{graph}.onnx"), load_external_data=False)
        nodes = list(model.graph.node) + [n for node in model.graph.node for a in node.attribute if a.g
                                          for n in a.g.node]
        ops[graph] = {(n.domain, n.op_type) for n in nodes}
        selects = [n for n in nodes if n.op_type == "PyramidKVSelect"]
        attrs = [{a.name for a in n.attribute} for n in selects]
        if target == "tensorrt":
            assert all(d in ("", "pkv") for d, _ in ops[graph]), "standard ops (and the pkv select) only"
            assert all({"plugin_namespace", "plugin_version"} <= a for a in attrs)
        else:
            assert all("plugin_namespace" not in a for a in attrs)
    if target == "onnxruntime":
        assert ("com.microsoft", "GroupQueryAttention") in ops["prefill"] & ops["decode"]
        assert ("com.microsoft", "SkipSimplifiedLayerNormalization") in ops["prefill"]
    else:
        assert ("", "Attention") in ops["prefill"] & ops["decode"] and ("", "TensorScatter") in ops["decode"]
    assert engine.manifest["onnx"]["target"] == target


CONTEXT = "The quick brown fox jumps over the lazy dog while the cat naps in the sun. " * 3
QUESTIONS = [" Where is the cat?", " What does the fox do? Answer briefly."]


@pytest.mark.parametrize("model,name,target", [(m, n, t) for n in ("full", "pyramidkv", "chunkkv", "kvzip",
                                                                   "pyramidinfer")
                                               for t in matrix.targets(n) for m in MODELS])
def test_answers_from_one_compressed_context(built_engine, model, name, target):
    """Several questions on one compressed context: the engine answers exactly as the reference does, and the
    context is left as it was (the second question sees the same cache as the first). PyramidInfer: its
    generation-stage case, so a question's tokens are compressed too."""
    kw = dict(matrix.VARIANTS)["pyramidinfer"] if name == "pyramidinfer" else None
    ort_engine, reference = built_engine(model, name, kw, target)
    got_ctx, want_ctx = ort_engine.compress_context(CONTEXT, 48), reference.compress_context(CONTEXT, 48)
    assert got_ctx.length == want_ctx.length and got_ctx.kv_bytes == want_ctx.kv_bytes
    for a, b in zip(got_ctx.kept_indices, want_ctx.kept_indices, strict=True):
        assert kept_sets(a[0]) == kept_sets(b[0])
    for question in QUESTIONS + QUESTIONS[:1]:  # asking again gives the same answer: the context is not mutated
        got = ort_engine.answer(got_ctx, question, 10, return_logits=True)
        want = reference.answer(want_ctx, question, 10, return_logits=True)
        assert got.tokens == want.tokens
        assert (got.logits - want.logits).abs().max().item() <= 1e-4


@pytest.mark.parametrize("model", ["tiny-llama3", "tiny-mistral"])
def test_full_kv_answer_is_generate_on_context_plus_question(built_engine, model):
    ort_engine, reference = built_engine(model, "full")
    tok = reference.tokenizer
    for engine in (ort_engine, reference):
        ctx = engine.compress_context(CONTEXT, 48)
        ids = tok(CONTEXT)["input_ids"] + tok(QUESTIONS[1], add_special_tokens=False)["input_ids"]
        whole = engine.generate([ids], 10, return_logits=True)
        answer = engine.answer(ctx, QUESTIONS[1], 10, return_logits=True)
        assert answer.tokens == whole.tokens
        torch.testing.assert_close(answer.logits, whole.logits, atol=1e-4, rtol=1e-4)


def test_answer_checks_room(built_engine):
    ort_engine, reference = built_engine("tiny-llama3", "pyramidkv")
    for engine in (ort_engine, reference):
        ctx = engine.compress_context(CONTEXT, 8)
        with pytest.raises(UserInputError, match="room for 8"):
            engine.answer(ctx, QUESTIONS[1], 10)
        with pytest.raises(UserInputError, match="empty question"):
            engine.answer(ctx, "", 4)
