"""A checkpoint whose config.json does not describe its weights is refused, never built into another model:
every tensor is used or the load is refused, every config field the model depends on is checked."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from exporter.checkpoint import load_model
from pkv_cli import main
from pkv_core.errors import UserInputError


def edit(tmp_path, tiny_llama_dir, config=None, tensors=None):
    d = tmp_path / "ck"
    shutil.copytree(tiny_llama_dir, d)
    if config:
        cfg = json.loads((d / "config.json").read_text())
        config(cfg)
        (d / "config.json").write_text(json.dumps(cfg))
    if tensors:
        t = load_file(str(d / "model.safetensors"))
        tensors(t)
        save_file(t, str(d / "model.safetensors"))
    return d


def _set(**kv):
    return lambda cfg: cfg.update(kv)


def _add_bias(t):
    t["model.layers.0.self_attn.q_proj.bias"] = torch.zeros(64)


CASES = {
    "more layers in config": (_set(num_hidden_layers=5), None, "num_hidden_layers = 5, the checkpoint holds 4 layers"),
    "fewer layers in config": (_set(num_hidden_layers=3), None, "num_hidden_layers = 3, the checkpoint holds 4 layers"),
    # issue 31 case 5: absurd sizes are refused before anything is sized by them (they made plan OOM, build grow
    # to 6.4 GB, generate hang)
    "a billion layers": (_set(num_hidden_layers=10**9), None, "num_layers = 1000000000: must be at most 1024"),
    "absurd positions": (_set(max_position_embeddings=10**15), None, "max_position_embeddings"),
    "infinite rms eps": (_set(rms_norm_eps=float("inf")), None, "rms_norm_eps"),
    "bias tensor in weights": (None, _add_bias, "q_proj.bias' is not used"),
    "attention_bias in config": (_set(attention_bias=True), None, "attention_bias"),
    "mlp_bias in config": (_set(mlp_bias=True), None, "mlp_bias"),
    "gelu activation": (_set(hidden_act="gelu"), None, "hidden_act"),
    "architecture not llama": (_set(architectures=["GPT2LMHeadModel"]), None, "GPT2LMHeadModel"),
    "llama config, mistral class": (_set(architectures=["MistralForCausalLM"]), None, "architectures"),
    "zero heads": (_set(num_attention_heads=0), None, "num_heads"),
    "zero kv heads": (_set(num_key_value_heads=0, num_attention_heads=4), None, "num_kv_heads"),
    "heads not a multiple of kv heads": (_set(num_key_value_heads=3), None, "multiple of num_kv_heads"),
    "negative vocab": (_set(vocab_size=-259), None, "vocab_size"),
    "string layers": (_set(num_hidden_layers="4"), None, "num_layers"),
    "odd head dim": (_set(head_dim=15), None, "head_dim"),
    "dynamic rope": (_set(rope_scaling={"rope_type": "dynamic", "factor": 2.0}), None, "rope_scaling"),
    "zero rms eps": (_set(rms_norm_eps=0), None, "rms_norm_eps"),
    "quantized": (_set(quantization_config={"quant_method": "gptq"}), None, "quantization_config"),
    "tied but lm_head present": (_set(tie_word_embeddings=True), None, "'lm_head.weight' is not used"),
    "integer weights": (None, lambda t: t.__setitem__("model.norm.weight", torch.ones(64, dtype=torch.int32)),
                        "only fp32, fp16 and bf16"),
    "wrong hidden size": (_set(hidden_size=32), None, "has shape"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_inconsistent_checkpoint_is_refused(tmp_path, tiny_llama_dir, case):
    config, tensors, fragment = CASES[case]
    d = edit(tmp_path, tiny_llama_dir, config, tensors)
    with pytest.raises(UserInputError) as e:
        load_model(str(d))
    assert fragment in str(e.value)
    for args in (["generate", "--model", str(d), "--prompt", "hi"],
                 ["build", "--model", str(d), "--out", str(tmp_path / "eng")]):
        r = CliRunner().invoke(main, args)
        assert r.exit_code == 2 and "Traceback" not in r.stderr, r.output
        assert len(r.stderr.strip().splitlines()) == 1 and fragment in r.stderr
    assert not (tmp_path / "eng").exists()


def test_bf16_and_fp16_checkpoints_still_load(tmp_path, tiny_llama_dir):
    for dtype in (torch.bfloat16, torch.float16):
        d = edit(tmp_path, tiny_llama_dir, tensors=lambda t, dt=dtype: t.update({k: v.to(dt) for k, v in t.items()}))
        assert load_model(str(d)).weights.get("model.norm.weight").dtype == dtype
        shutil.rmtree(d)


@pytest.mark.parametrize("layers,fragment", [(10**9, "must be at most 1024"), (900, "the checkpoint holds 4 layers")])
def test_plan_of_a_checkpoint_refuses_a_config_its_weights_cannot_be(tmp_path, tiny_llama_dir, layers, fragment):
    """Issue 31 case 5: `plan --model DIR` with num_hidden_layers 1e9 was OOM-killed after 153 s building its
    tables; presets still plan without weights (tests/pkv_cli/test_cli.py plans llama3-70b)."""
    d = edit(tmp_path, tiny_llama_dir, _set(num_hidden_layers=layers))
    r = CliRunner().invoke(main, ["plan", "--model", str(d), "--context", "1000"])
    assert r.exit_code == 2 and "Traceback" not in r.stderr, r.output
    assert len(r.stderr.strip().splitlines()) == 1 and fragment in r.stderr
