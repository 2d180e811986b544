"""The Triton-lang selection kernel equals the op specification: index sets and K/V, over shapes, budgets,
poolings, granularities, padding, short rows, ties, H2O's all-query observation, StreamingLLM, fp32 and fp16.

On CPU the kernel runs under TRITON_INTERPRET=1 (set here before triton is imported); on a GPU host it runs on
CUDA (scripts/gpu_acceptance.py runs this same matrix there).
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
pytest.importorskip("triton", reason="the triton package (dev / gpu extras) is not installed")

from trt_plugins.pyramidkv_select import pyramidkv_select  # noqa: E402
from trt_plugins.streaming_select import streaming_select  # noqa: E402
from trt_plugins.triton_select import pyramidkv_select_triton, streaming_select_triton  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def inputs(seed, b=2, h=4, hkv=2, q=30, d=16, lengths=(30, 23), dtype=torch.float32, zero_queries=False):
    g = torch.Generator().manual_seed(seed)
    queries = torch.randn(b, q, h, d, generator=g) * 2
    if zero_queries:
        queries = torch.zeros_like(queries)
    keys, values = torch.randn(b, hkv, q, d, generator=g), torch.randn(b, hkv, q, d, generator=g)
    return queries.to(dtype), keys.to(dtype), values.to(dtype), torch.tensor(lengths)


def assert_same(got, want):
    idx, k, v = (x.cpu() for x in got)
    assert torch.equal(idx, want[0]), (idx, want[0])
    assert torch.equal(k, want[1]) and torch.equal(v, want[2])


def on_device(*xs):
    return [x.to(DEVICE) if isinstance(x, torch.Tensor) else x for x in xs]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("granularity", ["kv-head", "query-head"])
@pytest.mark.parametrize("pooling,kernel", [("max", 7), ("avg", 5), ("none", 1)])
def test_kernel_equals_spec(pooling, kernel, granularity, dtype):
    queries, keys, values, lengths = inputs(0, dtype=dtype)
    selected = torch.tensor([9, 5])  # per-row budgets
    want = pyramidkv_select(queries, keys, values, lengths, selected, 4, kernel, pooling, granularity)
    assert_same(pyramidkv_select_triton(*on_device(queries, keys, values, lengths), selected.to(DEVICE), 4, kernel,
                                        pooling, granularity), want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_h2o_every_query_observes(dtype):
    queries, keys, values, lengths = inputs(1, q=40, lengths=(40, 27), dtype=dtype)
    selected = torch.tensor([12, 7])
    want = pyramidkv_select(queries, keys, values, lengths, selected, 4, 1, "none", "kv-head", "all")
    assert_same(pyramidkv_select_triton(*on_device(queries, keys, values, lengths), selected.to(DEVICE), 4, 1,
                                        "none", "kv-head", "all"), want)


@pytest.mark.parametrize("shape", [dict(b=1, h=2, hkv=1, q=40, d=16, lengths=(40,)),
                                   dict(b=3, h=8, hkv=2, q=70, d=32, lengths=(70, 66, 12)),
                                   dict(b=2, h=4, hkv=4, q=33, d=16, lengths=(33, 5))],
                         ids=["mha-1-row", "gqa-8-2", "no-group"])
def test_shapes_and_padding(shape):
    queries, keys, values, lengths = inputs(2, **shape)
    prefix = (lengths - lengths.clamp(max=6)).tolist()
    selected = torch.tensor([min(p, 10 + i) for i, p in enumerate(prefix)])
    want = pyramidkv_select(queries, keys, values, lengths, selected, 6, 7, "max", "kv-head")
    assert_same(pyramidkv_select_triton(*on_device(queries, keys, values, lengths), selected.to(DEVICE), 6, 7,
                                        "max", "kv-head", block_k=32), want)


def test_short_rows_zero_budgets_and_ties():
    queries, keys, values, lengths = inputs(3, q=24, lengths=(24, 3), zero_queries=True)  # uniform attention
    selected = torch.tensor([7, 0])
    want = pyramidkv_select(queries, keys, values, lengths, selected, 4, 1, "none", "kv-head")
    assert want[0][0, 0, :7].tolist() == list(range(7)), "ties go to the lower position"
    assert_same(pyramidkv_select_triton(*on_device(queries, keys, values, lengths), selected.to(DEVICE), 4, 1, "none",
                                        "kv-head"), want)


def test_static_width_pads_with_unused_slots():
    queries, keys, values, lengths = inputs(4)
    selected = torch.tensor([9, 5])
    want = pyramidkv_select(queries, keys, values, lengths, selected, 4, 7, "max", "kv-head")
    idx, k, _, scores = pyramidkv_select_triton(*on_device(queries, keys, values, lengths), selected.to(DEVICE), 4,
                                                7, "max", "kv-head", width=20, return_scores=True)
    assert idx.shape[-1] == 20 and torch.equal(idx[..., :13].cpu(), want[0])
    assert bool((idx[..., 13:] == -1).all()) and bool((k[:, :, 13:] == 0).all())
    assert scores.shape == (2, 2, 2, 30) and bool((scores[1, :, 0, 19:] == 0).all()), "no raw score past the prefix"


@pytest.mark.parametrize("sinks", [0, 3])
def test_streaming_kernel_equals_spec(sinks):
    _, keys, values, lengths = inputs(5, lengths=(30, 21))
    selected = torch.tensor([10, 7])
    want = streaming_select(keys, values, lengths, selected, 4, sinks)
    assert_same(streaming_select_triton(*on_device(keys, values, lengths), selected.to(DEVICE), 4, sinks), want)
