"""PyramidInfer inside the prefill graph: after every layer, the pivotal context and the recent window are
gathered (hidden states, residual stream, positions) and only they go on to the next layer, in the op semantics of
trt_plugins.pyramidinfer_select.

Rows stay right-padded and compact at every layer, so each layer's GroupQueryAttention runs over that layer's
tokens with per-row lengths (causal by slot is causal by position: the gathered tokens keep their order), and a
kept token keeps its own position for RoPE (the paper's "gather" scheme). Layer l's cache is the tokens it
computed over, all heads alike. Deeper layers compute over fewer tokens: the prefill gets cheaper, not dearer.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper

from exporter.onnx.layers import GraphConfig, Layers
from trt_plugins.onnx_graph import GraphBuilder
from trt_plugins.onnx_select import F32_MIN
from trt_plugins.pyramidinfer_select import SINK_SCORE, keep_ratio

SELECT_PREFIX = "pinfer_"  # names of the selection nodes between layers


def context_counts(g: GraphBuilder, cfg: GraphConfig, lengths: str) -> tuple[str, list[str]]:
    """(R [B], alive context tokens of every layer [B] each), as `pyramidinfer_select.context_counts` computes
    them (float64 products, floored, like Python's int())."""
    pol, num_layers = cfg.policy, cfg.spec.num_layers
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


def _recent_rows(lay: Layers, q: str, k4: str, alive: str, recent: str) -> str:
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
    kf = g.op("Cast", k4, to=TensorProto.FLOAT)
    logits = g.op("MatMul", g.reshape(qr, g.const([0, hkv, -1, d])), g.op("Transpose", kf, perm=[0, 1, 3, 2]))
    logits = g.op("Div", g.reshape(logits, g.const([0, heads, -1, 0])), g.const(d**0.5, np.float32))
    cols = g.unsqueeze(g.op("Range", g.const(0), g.scalar(n), g.const(1)), [0, 1])  # [1, 1, n]
    visible = g.op("And", g.op("Less", cols, g.unsqueeze(alive, [1, 2])),
                   g.op("LessOrEqual", cols, g.unsqueeze(safe, [2])))  # [B, r, n]
    probs = g.op("Softmax", g.op("Where", g.unsqueeze(visible, [1]), logits, g.const(F32_MIN, np.float32)),
                 axis=-1)
    per_row = g.op("ReduceMean", probs, g.const([1]), keepdims=0)  # [B, r, n]: mean over heads
    return g.op("Mul", per_row, g.unsqueeze(g.op("Cast", in_window, to=TensorProto.FLOAT), [2]))


def weighted_rows(g: GraphBuilder, rows: str, recent: str, distance_weight: float) -> str:
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


def _survivors(g: GraphBuilder, scores: str, positions: str, alive: str, recent: str, keep: str,
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
    width = g.op("ReduceMax", survivors, keepdims=1)
    asc = g.op("TopK", both, width, outputs=2, axis=-1, largest=0, sorted=1)[0]  # [B, n'] exact below 2^24
    slots = g.op("Cast", g.op("Min", asc, g.op("Sub", sentinel, g.const(1.0, np.float32))), to=TensorProto.INT64)
    return slots, survivors


def _gather_rows(g: GraphBuilder, x: str, slots: str) -> str:
    """x [B, n, ...] rows at slots [B, n'] -> [B, n', ...]."""
    width = g.dim(x, 2)
    return g.op("GatherElements", x, g.op("Expand", g.unsqueeze(slots, [2]), g.concat(g.op("Shape", slots), width)),
                axis=1)


def pyramidinfer_decoder(g: GraphBuilder, lay: Layers, cfg: GraphConfig, target, x: str, lengths: str,
                         emit) -> tuple[str, str]:
    """The decoder with PyramidInfer's dropping: x [B, q, hidden] (the embedded right-padded prompt) -> (final
    normalised hidden states [B, n, hidden], each row's last slot [B]); `emit(layer, kept, K, V)` receives every
    layer's cache (kept: prompt position of each slot, -1 for padding, the same for every head)."""
    s, pol = cfg.spec, cfg.policy
    recent, counts = context_counts(g, cfg, lengths)
    alive = lengths  # [B] tokens per row at the current layer
    positions = "position_ids"  # [B, n] original positions of the current slots
    residual, h = None, None
    for layer in range(s.num_layers):
        p = f"model.layers.{layer}."
        if residual is None:
            residual, hn = x, target.norm(lay, x, p + "input_layernorm.weight")
        else:
            residual, hn = target.add_norm(lay, residual, h, p + "input_layernorm.weight")
        cos, sin = lay.rope_tables(positions)  # each kept token keeps its own position
        q, k, v = lay.qkv(hn, layer, cos, sin)
        # Mistral: the window by the tokens' own positions (a [n, n] bias; slots are not consecutive after layer 0)
        out, k4, v4 = target.prefill_attention(lay, q, k, v, alive, positions if layer else None)  # [B, Hkv, n, d]
        n = g.dim(k4, 2)
        real = g.op("Less", g.unsqueeze(g.op("Range", g.const(0), g.scalar(n), g.const(1)), [0]),
                    g.unsqueeze(alive, [1]))  # [B, n]
        kept = g.op("Where", real, positions, g.const(-1))
        kept = g.op("Expand", g.unsqueeze(kept, [1]), g.concat(g.dim(k4, 0), g.const([s.num_kv_heads]), n))
        used = g.unsqueeze(g.unsqueeze(real, [1]), [3])
        zero = g.const(0.0, cfg.np_dtype)
        emit(layer, kept, g.op("Where", used, k4, zero), g.op("Where", used, v4, zero))
        attn = g.op("MatMul", out, p + "self_attn.o_proj.weight.T")
        residual, hn = target.add_norm(lay, residual, attn, p + "post_attention_layernorm.weight")
        h = lay.mlp(hn, layer)
        sel = GraphBuilder(g.prefix + f"{SELECT_PREFIX}{layer}_")  # own names: profilers can tell its cost apart
        rows = _recent_rows(Layers(sel, cfg, target), q, k4, alive, recent)
        sel.op("Identity", rows, outputs=[f"recent_rows.{layer}"])  # what the generation stage starts from
        if layer + 1 < s.num_layers:
            scores = weighted_rows(sel, rows, recent, pol.distance_weight)
            slots, alive = _survivors(sel, scores, positions, alive, recent, counts[layer + 1], pol.sinks)
            residual, h = _gather_rows(sel, residual, slots), _gather_rows(sel, h, slots)
            positions = sel.op("GatherElements", positions, slots, axis=1)
        g.nodes.extend(sel.nodes)
    residual, h = target.add_norm(lay, residual, h, "model.norm.weight")
    g.op("Identity", recent, outputs=["recent_lengths"])
    return h, g.op("Sub", alive, g.const(1))


def decode_rows(lay: Layers, h: str, layer: int, present_key: str, past_lengths: str, visible) -> str:
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
    qt = g.op("Transpose", g.reshape(q4, g.const([0, hkv, -1, d])), perm=[0, 1, 3, 2])  # [B, Hkv, d, g * S]
    logits = g.op("Transpose", g.op("MatMul", keys, qt), perm=[0, 1, 3, 2])  # [B, Hkv, g * S, cap]
    logits = g.op("Div", g.reshape(logits, g.const([0, heads, -1, 0])), g.const(d**0.5, np.float32))
    cap = g.dim(present_key, 2)
    new = g.dim(h, 1)
    slots = g.unsqueeze(g.op("Range", g.const(0), g.scalar(cap), g.const(1)), [0, 1])  # [1, 1, cap]
    steps = g.unsqueeze(g.op("Range", g.const(0), g.scalar(new), g.const(1)), [0, 2])  # [1, S, 1]
    own = g.op("Add", g.unsqueeze(past_lengths, [1, 2]), steps)  # [B, S, 1] each new token's slot
    ok = g.unsqueeze(g.op("LessOrEqual", slots, own), [1])  # [B, 1, S, cap]
    mask = visible(cap)
    if mask is not None:
        ok = g.op("And", ok, mask)
    probs = g.op("Softmax", g.op("Where", ok, logits, g.const(F32_MIN, np.float32)), axis=-1)
    return g.op("ReduceMean", probs, g.const([1]), keepdims=0, outputs=[f"attn_rows.{layer}"])  # [B, S, cap]


def build_evict(cfg: GraphConfig, initializers: list | None = None) -> onnx.ModelProto:
    """evict.onnx: one generation-stage compression of every layer (trt_plugins.pyramidinfer_select).

    in:  past_key_values.{i}.key / .value [B, Hc, cap_i, d]; rows.{i} [B, r, cap_i] f32 (the recent rows, oldest
         first); lengths.{i} [B] valid slots; recent_lengths [B] (R_b); evict [B] bool (rows that compress now)
    out: present.{i}.key / .value (compacted, zeros after the new lengths), rows_out.{i}, lengths_out.{i},
         slot_map.{i} [B, cap_i] (source slot of each slot; the engine moves its own per-slot data with it)."""
    from exporter.onnx.prefill import make_model
    from trt_plugins.pyramidinfer_select import generation_keep

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
        scores = g.op("Where", segment, weighted_rows(g, rows, recent, pol.distance_weight),
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
        asc = g.op("TopK", order, cap, outputs=2, axis=-1, largest=0, sorted=1)[0]  # stayers first, in order
        slot_map = g.op("Cast", g.op("Min", asc, g.op("Sub", sentinel, g.const(1.0, np.float32))),
                        to=TensorProto.INT64)
        g.op("Identity", slot_map, outputs=[f"slot_map.{layer}"])
        new_len = g.op("ReduceSum", g.op("Cast", stays, to=TensorProto.INT64), g.const([1]), keepdims=0,
                       outputs=[f"lengths_out.{layer}"])
        used = g.op("Less", cols, g.unsqueeze(new_len, [1]))  # [B, cap]
        index = g.op("Expand", g.unsqueeze(g.unsqueeze(slot_map, [1]), [3]), g.op("Shape", key))
        zero = g.const(0.0, cfg.np_dtype)
        for src, name in ((key, f"present.{layer}.key"), (value, f"present.{layer}.value")):
            g.op("Where", g.unsqueeze(g.unsqueeze(used, [1]), [3]), g.op("GatherElements", src, index, axis=2), zero,
                 outputs=[name])
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
    return make_model(g, cfg, "pkv_evict", inputs, outputs, [], with_select=False)
