"""PyramidInfer's graphs, in the op semantics of trt_plugins.pyramidinfer_select: the pieces the prefill's hooks
add between layers (methods.pyramidinfer.PyramidInferPolicy.graph_between_layers: after every layer, the pivotal
context and the recent window are gathered, hidden states, residual stream and positions, and only they go on to
the next layer), the decode's attention rows, and evict.onnx (the generation stage's compression).

Rows stay right-padded and compact at every layer, so each layer's attention runs over that layer's tokens with
per-row lengths (causal by slot is causal by position: the gathered tokens keep their order), and a kept token
keeps its own position for RoPE (the paper's "gather" scheme). Layer l's cache is the tokens it computed over, all
heads alike. Deeper layers compute over fewer tokens: the prefill gets cheaper, not dearer. `lay` is the graph
writer's transformer body (exporter.onnx.layers.Layers).
"""

from __future__ import annotations

import numpy as np
from onnx import TensorProto, helper

from trt_plugins.onnx_graph import GraphBuilder
from trt_plugins.onnx_patterns import compact, gather_kept, grouped_logits, masked_softmax
from trt_plugins.pyramidinfer_select import SINK_SCORE, generation_keep, keep_ratio


def context_counts_graph(g: GraphBuilder, pol, num_layers: int, lengths: str) -> tuple[str, list[str]]:
    """(R [B], alive context tokens of every layer [B] each), as `pyramidinfer_select.context_counts` computes
    them (float64 products, floored, like Python's int()). lengths [B] int64."""
    as_f64 = g.op("Cast", lengths, to=TensorProto.DOUBLE)
    recent = g.op("Cast", g.op("Floor", g.op("Mul", as_f64, g.const(pol.recent_ratio, np.float64))),
                  to=TensorProto.INT64)
    context = g.op("Max", g.op("Sub", g.op("Sub", lengths, g.const(1)), recent), g.const(0))
    floor = g.op("Min", context, g.const(pol.min_context))
    counts = []
    for layer in range(num_layers):
        counts.append(context)
        keep = keep_ratio(layer, num_layers, pol.decay, pol.decay_schedule)
        if keep >= 1.0:
            continue
        kept = g.op("Cast", g.op("Floor", g.op("Mul", g.op("Cast", context, to=TensorProto.DOUBLE),
                                                g.const(keep, np.float64))), to=TensorProto.INT64)
        cut = g.op("And", g.op("Greater", context, floor), g.op("Greater", kept, floor))
        context = g.op("Where", cut, kept, context)
    return recent, counts


def recent_rows_graph(lay, q: str, k4: str, alive: str, recent: str) -> str:
    """The recent window's attention rows, mean over heads, [B, r, n] f32, right-aligned (row i of row b is slot
    alive_b - r + i; rows before the row's window are zeros). q [B, n, H*d] (rotated), k4 [B, Hkv, n, d],
    alive [B] tokens per row (slots beyond are padding), recent [B] R per row."""
    g, s = lay.g, lay.s
    heads, hkv, d = s.num_heads, s.num_kv_heads, s.head_dim
    n = g.dim(k4, 2)
    rows = g.op("Add", g.op("ReduceMax", recent, keepdims=1), g.const([1]))  # [1] 1 + max R
    j = g.unsqueeze(g.op("Range", g.const(0), g.scalar(rows), g.const(1)), [0])  # [1, r]
    slot = g.op("Add", g.op("Sub", g.unsqueeze(alive, [1]), rows), j)  # [B, r]
    in_window = g.op("GreaterOrEqual", j, g.unsqueeze(g.op("Sub", g.op("Sub", rows, g.const(1)), recent), [1]))
    safe = g.op("Max", slot, g.const(0))
    index = g.op("Expand", g.unsqueeze(safe, [2]), g.concat(g.op("Shape", safe), g.const([heads * d])))
    qr = g.op("GatherElements", q, index, axis=1)  # [B, r, H*d]
    qr = g.op("Cast", g.op("Transpose", g.reshape(qr, g.const([0, 0, heads, d])), perm=[0, 2, 1, 3]),
              to=TensorProto.FLOAT)  # [B, H, r, d]
    logits = grouped_logits(g, qr, g.op("Cast", k4, to=TensorProto.FLOAT), heads, hkv, d)  # [B, H, r, n]
    cols = g.unsqueeze(g.op("Range", g.const(0), g.scalar(n), g.const(1)), [0, 1])  # [1, 1, n]
    visible = g.op("And", g.op("Less", cols, g.unsqueeze(alive, [1, 2])),
                   g.op("LessOrEqual", cols, g.unsqueeze(safe, [2])))  # [B, r, n]
    probs = masked_softmax(g, logits, g.unsqueeze(visible, [1]))
    per_row = g.op("ReduceMean", probs, g.const([1]), keepdims=0)  # [B, r, n]: mean over heads
    return g.op("Mul", per_row, g.unsqueeze(g.op("Cast", in_window, to=TensorProto.FLOAT), [2]))


def weighted_rows_graph(g: GraphBuilder, rows: str, recent: str, distance_weight: float) -> str:
    """The ensemble of right-aligned rows [B, r, T] -> [B, T] (pyramidinfer_select.weighted_rows)."""
    r = g.dim(rows, 1)
    j = g.op("Sub", g.unsqueeze(g.op("Range", g.const(0), g.scalar(r), g.const(1)), [0]),
             g.unsqueeze(g.op("Sub", g.op("Sub", r, g.const(1)), recent), [1]))  # [B, r]
    jf = g.op("Cast", j, to=TensorProto.FLOAT)
    span = g.op("Cast", g.op("Max", recent, g.const(1)), to=TensorProto.FLOAT)
    weight = g.op("Add", g.const(1.0, np.float32),
                  g.op("Div", g.op("Mul", jf, g.const(distance_weight - 1.0, np.float32)), g.unsqueeze(span, [1])))
    weight = g.op("Where", g.op("GreaterOrEqual", j, g.const(0)), weight, g.const(0.0, np.float32))
    summed = g.op("ReduceSum", g.op("Mul", rows, g.unsqueeze(weight, [2])), g.const([1]), keepdims=0)
    count = g.op("Cast", g.op("Add", recent, g.const(1)), to=TensorProto.FLOAT)
    return g.op("Div", summed, g.unsqueeze(count, [1]))


def survivors(g: GraphBuilder, scores: str, positions: str, alive: str, recent: str, keep: str,
               sinks: int) -> tuple[str, str]:
    """Slots that go on to the next layer: the top `keep` [B] context slots (sinks first, ties to the lower
    slot) and the recent window, ascending -> (slots [B, n'] int64 (clamped, for gathering), new alive [B])."""
    n = g.dim(scores, 1)
    cols = g.unsqueeze(g.op("Range", g.const(0), g.scalar(n), g.const(1)), [0])  # [1, n]
    window_start = g.op("Sub", g.op("Sub", alive, g.const(1)), recent)  # [B]
    context = g.op("Less", cols, g.unsqueeze(window_start, [1]))  # [B, n]
    ranked = g.op("Where", g.op("Less", positions, g.const(sinks)), g.const(SINK_SCORE, np.float32), scores)
    ranked = g.op("Where", context, ranked, g.const(float("-inf"), np.float32))
    k = g.op("ReduceMax", keep, keepdims=1)
    _, order = g.op("TopK", ranked, k, outputs=2, axis=-1, largest=1, sorted=1)  # [B, k]
    used = g.op("Less", g.unsqueeze(g.op("Range", g.const(0), g.scalar(k), g.const(1)), [0]), g.unsqueeze(keep, [1]))
    sentinel = g.op("Cast", n, to=TensorProto.FLOAT)
    picks = g.op("Where", used, g.op("Cast", order, to=TensorProto.FLOAT), sentinel)
    in_window = g.op("And", g.op("Not", context), g.op("Less", cols, g.unsqueeze(alive, [1])))
    window = g.op("Where", in_window, g.op("Cast", cols, to=TensorProto.FLOAT), sentinel)  # [B, n]
    both = g.op("Concat", picks, window, axis=1)
    survivors = g.op("Add", g.op("Add", keep, recent), g.const(1))  # [B]
    slots = compact(g, both, g.op("ReduceMax", survivors, keepdims=1), sentinel, clamp=True)  # [B, n']
    return slots, survivors


def gather_rows(g: GraphBuilder, x: str, slots: str) -> str:
    """x [B, n, ...] rows at slots [B, n'] -> [B, n', ...]."""
    width = g.dim(x, 2)
    return g.op("GatherElements", x, g.op("Expand", g.unsqueeze(slots, [2]), g.concat(g.op("Shape", slots), width)),
                axis=1)


def decode_rows(lay, h: str, layer: int, present_key: str, past_lengths: str, visible) -> str:
    """PyramidInfer while decoding: the new tokens' attention rows over the layer's slots, mean over heads,
    [B, S, cap] f32, as the decode attention computed them (its visibility `visible(T)` when the model has one,
    the row's valid slots and causality otherwise). Reads the cache once (K @ q, no copy of K: a second attention
    of one token, the cost of the generation stage)."""
    g, s = lay.g, lay.s
    heads, hkv, d = s.num_heads, s.num_kv_heads, s.head_dim
    q, _, _ = lay.split_qkv(lay.qkv_packed(h, layer))  # the same MatMul as the attention's (CSE merges them)
    cos, sin = lay.rope_tables("position_ids")
    q4 = lay.to_heads(lay.rotate(q, heads, cos, sin), heads)  # [B, H, S, d]
    keys = present_key
    if lay.cfg.onnx_dtype != TensorProto.FLOAT:
        q4, keys = g.op("Cast", q4, to=TensorProto.FLOAT), g.op("Cast", keys, to=TensorProto.FLOAT)
    logits = grouped_logits(g, q4, keys, heads, hkv, d, read_keys_once=True)  # [B, H, S, cap]
    cap = g.dim(present_key, 2)
    new = g.dim(h, 1)
    slots = g.unsqueeze(g.op("Range", g.const(0), g.scalar(cap), g.const(1)), [0, 1])  # [1, 1, cap]
    steps = g.unsqueeze(g.op("Range", g.const(0), g.scalar(new), g.const(1)), [0, 2])  # [1, S, 1]
    own = g.op("Add", g.unsqueeze(past_lengths, [1, 2]), steps)  # [B, S, 1] each new token's slot
    ok = g.unsqueeze(g.op("LessOrEqual", slots, own), [1])  # [B, 1, S, cap]
    mask = visible(cap)
    if mask is not None:
        ok = g.op("And", ok, mask)
    probs = masked_softmax(g, logits, ok)
    return g.op("ReduceMean", probs, g.const([1]), keepdims=0, outputs=[f"attn_rows.{layer}"])  # [B, S, cap]


def build_evict(cfg) -> tuple[str, GraphBuilder, list, list]:
    """evict.onnx (graph name, builder, inputs, outputs): one generation-stage compression of every layer
    (trt_plugins.pyramidinfer_select). cfg: exporter.onnx.layers.GraphConfig.

    in:  past_key_values.{i}.key / .value [B, Hc, cap_i, d]; rows.{i} [B, r, cap_i] f32 (the recent rows, oldest
         first); lengths.{i} [B] valid slots; recent_lengths [B] (R_b); evict [B] bool (rows that compress now)
    out: present.{i}.key / .value (compacted, zeros after the new lengths), rows_out.{i}, lengths_out.{i},
         slot_map.{i} [B, cap_i] (source slot of each slot; the engine moves its own per-slot data with it)."""
    s, pol = cfg.spec, cfg.policy
    g = GraphBuilder()
    hc, d = cfg.cache_heads, s.head_dim
    inputs = [helper.make_tensor_value_info("recent_lengths", TensorProto.INT64, ["batch"]),
              helper.make_tensor_value_info("evict", TensorProto.BOOL, ["batch"])]
    outputs = []
    recent = "recent_lengths"
    for layer in range(s.num_layers):
        key, value, rows, lengths = (f"past_key_values.{layer}.key", f"past_key_values.{layer}.value",
                                     f"rows.{layer}", f"lengths.{layer}")
        cache = ["batch", hc, f"capacity_{layer}", d]
        inputs += [helper.make_tensor_value_info(key, cfg.onnx_dtype, cache),
                   helper.make_tensor_value_info(value, cfg.onnx_dtype, cache),
                   helper.make_tensor_value_info(rows, TensorProto.FLOAT,
                                                 ["batch", "recent_rows", f"capacity_{layer}"]),
                   helper.make_tensor_value_info(lengths, TensorProto.INT64, ["batch"])]
        keep = generation_keep(layer, s.num_layers, pol.gen_decay, pol.update_interval)
        cap = g.dim(key, 2)
        cols = g.unsqueeze(g.op("Range", g.const(0), g.scalar(cap), g.const(1)), [0])  # [1, cap]
        seg_end = g.unsqueeze(g.op("Sub", g.op("Sub", lengths, g.const(1)), recent), [1])  # [B, 1]
        seg_start = g.op("Sub", seg_end, g.const(pol.update_interval))
        segment = g.op("And", g.op("GreaterOrEqual", cols, seg_start), g.op("Less", cols, seg_end))  # [B, cap]
        scores = g.op("Where", segment, weighted_rows_graph(g, rows, recent, pol.distance_weight),
                      g.const(float("-inf"), np.float32))
        _, picks = g.op("TopK", scores, g.const([keep]), outputs=2, axis=-1, largest=1, sorted=1)  # [B, keep]
        hits = g.op("Cast", g.op("Equal", g.unsqueeze(cols, [2]), g.unsqueeze(picks, [1])), to=TensorProto.INT64)
        picked = g.op("ReduceMax", hits, g.const([2]), keepdims=0)  # [B, cap] 1 where picked
        valid = g.op("Less", cols, g.unsqueeze(lengths, [1]))
        flagged = g.unsqueeze("evict", [1])
        stays = g.op("And", valid, g.op("Or", g.op("Not", g.op("And", flagged, segment)),
                                        g.op("Cast", picked, to=TensorProto.BOOL)))  # [B, cap]
        sentinel = g.op("Cast", cap, to=TensorProto.FLOAT)
        order = g.op("Where", stays, g.op("Cast", cols, to=TensorProto.FLOAT), sentinel)
        slot_map = compact(g, order, cap, sentinel, clamp=True, outputs=[f"slot_map.{layer}"])  # stayers first
        new_len = g.op("ReduceSum", g.op("Cast", stays, to=TensorProto.INT64), g.const([1]), keepdims=0,
                       outputs=[f"lengths_out.{layer}"])
        used = g.op("Less", cols, g.unsqueeze(new_len, [1]))  # [B, cap]
        kept = g.op("Where", used, slot_map, g.const(-1))  # [B, cap]: the same slots for every head
        kept = g.op("Expand", g.unsqueeze(kept, [1]), g.concat(g.dim(key, 0), g.const([hc]), cap))
        gather_kept(g, kept, [key, value], d, outputs=[f"present.{layer}.key", f"present.{layer}.value"])
        row_index = g.op("Expand", g.unsqueeze(slot_map, [1]), g.op("Shape", rows))
        g.op("Where", g.unsqueeze(used, [1]), g.op("GatherElements", rows, row_index, axis=2),
             g.const(0.0, np.float32), outputs=[f"rows_out.{layer}"])
        outputs += [helper.make_tensor_value_info(f"present.{layer}.key", cfg.onnx_dtype, cache),
                    helper.make_tensor_value_info(f"present.{layer}.value", cfg.onnx_dtype, cache),
                    helper.make_tensor_value_info(f"rows_out.{layer}", TensorProto.FLOAT,
                                                  ["batch", "recent_rows", f"capacity_{layer}"]),
                    helper.make_tensor_value_info(f"lengths_out.{layer}", TensorProto.INT64, ["batch"]),
                    helper.make_tensor_value_info(f"slot_map.{layer}", TensorProto.INT64,
                                                  ["batch", f"capacity_{layer}"])]
    return "pkv_evict", g, inputs, outputs
