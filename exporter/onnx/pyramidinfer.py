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
from onnx import TensorProto

from exporter.onnx.layers import GraphConfig, Layers
from trt_plugins.onnx_graph import GraphBuilder
from trt_plugins.onnx_select import F32_MIN
from trt_plugins.pyramidinfer_select import SINK_SCORE, keep_ratio


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
        rows = _recent_rows(lay, q, k4, alive, recent)
        g.op("Identity", rows, outputs=[f"recent_rows.{layer}"])  # what the generation stage starts from
        if layer + 1 < s.num_layers:
            scores = weighted_rows(g, rows, recent, pol.distance_weight)
            slots, alive = _survivors(g, scores, positions, alive, recent, counts[layer + 1], pol.sinks)
            residual, h = _gather_rows(g, residual, slots), _gather_rows(g, h, slots)
            positions = g.op("GatherElements", positions, slots, axis=1)
    residual, h = target.add_norm(lay, residual, h, "model.norm.weight")
    g.op("Identity", recent, outputs=["recent_lengths"])
    return h, g.op("Sub", alive, g.const(1))
