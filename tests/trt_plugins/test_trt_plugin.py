"""The TensorRT half that can be proven without TensorRT or a GPU: the AOT payload of every stage kernel (PTX ISA
8.0 for sm_80 compiled here and assembled by CUDA 12.9's ptxas, its parameter list exactly what TensorRT passes),
the plugins' shape rule and int32 arguments, the scores output that the plugin chain and the ONNX function share,
and the one-line message when TensorRT is missing."""

from __future__ import annotations

import os
import subprocess

import numpy as np
import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
pytest.importorskip("triton", reason="the triton package (dev / gpu extras) is not installed")

from tests.trt_plugins.payload_cases import CASES  # noqa: E402
from trt_plugins import select_stages as st  # noqa: E402
from trt_plugins.triton_select import pyramidkv_select_triton  # noqa: E402
from trt_plugins.trt_aot import (  # noqa: E402
    AOT_ARCH,
    AOT_PTX_ISA,
    MAX_SHARED,
    check_ptx_header,
    entry_params,
    ptx_header,
    strip_hidden_params,
)
from trt_plugins.trt_plugin import MissingTensorRT, require_tensorrt  # noqa: E402

CASE_IDS = list(CASES())


@pytest.mark.parametrize("case", CASE_IDS)
def test_aot_ptx_has_exactly_the_parameters_tensorrt_passes(aot_payloads, case):
    stage, _, kernel = aot_payloads[case]
    tensors = len(stage.inputs) + len(stage.outputs)
    assert kernel.params == tensors + len(stage.scalars)
    assert f".entry {kernel.name}(" in kernel.ptx
    assert kernel.shared <= MAX_SHARED and kernel.num_warps >= 1
    params = entry_params(kernel.ptx)
    pointers = params[: len(stage.inputs)] + params[-len(stage.outputs):]
    assert all(kernel.ptx.count(p) >= 2 for p in pointers), "every tensor argument is read or written"


def test_aot_ptx_is_isa_8_0_for_sm_80_exactly(aot_payloads):
    """What a CUDA 12.0+ driver JIT-loads on any GPU of compute capability >= 8.0 (TensorRT 10.x cu12 hosts);
    Triton's default here would be `.version 9.4` for `sm_90a` (Hopper only, CUDA 13.4 drivers)."""
    assert (AOT_ARCH, AOT_PTX_ISA) == (80, 80)
    for _, _, kernel in aot_payloads.values():
        assert ptx_header(kernel.ptx) == ("8.0", "sm_80")
    ptx = aot_payloads["SelectEmit"][2].ptx
    with pytest.raises(ValueError, match="9.4"):
        check_ptx_header(ptx.replace(".version 8.0", ".version 9.4"))
    with pytest.raises(ValueError, match="sm_90a"):
        check_ptx_header(ptx.replace(".target sm_80", ".target sm_90a"))


@pytest.mark.parametrize("gpu", ["sm_80", "sm_90"])
def test_aot_ptx_assembles_with_cuda_12_ptxas(aot_payloads, gpu, tmp_path):
    """CUDA 12.9's ptxas (bundled with Triton) accepts every payload for Ampere and Hopper."""
    from triton import knobs

    tool = getattr(knobs.nvidia, "ptxas", None)
    if tool is None or not tool.path:
        pytest.skip("this Triton bundles no legacy (CUDA 12) ptxas")
    ptxas = tool.path
    version = subprocess.run([ptxas, "--version"], capture_output=True, text=True).stdout
    if "release 12." not in version:
        pytest.skip(f"Triton's legacy ptxas is not CUDA 12's: {version.strip().splitlines()[-1:]}")
    for case, (_, _, kernel) in aot_payloads.items():
        (tmp_path / "k.ptx").write_text(kernel.ptx)
        r = subprocess.run([ptxas, "--gpu-name", gpu, str(tmp_path / "k.ptx"), "-o", str(tmp_path / "k.cubin")],
                           capture_output=True, text=True)
        assert r.returncode == 0, (case, r.stderr)


def test_strip_hidden_params_refuses_a_used_one():
    ptx = (".visible .entry k(\n.param .u64 k_param_0,\n.param .u32 k_param_1,\n.param .u64 k_param_2\n)\n{\n"
           "ld.param.u64 %rd1, [k_param_0];\nld.param.u64 %rd2, [k_param_2];\n}\n")
    with pytest.raises(ValueError, match="k_param_2"):
        strip_hidden_params(ptx, keep=2)
    unused = ptx.replace("ld.param.u64 %rd2, [k_param_2];\n", "")
    assert entry_params(strip_hidden_params(unused, keep=2)) == ["k_param_0", "k_param_1"]


def test_plugin_output_shapes():
    """The emit stages' width: the layer's largest budget plus min(window, q); scratch shapes by the constants."""
    c = st.pyramidkv_constants(8, 2, 64, 8, 7, "max", "kv-head", "window") | {"MAX_SELECTED": 234}
    kept, k, v = st.output_shapes(st.EMIT, st.Dims(2, 300), c)
    assert kept == (2, 2, 242) and k == v == (2, 2, 242, 64)
    assert st.output_shapes(st.PARTIALS, st.Dims(2, 300), c) == [(2, 2, 8 * 2 * 64 * 4)]
    assert st.output_shapes(st.POOL, st.Dims(2, 300), c) == [(2, 2, 300), (2, 2, 1, 16, 256)]
    assert st.output_shapes(st.RADIX, st.Dims(2, 300), c | {"PASS": 3}) == [(2, 2, 4, 16, 256)]
    q = st.pyramidkv_constants(8, 2, 64, 8, 7, "max", "query-head", "window") | {"MAX_SELECTED": 0}
    assert st.output_shapes(st.EMIT, st.Dims(1, 5), q)[0] == (1, 8, 5), "a short prompt: min(window, q) slots"
    h2o = st.pyramidkv_constants(8, 2, 64, 8, 1, "none", "kv-head", "all")
    assert st.output_shapes(st.PARTIALS, st.Dims(1, 300), h2o) == [(1, 2, 300 * 2 * 1 * 4)], "one slot per row"
    chunks = st.chunkkv_constants(8, 2, 64, 8, 10, 1, "avg") | {"MAX_SELECTED": 40}
    assert st.output_shapes(st.CHUNK_SUMS, st.Dims(3, 95), chunks) == [(3, 10), (3, 1, 1, 16, 256)]
    assert st.output_shapes(st.CHUNK_EMIT, st.Dims(3, 95), chunks)[0] == (3, 2, 48)


def test_scalar_values_come_from_the_shapes():
    assert st.scalar_values(st.PARTIALS, {"queries": (2, 30, 4, 16), "keys": (2, 2, 30, 16), "lengths": (2,)},
                            None) == [30]
    assert st.scalar_values(st.EMIT, {"keys": (2, 2, 30, 16)}, 13) == [30, 13]
    assert st.scalar_values(st.RADIX, {"ranked": (2, 1, 7)}, None) == [7]
    assert st.scalar_values(st.CHUNK_HIST, {"chunk_scores": (2, 9)}, None) == [9]


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
    device = "cuda" if torch.cuda.is_available() else "cpu"  # the kernels run where Triton can run them
    *_, scratch = pyramidkv_select_triton(*(x.to(device) for x in (queries, keys, values, lengths, selected)), 4, 7,
                                          "avg", "kv-head", return_scores=True, splits=2, programs=2, block_k=16)
    np.testing.assert_allclose(got[3], scratch.cpu().numpy(), rtol=1e-5, atol=1e-6)


def test_missing_tensorrt_is_one_clear_message():
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        with pytest.raises(MissingTensorRT, match="pypi.nvidia.com"):
            require_tensorrt()
    else:  # pragma: no cover - a TensorRT host
        assert require_tensorrt() is not None
