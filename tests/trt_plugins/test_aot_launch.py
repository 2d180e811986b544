"""The AOT payloads as TensorRT runs them (GPU hosts only: skipped without CUDA): every stage kernel of a chain
compiled by `trt_aot` (ISA 8.0, sm_80), loaded through the CUDA driver and launched in order with its plugin's
launch parameters and exactly (inputs, int32 extra arguments, outputs), equals the op specification, including
the -1 / zero slots of the plugin's wider static width. The plugins' default cut (64 score programs and 16 top-k
programs per head) and a small one that crosses share edges on short rows. scripts/gpu_acceptance.py runs this
file on a GPU host."""

from __future__ import annotations

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU (the CPU half of the payloads is tests/trt_plugins/test_trt_plugin.py)",
                allow_module_level=True)
pytest.importorskip("triton", reason="the triton package (gpu extra) is not installed")

from trt_plugins import select_stages as st  # noqa: E402
from trt_plugins.aot_launch import run_chain_payloads  # noqa: E402
from trt_plugins.chunkkv_select import chunkkv_from_scores, chunkkv_select  # noqa: E402
from trt_plugins.pyramidkv_select import pyramidkv_select  # noqa: E402
from trt_plugins.streaming_select import streaming_select  # noqa: E402

DTYPES = {"fp32": torch.float32, "fp16": torch.float16}
WINDOW, MAX_SELECTED = 6, 24
CUTS = {"default": {}, "small": dict(splits=4, programs=4, block_k=16, align=8)}


def case(seed: int, dtype: torch.dtype, b=2, h=8, hkv=2, q=70, d=32, lengths=(70, 41)):
    g = torch.Generator().manual_seed(seed)
    queries = (torch.randn(b, q, h, d, generator=g) * 2).to(dtype)
    keys, values = (torch.randn(b, hkv, q, d, generator=g).to(dtype) for _ in range(2))
    return dict(queries=queries, keys=keys, values=values, lengths=torch.tensor(lengths),
                selected=torch.tensor([20, 9]))


def cuda(x: dict) -> dict:
    return {k: v.cuda().contiguous() for k, v in x.items()}


def assert_payload_equals_spec(env, want, width):
    idx, k, v = (env[n].cpu() for n in ("kept", "keys_out", "values_out"))
    n = want[0].shape[-1]
    assert n <= width == idx.shape[-1]
    assert torch.equal(idx[..., :n], want[0]) and bool((idx[..., n:] == -1).all())
    assert torch.equal(k[..., :n, :], want[1]) and torch.equal(v[..., :n, :], want[2])
    assert not k[..., n:, :].any() and not v[..., n:, :].any(), "unused slots are zero"


@pytest.mark.parametrize("cut", list(CUTS))
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("granularity,pooling,kernel,observe", [("kv-head", "max", 7, "window"),
                                                                 ("query-head", "avg", 5, "window"),
                                                                 ("kv-head", "none", 1, "all")])
def test_pyramidkv_payloads_equal_spec(dtype, granularity, pooling, kernel, observe, cut):
    x = case(0, DTYPES[dtype])
    want = pyramidkv_select(*x.values(), WINDOW, kernel, pooling, granularity, observe)
    constants = st.pyramidkv_constants(8, 2, 32, WINDOW, kernel, pooling, granularity, observe, **CUTS[cut])
    env = run_chain_payloads(st.PYRAMIDKV, cuda(x), constants | {"MAX_SELECTED": MAX_SELECTED}, dtype)
    assert_payload_equals_spec(env, want, MAX_SELECTED + WINDOW)


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_streaming_payload_equals_spec(dtype):
    x = case(1, DTYPES[dtype])
    want = streaming_select(x["keys"], x["values"], x["lengths"], x["selected"], WINDOW, 4)
    constants = st.streaming_constants(2, 32, WINDOW, 4) | {"MAX_SELECTED": MAX_SELECTED}
    env = run_chain_payloads(st.STREAMINGLLM, cuda({k: v for k, v in x.items() if k != "queries"}), constants,
                             dtype)
    assert_payload_equals_spec(env, want, MAX_SELECTED + WINDOW)


@pytest.mark.parametrize("cut", list(CUTS))
def test_chunkkv_payloads_equal_spec(cut):
    x = case(2, torch.float16)
    *want, scores = chunkkv_select(*x.values(), WINDOW, 10, 5, "avg")
    constants = st.chunkkv_constants(8, 2, 32, WINDOW, 10, 5, "avg", **CUTS[cut]) | {"MAX_SELECTED": MAX_SELECTED}
    env = run_chain_payloads(st.CHUNKKV, cuda(x), constants, "fp16")
    assert_payload_equals_spec(env, want, MAX_SELECTED + WINDOW)
    torch.testing.assert_close(env["chunk_scores"].cpu(), scores, rtol=1e-5, atol=1e-6)
    x["chunk_scores"], x["selected"] = scores, torch.tensor([14, 6])
    want = chunkkv_from_scores(scores, x["keys"], x["values"], x["lengths"], x["selected"], WINDOW, 10)
    env = run_chain_payloads(st.CHUNKKV_GATHER, cuda(x), constants, "fp16")
    assert_payload_equals_spec(env, want, MAX_SELECTED + WINDOW)
