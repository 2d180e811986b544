"""`PyramidKVSelect` (and StreamingLLM's selection) as model-local ONNX functions of standard ops.

Domain `pkv`. onnxruntime inlines the function; TensorRT's parser resolves the node by op_type (built-in op,
then a model-local function of that name, then a registered plugin), so the same node can later be served by
the `PyramidKVSelect` plugin. The body mirrors `trt_plugins.pyramidkv_select.pyramidkv_select` step for step;
tests compare the two on random inputs, ties and padding.

Function signature (B and q dynamic; H, Hkv, d fixed at export):
    PyramidKVSelect(queries [B, H, n, d], keys [B, Hkv, q, d], values [B, Hkv, q, d], key_mask [B, q] bool,
                    selected [B] int64) -> kept_indices [B, Hc, max(selected) + w'] int64, keys_out, values_out
    with w' = min(window, q); row b's unused slots hold index -1 and zero K/V (per-row budgets).
    Attributes (informational, the body is specialised to them): window, kernel, pooling, granularity.
"""

from __future__ import annotations

import numpy as np
import onnx

from trt_plugins.onnx_graph import GraphBuilder

F32_MIN = float(np.finfo(np.float32).min)
SELECT_INPUTS = ["queries", "keys", "values", "key_mask", "selected"]
SELECT_OUTPUTS = ["kept_indices", "keys_out", "values_out"]


def _prefix_and_window(g: GraphBuilder, q: str, window: int) -> tuple[str, str]:
    """[1] int64 prefix length q - w' and window w' = min(window, q)."""
    w_eff = g.op("Min", g.const([window]), q)
    return g.op("Sub", q, w_eff), w_eff


def _topk_sort_gather(g: GraphBuilder, scores: str, selected: str, keys: str, values: str, prefix: str,
                      q: str, heads: int, head_dim: int) -> None:
    """scores [B, Hc, P] -> top-`selected` (ties to the lower index), ascending, + window; gather K/V [B, Hc, q, d]."""
    k = g.op("ReduceMax", selected, keepdims=1)  # [1]: the batch's largest budget
    _, idx = g.op("TopK", scores, k, outputs=2, axis=-1, largest=1, sorted=1)  # [B, Hc, k] by rank
    # Row b keeps its first selected[b] ranks; the others become a sentinel that sorts last, then -1.
    used = g.op("Less", g.unsqueeze(g.op("Range", g.const(0), g.scalar(k), g.const(1)), [0, 1]),
                g.unsqueeze(selected, [1, 2]))  # [B, 1, k]
    sentinel = g.op("Cast", q, to=onnx.TensorProto.FLOAT)
    ranked = g.op("Where", used, g.op("Cast", idx, to=onnx.TensorProto.FLOAT), sentinel)
    # Sort ascending: TopK(smallest) on exact float copies of the indices (exact below 2^24).
    asc = g.op("TopK", ranked, k, outputs=2, axis=-1, largest=0, sorted=1)[0]
    idx = g.op("Where", g.op("Less", asc, sentinel), g.op("Cast", asc, to=onnx.TensorProto.INT64), g.const(-1))
    b = g.dim(keys, 0)
    win = g.op("Range", g.scalar(prefix), g.scalar(q), g.const(1))  # [w']
    win = g.op("Expand", g.unsqueeze(win, [0, 1]), g.concat(b, g.const([heads]), g.op("Sub", q, prefix)))
    kept = g.op("Concat", idx, win, axis=-1, outputs=["kept_indices"])  # [B, Hc, k + w']
    gidx = g.op("Expand", g.unsqueeze(g.op("Max", kept, g.const(0)), [3]),
                g.concat(g.op("Shape", kept), g.const([head_dim])))
    slot_used = g.unsqueeze(g.op("GreaterOrEqual", kept, g.const(0)), [3])  # [B, Hc, k + w', 1]
    for src, out in ((keys, "keys_out"), (values, "values_out")):
        gathered = g.op("GatherElements", src, gidx, axis=2)
        zero = g.op("CastLike", g.const(0.0, np.float32), gathered)  # the function serves fp32 and fp16 engines
        g.op("Where", slot_used, gathered, zero, outputs=[out])


def _expand_heads(g: GraphBuilder, x: str, num_kv_heads: int, group: int, head_dim: int) -> str:
    """[B, Hkv, q, d] -> [B, Hkv * group, q, d], query head h reading KV head h // group."""
    if group == 1:
        return x
    shape = g.concat(g.dim(x, 0), g.const([num_kv_heads, group]), g.dim(x, 2), g.const([head_dim]))
    expanded = g.op("Expand", g.unsqueeze(x, [2]), shape)
    return g.reshape(expanded, g.const([0, num_kv_heads * group, -1, head_dim]))


def pyramidkv_select_function(window: int, kernel: int, pooling: str, granularity: str, num_heads: int,
                              num_kv_heads: int, head_dim: int) -> onnx.FunctionProto:
    g = GraphBuilder("pkvsel_")
    group = num_heads // num_kv_heads
    queries, keys, values, mask, selected = SELECT_INPUTS
    q, n = g.dim(keys, 2), g.dim(queries, 2)
    prefix, _ = _prefix_and_window(g, q, window)
    qf, kf = g.op("Cast", queries, to=onnx.TensorProto.FLOAT), g.op("Cast", keys, to=onnx.TensorProto.FLOAT)
    # Group the query heads of each KV head instead of expanding K: [B, Hkv, g * n, d] @ [B, Hkv, d, q].
    qg = g.reshape(qf, g.const([0, num_kv_heads, -1, head_dim]))
    logits = g.op("MatMul", qg, g.op("Transpose", kf, perm=[0, 1, 3, 2]))
    logits = g.reshape(logits, g.const([0, num_heads, -1, 0]))  # [B, H, n, q]
    logits = g.op("Div", logits, g.const(head_dim**0.5, np.float32))
    qs = g.scalar(q)
    rows = g.op("Range", g.op("Sub", qs, g.scalar(n)), qs, g.const(1))  # [n] absolute positions of the queries
    cols = g.op("Range", g.const(0), qs, g.const(1))  # [q]
    visible = g.op("LessOrEqual", g.unsqueeze(cols, [0]), g.unsqueeze(rows, [1]))  # [n, q] causal
    visible = g.op("And", visible, g.unsqueeze(mask, [1, 2]))  # [B, 1, n, q]
    probs = g.op("Softmax", g.op("Where", visible, logits, g.const(F32_MIN, np.float32)), axis=-1)
    query_ok = g.slice(mask, g.op("Sub", q, n), q, axis=1)  # [B, n]
    query_ok = g.unsqueeze(g.op("Cast", query_ok, to=onnx.TensorProto.FLOAT), [1, 3])  # [B, 1, n, 1]
    scores = g.op("ReduceSum", g.op("Mul", probs, query_ok), g.const([2]), keepdims=0)  # [B, H, q]
    scores = g.slice(scores, g.const([0]), prefix, axis=2)  # [B, H, P]
    if granularity == "kv-head":
        scores = g.op("ReduceMean", g.reshape(scores, g.const([0, num_kv_heads, group, -1])), g.const([2]),
                      keepdims=0)  # [B, Hkv, P]
        heads = num_kv_heads
    else:
        keys = _expand_heads(g, keys, num_kv_heads, group, head_dim)
        values = _expand_heads(g, values, num_kv_heads, group, head_dim)
        heads = num_heads
    if pooling != "none" and kernel > 1:
        rows_ = g.op("Mul", g.dim(scores, 0), g.dim(scores, 1))  # explicit B * Hc: -1 fails on empty prefixes
        flat = g.reshape(scores, g.concat(rows_, g.const([1]), prefix))  # [B * Hc, 1, P]
        pads = [kernel // 2, kernel // 2]
        if pooling == "max":
            pooled = g.op("MaxPool", flat, kernel_shape=[kernel], pads=pads, strides=[1])
        else:
            pooled = g.op("AveragePool", flat, kernel_shape=[kernel], pads=pads, strides=[1], count_include_pad=1)
        scores = g.reshape(pooled, g.op("Shape", scores))
    prefix_real = g.unsqueeze(g.slice(mask, g.const([0]), prefix, axis=1), [1])  # [B, 1, P]
    scores = g.op("Where", prefix_real, scores, g.const(float("-inf"), np.float32))
    _topk_sort_gather(g, scores, selected, keys, values, prefix, q, heads, head_dim)
    return g.make_function("PyramidKVSelect", SELECT_INPUTS, SELECT_OUTPUTS,
                           attributes=["window", "kernel", "pooling", "granularity"])


def streaming_select_function(window: int, sinks: int, num_kv_heads: int, head_dim: int) -> onnx.FunctionProto:
    """StreamingLLMSelect(keys, values, key_mask, selected): sinks + most recent, as `streaming_select`."""
    g = GraphBuilder("stream_")
    keys, values, mask, selected = "keys", "values", "key_mask", "selected"
    q = g.dim(keys, 2)
    prefix, _ = _prefix_and_window(g, q, window)
    pos = g.op("Cast", g.op("Range", g.const(0), g.scalar(prefix), g.const(1)), to=onnx.TensorProto.FLOAT)  # [P]
    prefix_mask = g.slice(mask, g.const([0]), prefix, axis=1)  # [B, P]
    rank = g.op("Sub", g.op("CumSum", g.op("Cast", prefix_mask, to=onnx.TensorProto.INT64), g.const(1)), g.const(1))
    boost = g.op("Mul", g.op("Cast", q, to=onnx.TensorProto.FLOAT), g.const(2.0, np.float32))
    scores = g.op("Where", g.op("Less", rank, g.const(sinks)), g.op("Add", pos, boost), pos)  # [B, P]
    scores = g.op("Where", prefix_mask, scores, g.const(float("-inf"), np.float32))
    scores = g.op("Expand", g.unsqueeze(scores, [1]), g.concat(g.dim(keys, 0), g.const([num_kv_heads]), prefix))
    _topk_sort_gather(g, scores, selected, keys, values, prefix, q, num_kv_heads, head_dim)
    return g.make_function("StreamingLLMSelect", ["keys", "values", "key_mask", "selected"], SELECT_OUTPUTS,
                           attributes=["window", "sinks"])
