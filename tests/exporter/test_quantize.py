"""Weight-only quantization (`--weights int8|int4`): onnxruntime's quantizer, its inverse for the reference, the
engines' parity with the dequantized reference on both targets, and what `plan` and `build` say about it."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from engines.ort_engine import OrtEngine
from engines.reference import ReferenceEngine, reference_for_manifest
from exporter.checkpoint import load_model
from exporter.onnx.export import build_onnx_engine
from exporter.quantize import DequantizedWeights, WeightQuant, is_linear, weight_bytes
from exporter.specs import PRESETS
from methods import make_policy
from pkv_cli import main
from pkv_core.errors import UserInputError

QUANTS = [WeightQuant(4, 32, True), WeightQuant(4, 64, False), WeightQuant(8, 32, True), WeightQuant(8, 128, False)]


def matmul_nbits(x: np.ndarray, quant: WeightQuant, packed, scales, zero_points, k: int, n: int) -> np.ndarray:
    """x [M, K] through one com.microsoft.MatMulNBits node in a real onnxruntime session."""
    inits = [numpy_helper.from_array(packed, "B"), numpy_helper.from_array(scales, "S")]
    if zero_points is not None:
        inits.append(numpy_helper.from_array(zero_points, "Z"))
    node = helper.make_node("MatMulNBits", ["X", "B", "S"] + (["Z"] if zero_points is not None else []), ["Y"],
                            domain="com.microsoft", K=k, N=n, bits=quant.bits, block_size=quant.block_size)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("X", TensorProto.FLOAT, list(x.shape))],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [x.shape[0], n])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21),
                                                    helper.make_opsetid("com.microsoft", 1)], ir_version=10)
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"X": x})[0]


@pytest.mark.parametrize("quant", QUANTS, ids=lambda q: f"{q.name}-b{q.block_size}-{'sym' if q.symmetric else 'asym'}")
def test_dequantize_is_what_matmulnbits_computes(quant):
    """The reference's weights are exactly the kernel's: x @ dequantize(...) equals MatMulNBits to float error,
    and quantization itself moves the product (a round trip that changed nothing would prove nothing)."""
    rng = np.random.default_rng(quant.bits + quant.block_size)
    k, n = 256, 96
    w, x = rng.standard_normal((k, n)).astype(np.float32), rng.standard_normal((3, k)).astype(np.float32)
    packed, scales, zero_points = quant.quantize(w)
    assert packed.dtype == np.uint8 and packed.shape == (n, k // quant.block_size, quant.block_size * quant.bits // 8)
    assert (zero_points is None) == quant.symmetric
    deq = quant.dequantize(packed, scales, zero_points, k)
    kernel = matmul_nbits(x, quant, packed, scales, zero_points, k, n)
    assert np.abs(kernel - x @ deq).max() < 1e-4
    error = np.abs(deq - w).max() / np.abs(w).max()
    assert 0 < error < (0.1 if quant.bits == 4 else 0.01)  # about half a step of 2^bits levels


def test_bad_settings_are_refused():
    with pytest.raises(UserInputError, match="4 or 8 bits"):
        WeightQuant(2)
    with pytest.raises(UserInputError, match="--block-size must be one of"):
        WeightQuant(4, 48)
    with pytest.raises(UserInputError, match="not a multiple of --block-size"):
        WeightQuant(4, 128).quantize(np.zeros((96, 8), np.float32))


def test_dequantized_weights_change_only_the_linear_layers(tiny):
    source = DequantizedWeights(tiny.weights, WeightQuant(4))
    changed = {n for n in tensor_names(tiny) if not torch.equal(source.get(n), tiny.weights.get(n))}
    assert changed == {n for n in tensor_names(tiny) if is_linear(n)} and changed


def tensor_names(loaded) -> list[str]:
    return loaded.weights.names()


@pytest.mark.parametrize("model,target,quant", [
    ("tiny-llama3", "onnxruntime", QUANTS[0]), ("tiny-mistral", "onnxruntime", WeightQuant(8, 32, False)),
    ("tiny-llama3", "tensorrt", QUANTS[1]), ("tiny-mistral", "tensorrt", QUANTS[2]),
], ids=["llama3-ort-int4", "mistral-ort-int8-asym", "llama3-trt-int4-asym", "mistral-trt-int8"])
def test_quantized_engine_equals_the_dequantized_reference(tmp_path, model, target, quant):
    """Tokens and kept index sets exact, logits to float error, on both targets (the tensorrt target's blocked
    DequantizeLinear run by onnxruntime); the unquantized model differs (quantization is really applied)."""
    loaded, policy = load_model(model), make_policy("pyramidkv", kv_budget=32, window=4)
    out = tmp_path / "engine"
    manifest = build_onnx_engine(loaded, policy, out, max_input_len=256, target=target, weights=quant)
    assert manifest["weights"]["format"] == quant.name and manifest["weights"]["block_size"] == quant.block_size
    graph = onnx.load(str(out / "prefill.onnx"), load_external_data=False).graph
    ops = {node.op_type for node in graph.node}
    assert ("MatMulNBits" in ops) == (target == "onnxruntime") and ("DequantizeLinear" in ops) == (target == "tensorrt")
    prompts = ["The quick brown fox jumps over the lazy dog " * 4, "Short prompt, left padded."]
    got = OrtEngine(out).generate(prompts, 8, return_logits=True, return_indices=True)
    want = ReferenceEngine(reference_for_manifest(manifest), policy).generate(prompts, 8, return_logits=True,
                                                                               return_indices=True)
    assert got.tokens == want.tokens and (got.logits - want.logits).abs().max().item() < 1e-4
    assert all(torch.equal(a, b) for a, b in zip(got.kept_indices, want.kept_indices, strict=True))
    plain = ReferenceEngine(reference_for_manifest(manifest, dequantized=False), policy).generate(
        prompts, 1, return_logits=True)
    assert (got.logits[:, :1] - plain.logits).abs().max().item() > 1e-3


def test_engine_size_follows_the_bits(tmp_path):
    """weight_bytes (what `plan` reports) against the bytes written, fp32 / int8 / int4, on a shape whose linear
    layers dominate (the tiny presets' 259-token vocabulary leaves them most of the weights)."""
    loaded = load_model("tiny-llama3", random_weights=True, num_layers=2)
    sizes = {}
    for quant in (None, WeightQuant(8), WeightQuant(4)):
        out = tmp_path / (quant.name if quant else "fp32")
        # the tensorrt target: no rotary tables in weights.bin beside the model's tensors
        build_onnx_engine(loaded, make_policy("full"), out, max_input_len=128, weights=quant, target="tensorrt")
        sizes[quant.name if quant else "fp32"] = (out / "weights.bin").stat().st_size
        planned = weight_bytes(loaded.spec, 4, quant)
        assert planned <= sizes[quant.name if quant else "fp32"] <= planned * 1.25 + 2**20
    assert sizes["int4"] < sizes["int8"] < sizes["fp32"]


def test_plan_reports_weights_and_what_fits():
    r = CliRunner().invoke(main, ["plan", "--model", "llama3-70b", "--policy", "pyramidkv", "--kv-budget", "128",
                                  "--context", "32768", "--batch", "16", "--dtype", "fp16", "--weights", "int4",
                                  "--memory", "80GB", "--json"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    spec = PRESETS["llama3-70b"]
    assert d["weights"] == "int4" and d["weight_bytes"] == weight_bytes(spec, 2, WeightQuant(4))
    assert 35e9 < d["weight_bytes"] < 45e9  # 70B at 4 bits + a scale per 32, embedding and lm_head in fp16
    assert d["fits"] == {"memory": 80 * 10**9, "full": False, "compressed": True}
    fp = json.loads(CliRunner().invoke(main, ["plan", "--model", "llama3-70b", "--context", "1024", "--dtype",
                                              "fp16", "--json"]).stdout)
    assert fp["weights"] == "fp" and fp["fits"] is None and 135e9 < fp["weight_bytes"] < 145e9


ONLY_QUANTIZED = "--block-size, --asymmetric and --accuracy-level apply to --weights int8 or int4"


@pytest.mark.parametrize("args,fragment", [
    (["build", "--weights", "int4", "--backend", "tensorrt"], "--weights int4 is written for --backend onnx"),
    (["build", "--block-size", "64"], ONLY_QUANTIZED),
    (["build", "--asymmetric"], ONLY_QUANTIZED),
    (["build", "--weights", "int4", "--accuracy-level", "4", "--target", "tensorrt"], "it needs --target onnxruntime"),
    (["build", "--weights", "int4", "--backend", "trtllm", "--block-size", "64"], "per output channel"),
    (["build", "--weights", "int2"], "Invalid value for '--weights'"),
    (["plan", "--context", "10", "--memory", "lots"], "--memory 'lots'"),
])
def test_bad_weight_options_are_one_line(tmp_path, args, fragment):
    r = CliRunner().invoke(main, [*args, *(["--out", str(tmp_path / "e")] if args[0] == "build" else [])])
    assert r.exit_code == 2 and fragment in r.output and "Traceback" not in r.output
    assert not (tmp_path / "e").exists()


def test_build_and_compare_through_the_cli(tmp_path):
    out = tmp_path / "int8"
    r = CliRunner().invoke(main, ["build", "--model", "tiny-llama3", "--policy", "snapkv", "--kv-budget", "32",
                                  "--window", "4", "--weights", "int8", "--asymmetric", "--max-input-len", "256",
                                  "--out", str(out)])
    assert r.exit_code == 0 and "int8 weights (block 32)" in r.output, r.output
    r = CliRunner().invoke(main, ["compare", "--engine", str(out), "--prompt-len", "100", "--batch", "2",
                                  "--max-new-tokens", "6", "--json"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert d["passed"] and d["tokens_equal"] and d["weights"] == "int8" and d["index_agreement"] == 1.0
    drift = d["vs_unquantized"]
    assert 0 <= drift["token_agreement"] <= 1 and drift["max_abs_logit_diff"] > 0


def test_reference_of_an_fp16_engine_quantizes_in_fp16():
    """The build casts to the engine dtype before quantizing; the reference does the same."""
    loaded = load_model("tiny-llama3")
    manifest = {"model": {**loaded.spec.to_dict(), "random_weights": True, "weights_seed": 0},
                "dtype": "fp16", "weights": WeightQuant(4).record()}
    source = reference_for_manifest(manifest).weights
    assert isinstance(source, DequantizedWeights) and source.engine_dtype == torch.float16
    assert source.dtype("model.layers.0.mlp.up_proj.weight") == torch.float32  # the protocol's method, unshadowed
    assert dataclasses.is_dataclass(WeightQuant(4))
