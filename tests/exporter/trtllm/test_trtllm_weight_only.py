"""`build --backend trtllm --weights int8|int4`: TensorRT-LLM weight-only checkpoints (W8A16 / W4A16) proven as the
unquantized ones are, by a forward pass over the rank files: with every linear layer read back from TensorRT-LLM's
preprocessed layout (engines/trtllm_layout.py), the logits equal Hugging Face's model run on the same weights
quantized and dequantized per output channel of each shard (fp32, 1e-4), for tp in {1, 2} and pp in {1, 2}; and they
differ from the unquantized model by a small, non-zero amount. tiny-llama3's 32-wide attention shard at tp 2 is
below the layout's 64-row tile, so tp 2 runs on a wider random model (`WIDE`), and tiny-llama3 at tp 2 is refused."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open

from engines.hf_model import build_hf_model
from engines.trtllm_layout import layout_forward
from exporter.checkpoint import LoadedModel, load_model
from exporter.engine_dir import read_manifest
from exporter.specs import get_preset
from exporter.trtllm.checkpoint import write_trtllm_checkpoint
from exporter.trtllm.weight_only import QuantDequantWeights, WeightOnly
from exporter.weights import RandomWeights
from methods import make_policy
from pkv_cli import main

POLICY = make_policy("pyramidkv", kv_budget=32, window=4)
# Every field of TensorRT-LLM 1.2's QuantConfig dataclass (tensorrt_llm/models/modeling_utils.py), copied by hand.
QUANT_CONFIG = {"quant_algo", "kv_cache_quant_algo", "group_size", "smoothquant_val", "clamp_val", "use_meta_recipe",
                "has_zero_point", "pre_quant_scale", "exclude_modules"}
# tiny-llama3 widened so every tp-2 shard fits the layout (in a multiple of 64, out of 64): 2 layers for pp 2.
WIDE = dataclasses.replace(get_preset("tiny-llama3"), name="wide-llama3", hidden_size=128, intermediate_size=256,
                           head_dim=32, num_layers=2)


def _model(name: str) -> LoadedModel:
    if name == "wide":
        return LoadedModel(WIDE, "test:wide-llama3", RandomWeights(WIDE, seed=3), random_weights=True)
    return load_model(name)


def _forward(tmp_path, name: str, fmt: str, tp: int, pp: int):
    """(layout forward over the written checkpoint, the dequantized model's logits, the unquantized model's)."""
    loaded, quant = _model(name), WeightOnly.parse(fmt)
    out = tmp_path / "ckpt"
    write_trtllm_checkpoint(loaded, POLICY, out, tp=tp, pp=pp, dtype="fp32", max_input_len=1024, weights=quant)
    ids = torch.randint(0, 256, (2, 70), generator=torch.Generator().manual_seed(tp * 10 + pp))
    dequantized = dataclasses.replace(loaded, weights=QuantDequantWeights(loaded.weights, quant, tp=tp))
    with torch.inference_mode():
        want = build_hf_model(dequantized, attn_implementation="eager")(input_ids=ids).logits
        plain = build_hf_model(loaded, attn_implementation="eager")(input_ids=ids).logits
    return layout_forward(out, ids), want, plain


@pytest.mark.parametrize("fmt", ["int8", "int4"])
@pytest.mark.parametrize("name,tp,pp", [("tiny-llama3", 1, 1), ("tiny-llama3", 1, 2), ("wide", 1, 1), ("wide", 2, 1),
                                        ("wide", 1, 2), ("wide", 2, 2)])
def test_forward_over_the_quantized_layout_equals_the_dequantized_model(tmp_path, name, fmt, tp, pp):
    got, want, plain = _forward(tmp_path, name, fmt, tp, pp)
    assert (got - want).abs().max().item() <= 1e-4
    # Drift from the unquantized model, relative to the largest logit. Measured (tiny-llama3 / WIDE, random
    # weights): int8 0.02-0.04, int4 0.3-0.55: per-channel int4 (step max|w| / 8) is coarse on 64-128-wide layers.
    drift = (got - plain).abs().max().item() / plain.abs().max().item()
    assert 0 < drift < (0.05 if fmt == "int8" else 0.6), drift
    if fmt == "int8":  # the argmax barely moves at 8 bits
        assert (got.argmax(-1) == plain.argmax(-1)).float().mean() >= 0.9


def test_stored_bytes_follow_the_documented_layout():
    """A known answer worked out by hand from cutlass_preprocessors.cpp (not from our writer): int8, K 64 x N 32.
    Column n of the [K, N] matrix the op quantizes is stored whole in the first 64-element tile (interleave 2 puts
    column 1 right after column 0); the LDSM permutation makes stored rows 0, 1, 2, 3 logical rows 0, 1, 8, 9; the
    register order [0, 2, 1, 3] then stores them as rows 0, 8, 1, 9; every value is offset by +128."""
    quant = WeightOnly(8)
    q = torch.randint(-128, 128, (64, 32), generator=torch.Generator().manual_seed(0), dtype=torch.int8)  # [K, N]
    stored = quant.preprocess(q).reshape(-1).view(torch.uint8).to(torch.int32) - 128
    assert stored[:4].tolist() == [q[0, 0], q[8, 0], q[1, 0], q[9, 0]]
    assert stored[64:68].tolist() == [q[0, 1], q[8, 1], q[1, 1], q[9, 1]]  # column 1 interleaved after column 0
    assert stored[128:132].tolist() == [q[0, 2], q[8, 2], q[1, 2], q[9, 2]]
    # int4: 8 nibbles a register in the order [0, 2, 4, 6, 1, 3, 5, 7] of rows 0, 1, 8, 9, 16, 17, 24, 25
    q4 = torch.randint(-8, 8, (64, 64), generator=torch.Generator().manual_seed(1), dtype=torch.int8)
    b = WeightOnly(4).preprocess(q4).reshape(-1).view(torch.uint8).to(torch.int32)
    nibbles = torch.stack([b & 0xF, b >> 4], dim=-1).reshape(-1) - 8
    assert nibbles[:8].tolist() == [q4[r, 0] for r in (0, 8, 16, 24, 1, 9, 17, 25)]
    # and the scale: max|w| / 128 (/ 8), the largest weight clipped to 127 (7), round half away from zero
    w = torch.tensor([[1.0, -1.0, 0.5, 2.5 / 128, 0.0] + [0.0] * 59] * 32)
    values, scale = quant.quantize_values(w)
    assert scale[0].item() == 1 / 128 and values[0, :5].tolist() == [127, -128, 64, 3, 0]


def test_rank_files_config_and_manifest(tmp_path):
    out = tmp_path / "ckpt"
    write_trtllm_checkpoint(_model("wide"), POLICY, out, tp=2, pp=2, dtype="fp16", max_input_len=1024,
                            weights=WeightOnly(4))
    for r in range(4):
        with safe_open(str(out / f"rank{r}.safetensors"), framework="pt") as f:
            qkv = f.get_tensor("transformer.layers.0.attention.qkv.weight")
            assert qkv.dtype == torch.int8 and tuple(qkv.shape) == (128, 64)  # [K 128, N 128 / 2]: two int4 a byte
            scale = f.get_tensor("transformer.layers.0.attention.qkv.per_channel_scale")
            assert scale.dtype == torch.float16 and tuple(scale.shape) == (128,)
            assert tuple(f.get_tensor("transformer.layers.0.attention.dense.weight").shape) == (64, 64)
            assert f.get_tensor("transformer.layers.0.input_layernorm.weight").dtype == torch.float16
            if r < 2:
                assert f.get_tensor("transformer.vocab_embedding.weight").dtype == torch.float16
            else:
                assert f.get_tensor("lm_head.weight").dtype == torch.float16
                assert "lm_head.per_channel_scale" not in f.keys()  # noqa: SIM118
    config = json.loads((out / "config.json").read_text())
    assert set(config["quantization"]) == QUANT_CONFIG and config["quantization"]["quant_algo"] == "W4A16"
    weights = read_manifest(out)["weights"]
    assert weights["format"] == "int4" and weights["per_channel"] and weights["symmetric"]
    assert weights["layout"] == "sm80" and config["pkv"]["weights"] == weights


def _build(tmp_path, *args):
    out = tmp_path / "ckpt"
    return CliRunner().invoke(main, ["build", "--backend", "trtllm", *args, "--out", str(out)]), out


def test_cli_writes_int8(tmp_path):
    r, out = _build(tmp_path, "--weights", "int8", "--dtype", "fp16")
    assert r.exit_code == 0, r.output
    assert json.loads((out / "config.json").read_text())["quantization"]["quant_algo"] == "W8A16"
    assert read_manifest(out)["weights"]["format"] == "int8"


@pytest.mark.parametrize("args,fragment", [
    (["--weights", "int8", "--block-size", "32"], "per output channel"),
    (["--weights", "int4", "--asymmetric"], "per output channel"),
    (["--weights", "int8", "--tp", "2"], "attention.dense shard is 64 x 32"),  # tiny-llama3: under the 64 tile
])
def test_refused_in_one_line_and_nothing_written(tmp_path, args, fragment):
    r, out = _build(tmp_path, *args)
    assert r.exit_code == 2 and fragment in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.output
    assert not out.exists()


def test_quantized_input_checkpoint_stays_refused(tmp_path, tiny_llama_dir):
    ckpt = tmp_path / "gptq"
    ckpt.mkdir()
    for f in tiny_llama_dir.iterdir():
        (ckpt / f.name).symlink_to(f)
    config = json.loads((tiny_llama_dir / "config.json").read_text())
    (ckpt / "config.json").unlink()
    (ckpt / "config.json").write_text(json.dumps(config | {"quantization_config": {"quant_method": "gptq"}}))
    r, out = _build(tmp_path, "--model", str(ckpt), "--weights", "int8")
    assert r.exit_code == 2 and "quantization_config" in r.stderr, r.output
    assert not out.exists()


def test_runner_refuses_a_weight_only_directory(tmp_path):
    """engines/trtllm_engine.py runs the Hugging Face checkpoint with TensorRT-LLM's PyTorch backend: it would
    run unquantized weights, so a weight-only directory is refused before TensorRT-LLM is looked for."""
    from engines.trtllm_engine import TrtllmEngine
    from pkv_core.errors import UserInputError

    out = tmp_path / "ckpt"
    write_trtllm_checkpoint(load_model("tiny-llama3"), POLICY, out, dtype="fp16", max_input_len=1024,
                            weights=WeightOnly(8))
    with pytest.raises(UserInputError, match="trtllm-build's input"):
        TrtllmEngine(out)
