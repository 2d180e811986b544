"""`PyramidKVSelect` (and StreamingLLM's selection) as model-local ONNX functions of standard ops.

Domain `pkv`. onnxruntime inlines the function; TensorRT's parser resolves the node by op_type (built-in op,
then a model-local function of that name, then a registered plugin; from 10.15 a node carrying
`plugin_namespace` goes to the plugin), so the same node can be served by the `PyramidKVSelect` plugin. The body
mirrors `trt_plugins.pyramidkv_select.pyramidkv_select` step for step; tests compare the two on random inputs,
ties, short rows and per-row budgets.

Function signature (B and q dynamic; H, Hkv, d fixed at export; rows right-padded):
    PyramidKVSelect(queries [B, q, H, d], keys [B, Hkv, q, d], values [B, Hkv, q, d], lengths [B] int64,
                    selected [B] int64) -> kept_indices [B, Hc, max(selected) + w'] int64, keys_out, values_out
    with w' = min(window, q); each row compact (picks and window ascending first, then -1 and zero K/V).
    Attributes (informational, the body is specialised to them): window, kernel, pooling, granularity, observe.
Observation scores of "all" (H2O) run in a Loop over blocks of query rows, so memory stays linear in q.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper

from trt_plugins import pyramidkv_select as spec
from trt_plugins.onnx_graph import GraphBuilder
from trt_plugins.onnx_patterns import (
    grouped_logits,
    masked_softmax,
    sort_with_window,
    top_with_window,
    window_positions,
)

SELECT_INPUTS = ["queries", "keys", "values", "lengths", "selected"]
SELECT_OUTPUTS = ["kept_indices", "keys_out", "values_out"]
PICK_INPUTS = ["scores", "keys", "values", "lengths", "selected"]  # a selection from a shared prefill's scores
PICK_ATTRIBUTES = ["window", "kernel", "pooling", "granularity"]
STREAMING_INPUTS = ["keys", "values", "lengths", "selected"]
# Attributes a node may carry (the body is specialised to them; the plugin reads the shape ones and max_selected).
PYRAMIDKV_ATTRIBUTES = ["window", "kernel", "pooling", "granularity", "observe", "num_heads", "num_kv_heads",
                        "head_dim", "max_selected"]
STREAMING_ATTRIBUTES = ["window", "sinks", "num_kv_heads", "head_dim", "max_selected"]


def _block_scores(g: GraphBuilder, queries: str, rows: str, kf: str, lengths: str, cols: str, num_heads: int,
                  num_kv_heads: int, head_dim: int) -> str:
    """Attention mass per key from a block of observation rows.

    queries [B, r, H, d] (the rows' queries), rows [B, r] their positions (-1: none), kf [B, Hkv, q, d] f32,
    cols [q] -> [B, H, q] f32.
    """
    qf = g.op("Cast", g.op("Transpose", queries, perm=[0, 2, 1, 3]), to=TensorProto.FLOAT)  # [B, H, r, d]
    logits = grouped_logits(g, qf, kf, num_heads, num_kv_heads, head_dim)  # [B, H, r, q]
    causal = g.op("LessOrEqual", g.unsqueeze(cols, [0, 1]), g.unsqueeze(rows, [2]))  # [B, r, q]
    in_row = g.op("Less", g.unsqueeze(cols, [0, 1]), g.unsqueeze(lengths, [1, 2]))  # [B, 1, q]
    probs = masked_softmax(g, logits, g.unsqueeze(g.op("And", causal, in_row), [1]))  # [B, H, r, q]
    row_ok = g.unsqueeze(g.op("Cast", g.op("GreaterOrEqual", rows, g.const(0)), to=TensorProto.FLOAT), [1, 3])
    return g.op("ReduceSum", g.op("Mul", probs, row_ok), g.const([2]), keepdims=0)  # [B, H, q]


def _all_rows_scores(g: GraphBuilder, queries: str, kf: str, lengths: str, cols: str, q: str, heads: tuple) -> str:
    """H2O: every real token observes; a Loop over blocks of rows accumulates [B, H, q] (linear memory)."""
    num_heads, num_kv_heads, head_dim = heads
    qs = g.scalar(q)
    rows_per_block = g.op("Max", g.op("Div", g.const(spec.OBS_BLOCK_ELEMENTS), qs), g.const(1))
    blocks = g.op("Div", g.op("Sub", g.op("Add", qs, rows_per_block), g.const(1)), rows_per_block)
    zeros = g.op("ConstantOfShape", g.concat(g.dim(queries, 0), g.const([num_heads]), q),
                 value=helper.make_tensor("zero", TensorProto.FLOAT, [1], [0.0]))
    body = GraphBuilder(g.prefix + "obsblock_")
    start = body.op("Mul", "obs_i", rows_per_block)
    end = body.op("Min", body.op("Add", start, rows_per_block), qs)
    block_q = body.slice(queries, body.unsqueeze(start, [0]), body.unsqueeze(end, [0]), axis=1)  # [B, r, H, d]
    positions = body.unsqueeze(body.op("Range", start, end, body.const(1)), [0])  # [1, r]
    rows = body.op("Where", body.op("Less", positions, body.unsqueeze(lengths, [1])), positions, body.const(-1))
    part = _block_scores(body, block_q, rows, kf, lengths, cols, num_heads, num_kv_heads, head_dim)
    body.op("Identity", "obs_cond", outputs=["obs_cond_out"])
    body.op("Add", "obs_acc", part, outputs=["obs_acc_out"])
    graph = helper.make_graph(
        body.nodes, g.fresh("obs_blocks"),
        [helper.make_tensor_value_info("obs_i", TensorProto.INT64, []),
         helper.make_tensor_value_info("obs_cond", TensorProto.BOOL, []),
         helper.make_tensor_value_info("obs_acc", TensorProto.FLOAT, None)],
        [helper.make_tensor_value_info("obs_cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("obs_acc_out", TensorProto.FLOAT, None)])
    return g.op("Loop", blocks, g.const(True, np.bool_), zeros, body=graph)


def _expand_heads(g: GraphBuilder, x: str, num_kv_heads: int, group: int, head_dim: int) -> str:
    """[B, Hkv, q, d] -> [B, Hkv * group, q, d], query head h reading KV head h // group."""
    if group == 1:
        return x
    shape = g.concat(g.dim(x, 0), g.const([num_kv_heads, group]), g.dim(x, 2), g.const([head_dim]))
    expanded = g.op("Expand", g.unsqueeze(x, [2]), shape)
    return g.reshape(expanded, g.const([0, num_kv_heads * group, -1, head_dim]))


def _scores_output(g: GraphBuilder, raw: str, pooled: str) -> None:
    """The optional 4th output, `scores` [B, Hc, 2, q] float32: raw (prefix only, group mean) and pooled, as the
    Triton kernel's scratch holds them (the TensorRT plugin returns that scratch as its 4th output)."""
    g.op("Concat", g.unsqueeze(raw, [2]), g.unsqueeze(pooled, [2]), axis=2, outputs=["scores"])


def _pool(g: GraphBuilder, scores: str, q: str, kernel: int, pooling: str) -> str:
    """1-D pooling of scores [B, C, q] along keys, stride 1, padding kernel // 2 (`pool_scores`)."""
    if pooling == "none" or kernel <= 1:
        return scores
    rows_ = g.op("Mul", g.dim(scores, 0), g.dim(scores, 1))  # explicit B * C: -1 fails on empty tensors
    flat = g.reshape(scores, g.concat(rows_, g.const([1]), q))  # [B * C, 1, q]
    pads = [kernel // 2, kernel // 2]
    if pooling == "max":
        pooled = g.op("MaxPool", flat, kernel_shape=[kernel], pads=pads, strides=[1])
    else:
        pooled = g.op("AveragePool", flat, kernel_shape=[kernel], pads=pads, strides=[1], count_include_pad=1)
    return g.reshape(pooled, g.op("Shape", scores))


def _observation(g: GraphBuilder, queries: str, keys: str, lengths: str, window: int, observe: str,
                 heads: tuple[int, int, int]) -> tuple[str, str, str]:
    """The scoring half of the selection: queries [B, q, H, d], keys [B, Hkv, q, d], lengths [B] -> (q [1], cols [q],
    scores [B, H, q] f32): the attention mass of the observation rows (the last `window`, or all with "all")."""
    num_heads, _, head_dim = heads
    q = g.dim(keys, 2)
    cols = g.op("Range", g.const(0), g.scalar(q), g.const(1))  # [q]
    kf = g.op("Cast", keys, to=TensorProto.FLOAT)
    if observe == "all":
        return q, cols, _all_rows_scores(g, queries, kf, lengths, cols, q, heads)
    _, _, rows = window_positions(g, q, lengths, window)  # [B, w'] positions of each row's last w' tokens
    gidx = g.op("Expand", g.unsqueeze(g.op("Max", rows, g.const(0)), [2, 3]),
                g.concat(g.op("Shape", rows), g.const([num_heads, head_dim])))
    block_q = g.op("GatherElements", queries, gidx, axis=1)  # [B, w', H, d]
    return q, cols, _block_scores(g, block_q, rows, kf, lengths, cols, *heads)  # [B, H, q]


def _pick(g: GraphBuilder, scores: str, keys: str, values: str, lengths: str, selected: str, q: str, cols: str,
          window: int, kernel: int, pooling: str, granularity: str, heads: tuple[int, int, int],
          with_scores: bool) -> None:
    """The picking half: scores [B, H, q] f32 -> the outputs kept_indices, keys_out, values_out (and `scores`)."""
    num_heads, num_kv_heads, head_dim = heads
    group = num_heads // num_kv_heads
    if granularity == "kv-head":
        scores = g.op("ReduceMean", g.reshape(scores, g.const([0, num_kv_heads, group, -1])), g.const([2]),
                      keepdims=0)  # [B, Hkv, q]
        hc = num_kv_heads
    else:
        keys = _expand_heads(g, keys, num_kv_heads, group, head_dim)
        values = _expand_heads(g, values, num_kv_heads, group, head_dim)
        hc = num_heads
    _, prefix, _ = window_positions(g, q, lengths, window)
    in_prefix = g.unsqueeze(g.op("Less", g.unsqueeze(cols, [0]), g.unsqueeze(prefix, [1])), [1])  # [B, 1, q]
    scores = raw = g.op("Where", in_prefix, scores, g.const(0.0, np.float32))
    scores = _pool(g, scores, q, kernel, pooling)
    if with_scores:
        _scores_output(g, raw, scores)
    scores = g.op("Where", in_prefix, scores, g.const(float("-inf"), np.float32))
    top_with_window(g, scores, selected, keys, values, lengths, q, hc, head_dim, window)


def pyramidkv_select_function(window: int, kernel: int, pooling: str, granularity: str, num_heads: int,
                              num_kv_heads: int, head_dim: int, observe: str = "window",
                              with_scores: bool = False) -> onnx.FunctionProto:
    g = GraphBuilder("pkvsel_")
    queries, keys, values, lengths, selected = SELECT_INPUTS
    heads = (num_heads, num_kv_heads, head_dim)
    q, cols, scores = _observation(g, queries, keys, lengths, window, observe, heads)
    _pick(g, scores, keys, values, lengths, selected, q, cols, window, kernel, pooling, granularity, heads,
          with_scores)
    outputs = SELECT_OUTPUTS + (["scores"] if with_scores else [])
    return g.make_function("PyramidKVSelect", SELECT_INPUTS, outputs, attributes=PYRAMIDKV_ATTRIBUTES)


def observation_scores_nodes(g: GraphBuilder, queries: str, keys: str, lengths: str, window: int, observe: str,
                             num_heads: int, num_kv_heads: int, head_dim: int) -> str:
    """The scores every selection function computes first, written into `g` (a shared prefill's outputs, which
    `PyramidKVPick` and `ChunkKVPick` take instead of the queries): queries [B, q, H, d], keys [B, Hkv, q, d],
    lengths [B] -> [B, H, q] f32."""
    return _observation(g, queries, keys, lengths, window, observe, (num_heads, num_kv_heads, head_dim))[2]


def pyramidkv_pick_function(window: int, kernel: int, pooling: str, granularity: str, num_heads: int,
                            num_kv_heads: int, head_dim: int) -> onnx.FunctionProto:
    """PyramidKVPick(scores [B, H, q] f32, keys, values, lengths, selected) -> kept_indices, keys_out, values_out:
    `PyramidKVSelect` from its observation scores (`observation_scores_nodes`), the same nodes after them."""
    g = GraphBuilder("pkvpick_")
    scores, keys, values, lengths, selected = PICK_INPUTS
    q = g.dim(keys, 2)
    cols = g.op("Range", g.const(0), g.scalar(q), g.const(1))  # [q]
    _pick(g, scores, keys, values, lengths, selected, q, cols, window, kernel, pooling, granularity,
          (num_heads, num_kv_heads, head_dim), False)
    return g.make_function("PyramidKVPick", PICK_INPUTS, SELECT_OUTPUTS, attributes=PICK_ATTRIBUTES)


def streaming_select_function(window: int, sinks: int, num_kv_heads: int, head_dim: int,
                              with_scores: bool = False) -> onnx.FunctionProto:
    """StreamingLLMSelect(keys, values, lengths, selected): sinks + most recent, as `streaming_select`."""
    g = GraphBuilder("stream_")
    keys, values, lengths, selected = STREAMING_INPUTS
    q = g.dim(keys, 2)
    _, prefix, _ = window_positions(g, q, lengths, window)
    pos = g.op("Cast", g.op("Range", g.const(0), g.scalar(q), g.const(1)), to=TensorProto.FLOAT)  # [q]
    boost = g.op("Mul", g.op("Cast", q, to=TensorProto.FLOAT), g.const(2.0, np.float32))
    scores = g.op("Where", g.op("Less", pos, g.const(float(sinks), np.float32)), g.op("Add", pos, boost), pos)
    in_prefix = g.op("Less", g.unsqueeze(pos, [0]), g.op("Cast", g.unsqueeze(prefix, [1]), to=TensorProto.FLOAT))
    shape = g.concat(g.dim(keys, 0), g.const([num_kv_heads]), q)
    if with_scores:
        raw = g.op("Expand", g.unsqueeze(g.op("Where", in_prefix, g.unsqueeze(scores, [0]),
                                              g.const(0.0, np.float32)), [1]), shape)
        _scores_output(g, raw, raw)
    scores = g.op("Where", in_prefix, g.unsqueeze(scores, [0]), g.const(float("-inf"), np.float32))  # [B, q]
    scores = g.op("Expand", g.unsqueeze(scores, [1]), shape)
    top_with_window(g, scores, selected, keys, values, lengths, q, num_kv_heads, head_dim, window)
    outputs = SELECT_OUTPUTS + (["scores"] if with_scores else [])
    return g.make_function("StreamingLLMSelect", STREAMING_INPUTS, outputs, attributes=STREAMING_ATTRIBUTES)


CHUNKKV_INPUTS = ["queries", "keys", "values", "lengths", "selected"]
CHUNKKV_GATHER_INPUTS = ["chunk_scores", "keys", "values", "lengths", "selected"]


def _chunk_picks(g: GraphBuilder, chunk_scores: str, selected: str, lengths: str, q: str, heads: int,
                 chunk_size: int, window: int) -> str:
    """Each row's window chunks and its top n_b other chunks of chunk_scores [B, C] (+inf on the window's chunks)
    -> float token picks [B, Hc, k * c] (float(q): none), as `chunkkv_from_scores`."""
    _, prefix, _ = window_positions(g, q, lengths, window)
    c = g.const(chunk_size)
    first = g.op("Div", prefix, c)  # [B] the first chunk holding a window token
    n_window = g.op("Sub", g.op("Div", g.op("Add", lengths, g.const(chunk_size - 1)), c), first)
    window_tokens = g.op("Sub", lengths, g.op("Mul", first, c))  # t_b
    free = g.op("Sub", g.op("Add", selected, g.op("Sub", lengths, prefix)), window_tokens)  # selected + w_b - t_b
    chunks = g.op("Add", n_window, g.op("Div", g.op("Max", free, g.const(0)), c))  # [B]
    k = g.op("ReduceMax", chunks, keepdims=1)
    _, top = g.op("TopK", g.unsqueeze(chunk_scores, [1]), k, outputs=2, axis=-1, largest=1, sorted=1)  # [B, 1, k]
    used = g.op("Less", g.unsqueeze(g.op("Range", g.const(0), g.scalar(k), g.const(1)), [0, 1]),
                g.unsqueeze(chunks, [1, 2]))
    tokens = g.op("Add", g.unsqueeze(g.op("Mul", top, c), [3]),
                  g.const(np.arange(chunk_size).reshape(1, 1, 1, chunk_size)))  # [B, 1, k, c]
    ok = g.op("And", g.unsqueeze(used, [3]), g.op("Less", tokens, g.unsqueeze(lengths, [1, 2, 3])))
    picks = g.op("Where", ok, g.op("Cast", tokens, to=TensorProto.FLOAT), g.op("Cast", q, to=TensorProto.FLOAT))
    picks = g.reshape(picks, g.concat(g.dim(chunk_scores, 0), g.const([1, -1])))  # [B, 1, k * c]
    return g.op("Expand", picks, g.concat(g.dim(chunk_scores, 0), g.const([heads]), g.dim(picks, 2)))


# The shape ones and max_selected ride along on the tensorrt target (its nodes become kernel chains: trt_chain).
CHUNKKV_ATTRIBUTES = ["window", "chunk_size", "kernel", "pooling", "num_heads", "num_kv_heads", "head_dim",
                      "max_selected"]
CHUNKKV_GATHER_ATTRIBUTES = ["window", "chunk_size", "num_kv_heads", "head_dim", "max_selected"]


def chunkkv_select_function(window: int, chunk_size: int, num_heads: int, num_kv_heads: int, head_dim: int,
                            kernel: int = 1, pooling: str = "avg") -> onnx.FunctionProto:
    """ChunkKVSelect(queries, keys, values, lengths, selected) -> kept_indices, keys_out, values_out, chunk_scores
    [B, C], as `trt_plugins.chunkkv_select.chunkkv_select`."""
    g = GraphBuilder("chunksel_")
    queries, keys, values, lengths, selected = CHUNKKV_INPUTS
    q = g.dim(keys, 2)
    cols = g.op("Range", g.const(0), g.scalar(q), g.const(1))
    kf = g.op("Cast", keys, to=TensorProto.FLOAT)
    _, prefix, rows = window_positions(g, q, lengths, window)
    gidx = g.op("Expand", g.unsqueeze(g.op("Max", rows, g.const(0)), [2, 3]),
                g.concat(g.op("Shape", rows), g.const([num_heads, head_dim])))
    block_q = g.op("GatherElements", queries, gidx, axis=1)  # [B, w', H, d]
    scores = _block_scores(g, block_q, rows, kf, lengths, cols, num_heads, num_kv_heads, head_dim)  # [B, H, q]
    _chunk_select(g, scores, keys, values, lengths, selected, q, cols, prefix, window, chunk_size, kernel, pooling,
                  (num_heads, num_kv_heads, head_dim))
    return g.make_function("ChunkKVSelect", CHUNKKV_INPUTS, SELECT_OUTPUTS + ["chunk_scores"],
                           attributes=CHUNKKV_ATTRIBUTES)


def chunkkv_pick_function(window: int, chunk_size: int, num_heads: int, num_kv_heads: int, head_dim: int,
                          kernel: int = 1, pooling: str = "avg") -> onnx.FunctionProto:
    """ChunkKVPick(scores [B, H, q] f32, keys, values, lengths, selected) -> kept_indices, keys_out, values_out,
    chunk_scores: `ChunkKVSelect` from the window's observation scores (`observation_scores_nodes`)."""
    g = GraphBuilder("chunkpick_")
    scores, keys, values, lengths, selected = PICK_INPUTS
    q = g.dim(keys, 2)
    cols = g.op("Range", g.const(0), g.scalar(q), g.const(1))
    _, prefix, _ = window_positions(g, q, lengths, window)
    _chunk_select(g, scores, keys, values, lengths, selected, q, cols, prefix, window, chunk_size, kernel, pooling,
                  (num_heads, num_kv_heads, head_dim))
    return g.make_function("ChunkKVPick", PICK_INPUTS, SELECT_OUTPUTS + ["chunk_scores"],
                           attributes=CHUNKKV_ATTRIBUTES)


def _chunk_select(g: GraphBuilder, scores: str, keys: str, values: str, lengths: str, selected: str, q: str,
                  cols: str, prefix: str, window: int, chunk_size: int, kernel: int, pooling: str,
                  heads: tuple[int, int, int]) -> None:
    """ChunkKV after the attention: the window's scores [B, H, q] f32 -> the outputs kept_indices, keys_out,
    values_out, chunk_scores [B, C]."""
    num_heads, num_kv_heads, head_dim = heads
    group = num_heads // num_kv_heads
    scores = g.op("ReduceMean", g.reshape(scores, g.const([0, num_kv_heads, group, -1])), g.const([2]),
                  keepdims=0)  # [B, Hkv, q]
    in_prefix = g.unsqueeze(g.op("Less", g.unsqueeze(cols, [0]), g.unsqueeze(prefix, [1])), [1])  # [B, 1, q]
    scores = _pool(g, g.op("Where", in_prefix, scores, g.const(0.0, np.float32)), q, kernel, pooling)
    tokens = g.op("ReduceSum", g.op("Where", in_prefix, scores, g.const(0.0, np.float32)), g.const([1]),
                  keepdims=0)  # [B, q]: over the KV heads
    n_chunks = g.op("Div", g.op("Add", q, g.const([chunk_size - 1])), g.const([chunk_size]))  # [1]
    pad = g.op("Sub", g.op("Mul", n_chunks, g.const([chunk_size])), q)
    padded = g.op("Pad", tokens, g.concat(g.const([0, 0, 0]), pad))  # [B, C * c]
    sums = g.op("ReduceSum", g.reshape(padded, g.concat(g.dim(tokens, 0), n_chunks, g.const([chunk_size]))),
                g.const([2]), keepdims=0)  # [B, C]
    ids = g.unsqueeze(g.op("Range", g.const(0), g.scalar(n_chunks), g.const(1)), [0])  # [1, C]
    first = g.unsqueeze(g.op("Div", prefix, g.const(chunk_size)), [1])  # [B, 1]
    sums = g.op("Where", g.op("GreaterOrEqual", ids, first), g.const(float("inf"), np.float32), sums)
    g.op("Where", g.op("Less", g.op("Mul", ids, g.const(chunk_size)), g.unsqueeze(lengths, [1])), sums,
         g.const(float("-inf"), np.float32), outputs=["chunk_scores"])
    picks = _chunk_picks(g, "chunk_scores", selected, lengths, q, num_kv_heads, chunk_size, window)
    sort_with_window(g, picks, keys, values, lengths, q, num_kv_heads, head_dim, 0)  # the window is in its chunks


def chunkkv_gather_function(window: int, chunk_size: int, num_kv_heads: int, head_dim: int) -> onnx.FunctionProto:
    """ChunkKVGather(chunk_scores, keys, values, lengths, selected) -> kept_indices, keys_out, values_out: index
    reuse, the chunks ranked by another layer's scores (as `chunkkv_from_scores`)."""
    g = GraphBuilder("chunkgat_")
    scores, keys, values, lengths, selected = CHUNKKV_GATHER_INPUTS
    q = g.dim(keys, 2)
    picks = _chunk_picks(g, scores, selected, lengths, q, num_kv_heads, chunk_size, window)
    sort_with_window(g, picks, keys, values, lengths, q, num_kv_heads, head_dim, 0)
    return g.make_function("ChunkKVGather", CHUNKKV_GATHER_INPUTS, SELECT_OUTPUTS,
                           attributes=CHUNKKV_GATHER_ATTRIBUTES)
