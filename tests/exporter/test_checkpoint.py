"""--model resolution and every bad input of issue 2 (one clear line, exit code 2)."""

import json
import shutil

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
