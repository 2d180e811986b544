"""--model resolution and every bad input of issues 2 and 31 (one clear line, exit code 2)."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from engines.reference import ReferenceEngine
from exporter.checkpoint import load_model
from methods import make_policy
from pkv_cli import main
from pkv_core.errors import UserInputError
from tests.conftest import write_checkpoint


def test_directory_loads_lazily_and_generates_like_the_preset(tiny_llama_dir):
    loaded = load_model(str(tiny_llama_dir))
    assert loaded.spec.num_layers == 4 and loaded.spec.arch == "llama"
    preset = load_model("tiny-llama3")
    name = "model.layers.2.mlp.down_proj.weight"
    assert torch.equal(loaded.weights.get(name), preset.weights.get(name))
    policy = make_policy("pyramidkv", kv_budget=32, window=4)
    prompt = ["Once upon a time " * 6]
    assert ReferenceEngine(loaded, policy).generate(prompt, 6).tokens == ReferenceEngine(preset, policy).generate(
        prompt, 6).tokens


def test_sharded_checkpoint(tmp_path):
    d = write_checkpoint(load_model("tiny-mistral"), tmp_path / "m", shards=3)
    loaded = load_model(str(d))
    assert loaded.spec.sliding_window == 48 and len(list(d.glob("*.safetensors"))) == 3


def test_hub_id_from_local_cache(tmp_path, monkeypatch, tiny_llama_dir):
    snap = tmp_path / "hub" / "models--pkv--tiny" / "snapshots" / "abc123"
    shutil.copytree(tiny_llama_dir, snap)
    (tmp_path / "hub" / "models--pkv--tiny" / "refs").mkdir()
    (tmp_path / "hub" / "models--pkv--tiny" / "refs" / "main").write_text("abc123")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert load_model("pkv/tiny").spec.num_layers == 4


def run_cli(*args):
    result = CliRunner().invoke(main, list(args))
    return result.exit_code, result.stdout, result.stderr


def assert_one_line_error(code, stderr, fragment):
    assert code == 2, stderr
    assert "Traceback" not in stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    assert fragment in lines[0], lines[0]


def corrupt(tmp_path, tiny_llama_dir, how):
    d = tmp_path / how
    shutil.copytree(tiny_llama_dir, d)
    st = d / "model.safetensors"
    if how == "truncated":
        data = st.read_bytes()
        st.write_bytes(data[: len(data) // 2])
    elif how == "garbage":
        st.write_bytes(b"\x00\x01not a safetensors file at all" * 10)
    elif how == "no-config":
        (d / "config.json").unlink()
    elif how == "bad-json":
        (d / "config.json").write_text("{not json")
    elif how == "missing-tensor":
        from safetensors.torch import load_file, save_file

        tensors = load_file(str(st))
        del tensors["model.layers.1.self_attn.k_proj.weight"]
        save_file(tensors, str(st))
    elif how in ("gpt2", "qwen2"):
        cfg = json.loads((d / "config.json").read_text())
        cfg["model_type"] = how
        cfg["architectures"] = ["GPT2LMHeadModel" if how == "gpt2" else "Qwen2ForCausalLM"]
        (d / "config.json").write_text(json.dumps(cfg))
    elif how == "pickle":
        st.unlink()
        (d / "pytorch_model.bin").write_bytes(b"pickle")
    return d


@pytest.mark.parametrize(
    "how,fragment",
    [
        ("truncated", "truncated"),
        ("garbage", "not a readable safetensors file"),
        ("no-config", "no config.json"),
        ("bad-json", "not valid JSON"),
        ("missing-tensor", "'model.layers.1.self_attn.k_proj.weight' is missing"),
        ("gpt2", "architecture 'gpt2' is not supported"),
        ("qwen2", "architecture 'qwen2' is not supported"),
        ("pickle", "pickle checkpoints are refused"),
    ],
)
def test_broken_checkpoints(tmp_path, tiny_llama_dir, how, fragment):
    d = corrupt(tmp_path, tiny_llama_dir, how)
    with pytest.raises(UserInputError, match=fragment.replace("(", r"\(")):
        load_model(str(d))
    code, _, err = run_cli("generate", "--model", str(d), "--prompt", "hi")
    assert_one_line_error(code, err, fragment)


def test_missing_directory():
    code, _, err = run_cli("generate", "--model", "./does/not/exist", "--prompt", "hi")
    assert_one_line_error(code, err, "no such directory")


def test_hub_id_not_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, _, err = run_cli("generate", "--model", "someorg/some-model", "--prompt", "hi")
    assert_one_line_error(code, err, "not in the local Hugging Face cache")
    assert "hf download someorg/some-model" in err


def test_real_preset_without_weights_says_how_forward(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    code, _, err = run_cli("generate", "--model", "llama3-70b", "--prompt", "hi")
    assert_one_line_error(code, err, "meta-llama/Meta-Llama-3-70B-Instruct")
    assert "--random-weights" in err and "--model DIR" in err


# Issue 31, cases 1-4: what a checkpoint may make the loader do.

def _tensor_names(path):
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return list(f.keys())


@pytest.mark.parametrize("how", ["absolute", "dotdot", "symlink"])
def test_weight_files_outside_the_checkpoint_are_refused(tmp_path, tiny_llama_dir, how):
    """Case 1: an index whose weight_map names a file outside the checkpoint (an absolute path, `../..`, a symlink
    out) is refused, not followed: a checkpoint must not make the loader read any file on the machine."""
    d = tmp_path / "ck"
    shutil.copytree(tiny_llama_dir, d)
    outside = tmp_path / "elsewhere" / "secret.safetensors"
    outside.parent.mkdir()
    (d / "model.safetensors").rename(outside)
    name = {"absolute": str(outside), "dotdot": "../elsewhere/secret.safetensors", "symlink": "shard.safetensors"}[how]
    if how == "symlink":
        (d / name).symlink_to(outside)
    names = _tensor_names(outside)
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": dict.fromkeys(names, name)}))
    with pytest.raises(UserInputError, match="refused"):
        load_model(str(d))
    code, _, err = run_cli("generate", "--model", str(d), "--prompt", "hi")
    assert_one_line_error(code, err, "outside the checkpoint" if how == "symlink" else "not a file name inside")


def test_hub_cache_symlinks_into_its_blobs_still_load(tmp_path, tiny_llama_dir, monkeypatch):
    """The Hugging Face cache's snapshot files are symlinks into the repository's blobs/: those stay allowed."""
    repo = tmp_path / "hub" / "models--pkv--linked"
    snap, blobs = repo / "snapshots" / "abc123", repo / "blobs"
    snap.mkdir(parents=True)
    blobs.mkdir()
    for f in tiny_llama_dir.iterdir():
        shutil.copy(f, blobs / f.name)
        (snap / f.name).symlink_to(Path("..") / ".." / "blobs" / f.name)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert load_model("pkv/linked").weights.get("model.norm.weight").shape == (64,)


def _with_tensor(tmp_path, tiny_llama_dir, name, value):
    from safetensors.torch import load_file, save_file

    d = tmp_path / "ck"
    shutil.copytree(tiny_llama_dir, d)
    tensors = load_file(str(d / "model.safetensors"))
    tensors[name].view(-1)[3] = value
    save_file(tensors, str(d / "model.safetensors"))
    return d


@pytest.mark.parametrize("command,name,value", [
    ("generate", "model.embed_tokens.weight", float("nan")),
    ("build", "model.layers.3.mlp.down_proj.weight", float("inf")),
])
def test_non_finite_weights_are_refused(tmp_path, tiny_llama_dir, command, name, value):
    """Case 2: NaN / Inf in any tensor is found as the weights stream in (generate and build ran with exit 0 and
    tokens all 0); build leaves nothing behind."""
    d = _with_tensor(tmp_path, tiny_llama_dir, name, value)
    out = tmp_path / "engine"
    args = ["--prompt", "hi"] if command == "generate" else ["--out", str(out)]
    code, _, err = run_cli(command, "--model", str(d), *args)
    # build's progress lines (layers written before the bad tensor) may precede the error line
    errors = [line for line in err.splitlines() if not line.startswith("writing weights")]
    assert_one_line_error(code, "\n".join(errors), f"tensor '{name}' holds NaN or infinite values")
    assert not out.exists() and not list(tmp_path.glob(".engine.partial-*"))


def test_tokenizer_larger_than_the_vocabulary_is_refused_up_front(tmp_path):
    """Case 3: a config.json vocab_size (200) below the tokenizer's ids (259) made generate IndexError and build
    write an engine onnxruntime's Gather failed on; refused before the weights are read or anything is written."""
    import dataclasses

    from exporter.checkpoint import LoadedModel
    from exporter.weights import RandomWeights

    spec = dataclasses.replace(load_model("tiny-llama3").spec, vocab_size=200)
    d = write_checkpoint(LoadedModel(spec, "small-vocab", RandomWeights(spec), None, True), tmp_path / "ck")
    for command, args in (("generate", ["--prompt", "hi"]), ("build", ["--out", str(tmp_path / "engine")])):
        code, _, err = run_cli(command, "--model", str(d), *args)
        assert_one_line_error(code, err, "token ids up to 258 (259 tokens), but config.json's vocab_size is 200")
    assert not (tmp_path / "engine").exists()
    with pytest.raises(UserInputError, match="vocab_size is 200"):  # compare --model / validate build this
        ReferenceEngine(load_model(str(d)), make_policy("full"))


def _break_tokenizer(d, how):
    tok = d / "tokenizer.json"
    if how == "truncated":
        tok.write_bytes(tok.read_bytes()[:1000])
    elif how == "invalid-json":
        (d / "tokenizer_config.json").write_text("{not json")
    elif how == "empty":
        tok.write_bytes(b"")
    elif how == "missing":
        tok.unlink()
    elif how == "not-utf8":
        tok.write_bytes(b"\xff\xfe\x00garbage" * 20)
    elif how == "a-list":
        tok.write_text("[1, 2, 3]")
    elif how == "wrong-model":
        tok.write_text(json.dumps({"model": {"type": "BPE", "vocab": 5}}))


@pytest.mark.parametrize("how,fragment", [
    ("truncated", "tokenizer.json: not valid JSON"),
    ("invalid-json", "tokenizer_config.json: not valid JSON"),
    ("empty", "tokenizer.json: empty file"),
    ("missing", "no tokenizer.json or tokenizer.model"),
    ("not-utf8", "tokenizer.json: not UTF-8 text"),
    ("a-list", "tokenizer.json: expected a JSON object, found list"),
    ("wrong-model", "the tokenizer cannot be loaded"),
])
def test_broken_tokenizer_files_are_one_line_and_never_copied(tmp_path, tiny_llama_dir, how, fragment):
    """Case 4: broken tokenizer files gave tracebacks under generate --model (UnicodeDecodeError, JSONDecodeError,
    TypeError, "need sentencepiece") and build copied them into an engine with exit 0."""
    d = tmp_path / "ck"
    shutil.copytree(tiny_llama_dir, d)
    _break_tokenizer(d, how)
    code, _, err = run_cli("generate", "--model", str(d), "--prompt", "hi")
    assert_one_line_error(code, err, fragment)
    if how in ("truncated", "wrong-model"):
        code, _, err = run_cli("build", "--model", str(d), "--out", str(tmp_path / "engine"))
        assert_one_line_error(code, err, fragment)
        assert not (tmp_path / "engine").exists()
