"""The AOT payload as TensorRT runs it (GPU hosts only: skipped without CUDA): the PTX compiled by
`trt_aot.compile_select_kernel` (ISA 8.0, sm_80) loaded through the CUDA driver, launched with the plugin's launch
parameters and exactly (inputs, int32 extra arguments, outputs), equals the op specification, including the -1 /
zero slots of the plugin's wider static width. scripts/gpu_acceptance.py runs this file on a GPU host."""

from __future__ import annotations

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU (the CPU half of the payload is tests/trt_plugins/test_trt_plugin.py)",
                allow_module_level=True)
pytest.importorskip("triton", reason="the triton package (gpu extra) is not installed")

from trt_plugins.aot_launch import launch_payload  # noqa: E402
from trt_plugins.pyramidkv_select import pyramidkv_select  # noqa: E402
from trt_plugins.streaming_select import streaming_select  # noqa: E402
from trt_plugins.triton_select import kernel_constants  # noqa: E402
from trt_plugins.trt_aot import compile_select_kernel  # noqa: E402

DTYPES = {"fp32": torch.float32, "fp16": torch.float16}


def case(seed: int, dtype: torch.dtype, b=2, h=8, hkv=2, q=70, d=32, lengths=(70, 41)):
    g = torch.Generator().manual_seed(seed)
    queries = (torch.randn(b, q, h, d, generator=g) * 2).to(dtype)
    keys, values = (torch.randn(b, hkv, q, d, generator=g).to(dtype) for _ in range(2))
    return queries, keys, values, torch.tensor(lengths)


def assert_payload_equals_spec(got, want, width):
    idx, k, v, _ = (x.cpu() for x in got)
    n = want[0].shape[-1]
    assert n <= width
    assert torch.equal(idx[..., :n], want[0]) and bool((idx[..., n:] == -1).all())
    assert torch.equal(k[..., :n, :], want[1]) and torch.equal(v[..., :n, :], want[2])
    assert not k[..., n:, :].any() and not v[..., n:, :].any(), "unused slots are zero"


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("granularity", ["kv-head", "query-head"])
@pytest.mark.parametrize("pooling,kernel", [("max", 7), ("avg", 5)])
def test_pyramidkv_payload_equals_spec(dtype, granularity, pooling, kernel):
    queries, keys, values, lengths = case(0, DTYPES[dtype])
    window, max_selected = 6, 24
    selected = torch.tensor([20, 9])
    want = pyramidkv_select(queries, keys, values, lengths, selected, window, kernel, pooling, granularity)
    h, hkv, d = queries.shape[2], keys.shape[1], keys.shape[3]
    constants = kernel_constants(h, hkv, d, window, kernel, pooling, granularity, "window", False, 0)
    payload = compile_select_kernel(dtype, constants)
    cuda = [x.cuda().contiguous() for x in (queries, keys, values, lengths, selected)]
    got = launch_payload(payload, *cuda, width=max_selected + window, cache_heads=constants["HC"], num_heads=h)
    assert_payload_equals_spec(got, want, max_selected + window)


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_streaming_payload_equals_spec(dtype):
    _, keys, values, lengths = case(1, DTYPES[dtype])
    window, sinks, max_selected = 6, 4, 24
    selected = torch.tensor([20, 9])
    want = streaming_select(keys, values, lengths, selected, window, sinks)
    hkv, d = keys.shape[1], keys.shape[3]
    constants = kernel_constants(hkv, hkv, d, window, 1, "none", "kv-head", "window", True, sinks)
    payload = compile_select_kernel(dtype, constants)
    cuda = [x.cuda().contiguous() for x in (keys, values, lengths, selected)]
    got = launch_payload(payload, None, *cuda, width=max_selected + window, cache_heads=hkv, num_heads=hkv)
    assert_payload_equals_spec(got, want, max_selected + window)
