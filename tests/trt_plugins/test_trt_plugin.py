"""The TensorRT half that can be proven without TensorRT or a GPU: the AOT payload (PTX ISA 8.0 for sm_80
compiled here and assembled by CUDA 12.9's ptxas, its parameter list exactly what TensorRT passes), the
plugin's shape rule, the scores output that the plugin and the ONNX function share, and the one-line message
when TensorRT is missing."""

from __future__ import annotations

import os
import subprocess

import numpy as np
import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
pytest.importorskip("triton", reason="the triton package (dev / gpu extras) is not installed")

from trt_plugins.triton_select import kernel_constants, pyramidkv_select_triton  # noqa: E402
from trt_plugins.trt_aot import (  # noqa: E402
    AOT_ARCH,
    AOT_PTX_ISA,
    SCALAR_ARGS,
    TENSOR_INPUTS,
    TENSOR_OUTPUTS,
    check_ptx_header,
    compile_select_kernel,
    entry_params,
    ptx_header,
    scalar_args,
    strip_hidden_params,
)
from trt_plugins.trt_plugin import MissingTensorRT, output_shapes, require_tensorrt  # noqa: E402


@pytest.fixture(scope="module", params=[False, True], ids=["pyramidkv", "streamingllm"])
def aot_kernel(request):
    positional = request.param
    constants = kernel_constants(8, 2, 64, 8, 7, "max", "kv-head", "window", positional, 4)
    return positional, compile_select_kernel("fp16", constants)


def test_aot_ptx_has_exactly_the_parameters_tensorrt_passes(aot_kernel):
    positional, kernel = aot_kernel
    inputs = len(TENSOR_INPUTS) - (1 if positional else 0)
    assert kernel.params == inputs + len(SCALAR_ARGS) + len(TENSOR_OUTPUTS)
    assert f".entry {kernel.name}(" in kernel.ptx
    assert kernel.shared <= 48 * 1024 and kernel.num_warps >= 1
    params = entry_params(kernel.ptx)
    assert all(kernel.ptx.count(p) >= 2 for p in params[:inputs] + params[-len(TENSOR_OUTPUTS):]), \
        "every tensor argument is read or written"


def test_aot_ptx_is_isa_8_0_for_sm_80_exactly(aot_kernel):
    """What a CUDA 12.0+ driver JIT-loads on any GPU of compute capability >= 8.0 (TensorRT 10.x cu12 hosts);
    Triton's default here would be `.version 9.4` for `sm_90a` (Hopper only, CUDA 13.4 drivers)."""
    _, kernel = aot_kernel
    assert (AOT_ARCH, AOT_PTX_ISA) == (80, 80)
    assert ptx_header(kernel.ptx) == ("8.0", "sm_80")
    with pytest.raises(ValueError, match="9.4"):
        check_ptx_header(kernel.ptx.replace(".version 8.0", ".version 9.4"))
    with pytest.raises(ValueError, match="sm_90a"):
        check_ptx_header(kernel.ptx.replace(".target sm_80", ".target sm_90a"))


@pytest.mark.parametrize("gpu", ["sm_80", "sm_90"])
def test_aot_ptx_assembles_with_cuda_12_ptxas(aot_kernel, gpu, tmp_path):
    """CUDA 12.9's ptxas (bundled with Triton) accepts the payload for Ampere and Hopper; it refuses ISA 9.x."""
    from triton import knobs

    tool = getattr(knobs.nvidia, "ptxas", None)
    if tool is None or not tool.path:
        pytest.skip("this Triton bundles no legacy (CUDA 12) ptxas")
    ptxas = tool.path
    version = subprocess.run([ptxas, "--version"], capture_output=True, text=True).stdout
    if "release 12." not in version:
        pytest.skip(f"Triton's legacy ptxas is not CUDA 12's: {version.strip().splitlines()[-1:]}")
    _, kernel = aot_kernel
    (tmp_path / "k.ptx").write_text(kernel.ptx)
    r = subprocess.run([ptxas, "--gpu-name", gpu, str(tmp_path / "k.ptx"), "-o", str(tmp_path / "k.cubin")],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_strip_hidden_params_refuses_a_used_one():
    ptx = (".visible .entry k(\n.param .u64 k_param_0,\n.param .u32 k_param_1,\n.param .u64 k_param_2\n)\n{\n"
           "ld.param.u64 %rd1, [k_param_0];\nld.param.u64 %rd2, [k_param_2];\n}\n")
    with pytest.raises(ValueError, match="k_param_2"):
        strip_hidden_params(ptx, keep=2)
    unused = ptx.replace("ld.param.u64 %rd2, [k_param_2];\n", "")
    assert entry_params(strip_hidden_params(unused, keep=2)) == ["k_param_0", "k_param_1"]


def test_plugin_output_shapes():
    kept, k, v, scores = output_shapes(2, 300, 8, 2, 64, "kv-head", 8, 234)
    assert kept == (2, 2, 242) and k == v == (2, 2, 242, 64) and scores == (2, 2, 2, 300)
    kept, *_ = output_shapes(1, 5, 8, 2, 64, "query-head", 8, 0)
    assert kept == (1, 8, 5), "a short prompt: min(window, q) slots"


def test_scalar_args_are_the_contiguous_strides():
    q, k = torch.zeros(2, 30, 4, 16), torch.zeros(2, 2, 30, 16)
    out = torch.zeros(2, 2, 13, 16)
    want = [30, 13, *q.stride()[:3], *k.stride()[:3], *out.stride()[:3]]
    assert scalar_args(2, 30, 13, 4, 2, 2, 16) == want


def test_scores_output_of_the_function_equals_the_kernel_scratch():
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto as TP
    from onnx import helper

    from trt_plugins.onnx_graph import CUSTOM_DOMAIN, IR_VERSION, OPSET
    from trt_plugins.onnx_select import pyramidkv_select_function

    fn = pyramidkv_select_function(4, 7, "avg", "kv-head", 4, 2, 16, "window", with_scores=True)
    names = ["queries", "keys", "values", "lengths", "selected"]
    infos = [helper.make_tensor_value_info("queries", TP.FLOAT, ["b", "q", 4, 16]),
             helper.make_tensor_value_info("keys", TP.FLOAT, ["b", 2, "q", 16]),
             helper.make_tensor_value_info("values", TP.FLOAT, ["b", 2, "q", 16]),
             helper.make_tensor_value_info("lengths", TP.INT64, ["b"]),
             helper.make_tensor_value_info("selected", TP.INT64, ["b"])]
    outs = ["kept_indices", "keys_out", "values_out", "scores"]
    node = helper.make_node("PyramidKVSelect", names, outs, domain=CUSTOM_DOMAIN, window=4, kernel=7,
                            pooling="avg", granularity="kv-head", observe="window", plugin_namespace="pkv")
    types = [TP.INT64, TP.FLOAT, TP.FLOAT, TP.FLOAT]
    shapes = [["b", "h", "k"], ["b", "h", "k", "d"], ["b", "h", "k", "d"], ["b", "h", 2, "q"]]
    out_infos = [helper.make_tensor_value_info(*x) for x in zip(outs, types, shapes, strict=True)]
    graph = helper.make_graph([node], "g", infos, out_infos)
    opsets = [helper.make_opsetid("", OPSET), helper.make_opsetid(CUSTOM_DOMAIN, 1)]
    model = helper.make_model(graph, opset_imports=opsets, ir_version=IR_VERSION, functions=[fn])
    onnx.checker.check_model(model)
    g = torch.Generator().manual_seed(0)
    queries, keys, values = torch.randn(2, 30, 4, 16, generator=g), torch.randn(2, 2, 30, 16, generator=g), \
        torch.randn(2, 2, 30, 16, generator=g)
    lengths, selected = torch.tensor([30, 23]), torch.tensor([9, 5])
    got = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {
        "queries": queries.numpy(), "keys": keys.numpy(), "values": values.numpy(), "lengths": lengths.numpy(),
        "selected": selected.numpy()})
    device = "cuda" if torch.cuda.is_available() else "cpu"  # the kernel runs where Triton can run it
    *_, scratch = pyramidkv_select_triton(*(x.to(device) for x in (queries, keys, values, lengths, selected)), 4, 7,
                                          "avg", "kv-head", return_scores=True)
    np.testing.assert_allclose(got[3], scratch.cpu().numpy(), rtol=1e-5, atol=1e-6)


def test_missing_tensorrt_is_one_clear_message():
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        with pytest.raises(MissingTensorRT, match="pypi.nvidia.com"):
            require_tensorrt()
    else:  # pragma: no cover - a TensorRT host
        assert require_tensorrt() is not None
