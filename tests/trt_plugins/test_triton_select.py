"""The Triton-lang selection kernels equal the op specifications: index sets and K/V, over shapes, budgets,
poolings, granularities, padding, short rows, ties, H2O's all-query observation, StreamingLLM, ChunkKV, fp32 and
fp16; and at the edges of the work's cut: the kernels split each row over several programs (shares of keys for
the scores, shares of scores for the top-k), so the block cases below cut tens of keys into shares of 8-16 and
put lengths that are not a multiple of a share, a needle at a share edge, pooling windows and ties that cross
edges, and per-row budgets whose k-th value lies in another program's share.

On CPU the kernels run under TRITON_INTERPRET=1 (set here before triton is imported); on a GPU host they run on
CUDA (scripts/gpu_acceptance.py runs this same matrix there).
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
pytest.importorskip("triton", reason="the triton package (dev / gpu extras) is not installed")

from trt_plugins.chunkkv_select import chunkkv_from_scores, chunkkv_select  # noqa: E402
from trt_plugins.pyramidkv_select import pyramidkv_select  # noqa: E402
from trt_plugins.streaming_select import streaming_select  # noqa: E402
from trt_plugins.triton_select import (  # noqa: E402
    chunkkv_from_scores_triton,
    chunkkv_select_triton,
    pyramidkv_select_triton,
    streaming_select_triton,
)

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


# Many programs per row over tens of keys: key shares of 16 for the scores (4 programs), score shares of 16 for
# the top-k (4 programs; ALIGN 8 puts the edges at 16, 32 of a 37-token row), blocks of 16 inside a share.
SMALL = dict(splits=4, programs=4, block_k=16, align=8)


def with_needle(queries, keys, lengths, window, at: dict[int, int]):
    """keys[b, kv head 0, at[b]] made to align with row b's window queries of that head's group: a key the
    observation rows attend to far more than any other (its pooled score a plateau around it)."""
    keys = keys.clone()
    group = queries.shape[2] // keys.shape[1]
    for b, pos in at.items():
        n = int(lengths[b])
        direction = queries[b, n - window:n, :group].float().mean(dim=(0, 1))
        keys[b, 0, pos] = (6 * direction / direction.norm() * keys.shape[-1] ** 0.5).to(keys.dtype)
    return keys


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_block_edges_needles_padding_gqa(dtype):
    """Rows of 37, 29 and 3 tokens (not multiples of a share; the last shorter than the window: no prefix, budget
    0), GQA 8/2, needles at share edges (row 0 at 16 = an edge, row 1 at 7 = the last key before one), max pooling
    of width 7 across the edges; the needles and their plateaus must be picked, exactly as the spec picks."""
    queries, keys, values, lengths = inputs(6, b=3, h=8, hkv=2, q=37, d=16, lengths=(37, 29, 3), dtype=dtype)
    keys = with_needle(queries, keys, lengths, 4, {0: 16, 1: 7})
    selected = torch.tensor([13, 9, 0])
    want = pyramidkv_select(queries, keys, values, lengths, selected, 4, 7, "max")
    assert {13, 16, 19} <= set(want[0][0, 0].tolist()) and {4, 7, 10} <= set(want[0][1, 0].tolist())
    assert_same(pyramidkv_select_triton(*on_device(queries, keys, values, lengths), selected.to(DEVICE), 4, 7, "max",
                                        **SMALL), want)


@pytest.mark.parametrize("budget", [5, 9])
def test_ties_across_shares_go_to_the_lower_position(budget):
    """A needle at 16 under max pooling of width 7: positions 13..19 tie, across the share edge at 16. With 5
    picks the k-th value is the tie and the program owning 16.. keeps 2 of its ties only because the program
    before it kept 3 (ties to the lower position); with 9 the plateau and 2 more. Row 1 attends uniformly
    (zero queries: every prefix score equal), its 11 picks the first 11 positions, across shares too."""
    queries, keys, values, lengths = inputs(7, b=2, h=4, hkv=2, q=40, d=16, lengths=(40, 33))
    queries[1] = 0
    keys = with_needle(queries, keys, lengths, 4, {0: 16})
    selected = torch.tensor([budget, 11])
    want = pyramidkv_select(queries, keys, values, lengths, selected, 4, 7, "max")
    if budget == 5:
        assert want[0][0, 0, :5].tolist() == [13, 14, 15, 16, 17]
    assert want[0][1, 0, :11].tolist() == list(range(11))
    assert_same(pyramidkv_select_triton(*on_device(queries, keys, values, lengths), selected.to(DEVICE), 4, 7, "max",
                                        **SMALL), want)


def test_query_head_avg_pooling_across_shares():
    queries, keys, values, lengths = inputs(8, b=1, h=4, hkv=2, q=35, d=16, lengths=(33,), dtype=torch.float16)
    selected = torch.tensor([14])
    want = pyramidkv_select(queries, keys, values, lengths, selected, 4, 5, "avg", "query-head")
    assert_same(pyramidkv_select_triton(*on_device(queries, keys, values, lengths), selected.to(DEVICE), 4, 5, "avg",
                                        "query-head", **SMALL), want)


def test_h2o_rows_split_over_programs():
    """Every position observes: the score kernels split the 4 x 37 rows over programs (shares of 64 rows), each
    row's softmax over every key it sees."""
    queries, keys, values, lengths = inputs(9, b=2, h=4, hkv=2, q=37, d=16, lengths=(37, 22))
    selected = torch.tensor([15, 6])
    want = pyramidkv_select(queries, keys, values, lengths, selected, 4, 1, "none", "kv-head", "all")
    assert_same(pyramidkv_select_triton(*on_device(queries, keys, values, lengths), selected.to(DEVICE), 4, 1,
                                        "none", "kv-head", "all", **SMALL), want)


def test_streaming_slots_split_over_programs():
    _, keys, values, lengths = inputs(10, b=3, q=37, lengths=(37, 20, 2))
    for sinks, budgets in ((4, [20, 2, 0]), (0, [9, 16, 0]), (6, [3, 5, 0])):
        selected = torch.tensor(budgets)
        want = streaming_select(keys, values, lengths, selected, 4, sinks)
        assert_same(streaming_select_triton(*on_device(keys, values, lengths), selected.to(DEVICE), 4, sinks,
                                            programs=4, block_k=4), want)
    *got, scores = streaming_select_triton(*on_device(keys, values, lengths), selected.to(DEVICE), 4, 6, width=30,
                                           return_scores=True)
    assert bool((got[0][0, :, 7:] == -1).all()) and bool((got[0][1, :, 9:] == -1).all())
    assert scores.shape == (3, 2, 2, 37)
    assert scores[0, 0, 0, :6].tolist() == [74.0 + i for i in range(6)] and scores[0, 0, 0, 33:].eq(0).all()


@pytest.mark.parametrize("kernel,pooling", [(1, "avg"), (5, "max")])
def test_chunkkv_kernels_equal_spec(kernel, pooling):
    """Chunks of 6 over rows of 41 and 26 tokens (partial last chunks, the window's chunks kept whole), chunk
    sums over both KV heads, pooling across chunk and share edges; index reuse from the chunk scores."""
    queries, keys, values, lengths = inputs(11, b=2, h=4, hkv=2, q=41, d=16, lengths=(41, 26))
    selected = torch.tensor([19, 8])
    *want, scores = chunkkv_select(queries, keys, values, lengths, selected, 4, 6, kernel, pooling)
    *got, got_scores = chunkkv_select_triton(*on_device(queries, keys, values, lengths), selected.to(DEVICE), 4, 6,
                                             kernel, pooling, **SMALL)
    assert_same(got, want)
    torch.testing.assert_close(got_scores.cpu(), scores, rtol=1e-6, atol=0)
    reuse = torch.tensor([12, 3])
    want = chunkkv_from_scores(scores, keys, values, lengths, reuse, 4, 6)
    assert_same(chunkkv_from_scores_triton(scores.to(DEVICE), *on_device(keys, values, lengths), reuse.to(DEVICE), 4,
                                           6, programs=2, align=2), want)
