"""Which onnxruntime-target engines `--device cuda` refuses before making a session (engines/ort_cuda.py):
onnxruntime's CUDA GroupQueryAttention has fp16/bf16 kernels only and refuses an attention_bias, so an fp32
engine or one whose graphs pass a bias would otherwise run attention on the CPU or fail at the first step."""

import pytest

from engines.ort_cuda import cuda_problems, gqa_with_bias
from exporter.checkpoint import load_model
from exporter.engine_dir import read_manifest
from exporter.onnx.export import build_onnx_engine
from methods import make_policy
from tests import matrix

CASES = {  # (model, policy, options, dtype) -> (graphs with a biased GQA, fp32 refused)
    ("tiny-llama3", "pyramidkv", (), "fp16"): ([], False),
    ("tiny-llama3", "pyramidinfer", (("min_context", 8),), "fp16"): ([], False),
    ("tiny-llama3", "pyramidkv", (), "fp32"): ([], True),
    ("tiny-llama3", "kvzip", (), "fp16"): (["decode.onnx"], False),
    ("tiny-mistral", "pyramidkv", (), "fp16"): (["decode.onnx"], False),
    ("tiny-mistral", "pyramidinfer", (("min_context", 8),), "fp16"): (["prefill.onnx", "decode.onnx"], False),
}


@pytest.mark.parametrize("case", list(CASES), ids=["-".join(str(x) for x in c if x) for c in CASES])
def test_cuda_problems_name_exactly_what_the_cuda_kernel_cannot_run(tmp_path, case):
    model, name, options, dtype = case
    biased, fp32 = CASES[case]
    out = tmp_path / "engine"
    build_onnx_engine(load_model(model), make_policy(name, **matrix.small(name, **dict(options))), out,
                      dtype=dtype, max_input_len=256)
    manifest = read_manifest(out)
    served = [g for g in manifest["onnx"]["graphs"] if g not in ("chunk.onnx", "select.onnx", "mixed.onnx")]
    assert [g for g in served if gqa_with_bias(out / g)] == biased  # the chunk graphs run on the CPU only
    problems = cuda_problems(out, manifest)
    assert any("fp16/bf16" in p for p in problems) == fp32
    assert any("attention_bias" in p for p in problems) == bool(biased)
    assert cuda_problems(out, {**manifest, "onnx": {**manifest["onnx"], "target": "tensorrt"}}) == []
