"""The graph patterns every selection writes, each in one place with its shape contract: the ONNX functions of the
ops (`onnx_select`) and the methods' own graphs (methods/*) call these instead of writing the nodes again.

* `grouped_logits` / `masked_softmax`: attention of chosen query rows over a layer's keys, query heads grouped by
  their KV head (K is never expanded to H heads);
* `sort_ascending` / `compact` / `gather_kept`: a per-row (per-head) kept set as compact ascending positions, -1
  after them, and the K/V (or any [.., n, d] rows) at those positions, zero in the unused slots;
* `window_positions`, `top_with_window` / `sort_with_window`: a selection's end, from scores (or picks) to the
  layer's cache: the top picks of each row's prefix plus its observation window, compacted and gathered.

Positions travel as exact float copies (exact below 2^24) so that one TopK(smallest) sorts them; a sentinel above
every position (the length n itself) marks "no pick" and sorts last.
"""

from __future__ import annotations

import numpy as np
from onnx import TensorProto

from trt_plugins.onnx_graph import GraphBuilder

F32_MIN = float(np.finfo(np.float32).min)


def grouped_logits(g: GraphBuilder, queries: str, keys: str, num_heads: int, num_kv_heads: int, head_dim: int, *,
                   scale: bool = True, read_keys_once: bool = False) -> str:
    """Attention logits of chosen query rows: queries [B, H, r, d] f32, keys [B, Hkv, n, d] f32 -> [B, H, r, n] f32,
    divided by sqrt(d) when `scale`. Each KV head's g = H / Hkv query heads go as one [g * r, d] block:
    [B, Hkv, g * r, d] @ [B, Hkv, d, n]. `read_keys_once`: K @ Qᵀ, then the small result is transposed, so a large K
    (a decode step's whole cache) is read in place instead of being transposed (a copy) first."""
    grouped = g.reshape(queries, g.const([0, num_kv_heads, -1, head_dim]))  # [B, Hkv, g * r, d]
    if read_keys_once:
        logits = g.op("Transpose", g.op("MatMul", keys, g.op("Transpose", grouped, perm=[0, 1, 3, 2])),
                      perm=[0, 1, 3, 2])
    else:
        logits = g.op("MatMul", grouped, g.op("Transpose", keys, perm=[0, 1, 3, 2]))  # [B, Hkv, g * r, n]
    logits = g.reshape(logits, g.const([0, num_heads, -1, 0]))  # [B, H, r, n]
    return g.op("Div", logits, g.const(head_dim**0.5, np.float32)) if scale else logits


def masked_softmax(g: GraphBuilder, logits: str, visible: str) -> str:
    """Softmax over the last axis of logits [.., n] f32 where `visible` (broadcastable bool) holds; the rest get
    F32_MIN (a row that sees nothing is uniform, as eager attention's additive mask makes it)."""
    return g.op("Softmax", g.op("Where", visible, logits, g.const(F32_MIN, np.float32)), axis=-1)


def sort_ascending(g: GraphBuilder, picks: str, width: str) -> str:
    """picks [.., m] float positions (the sentinel for none) -> the `width` ([1] int64) smallest, ascending."""
    return g.op("TopK", picks, width, outputs=2, axis=-1, largest=0, sorted=1)[0]


def compact(g: GraphBuilder, picks: str, width: str, sentinel: str, *, clamp: bool = False,
            outputs: list[str] | None = None) -> str:
    """A kept set as slots: picks [.., m] float positions (`sentinel` [1] f32 = none) -> [.., width] int64, the
    picks ascending first, then -1 (or, with `clamp`, the last position sentinel - 1: an index safe to gather with,
    for rows whose unused slots are masked by their length instead)."""
    asc = sort_ascending(g, picks, width)
    if clamp:
        return g.op("Cast", g.op("Min", asc, g.op("Sub", sentinel, g.const(1.0, np.float32))),
                    to=TensorProto.INT64, **({"outputs": outputs} if outputs else {}))
    return g.op("Where", g.op("Less", asc, sentinel), g.op("Cast", asc, to=TensorProto.INT64), g.const(-1),
                **({"outputs": outputs} if outputs else {}))


def gather_kept(g: GraphBuilder, kept: str, sources: list[str], head_dim: int,
                outputs: list[str] | None = None) -> list[str]:
    """kept [B, C, k] int64 positions (-1 = unused) -> each source [B, C, n, d] gathered to [B, C, k, d], zero in
    the unused slots (in the source's dtype: fp32 and fp16 graphs alike)."""
    index = g.op("Expand", g.unsqueeze(g.op("Max", kept, g.const(0)), [3]),
                 g.concat(g.op("Shape", kept), g.const([head_dim])))
    used = g.unsqueeze(g.op("GreaterOrEqual", kept, g.const(0)), [3])  # [B, C, k, 1]
    out = []
    for i, src in enumerate(sources):
        gathered = g.op("GatherElements", src, index, axis=2)
        zero = g.op("CastLike", g.const(0.0, np.float32), gathered)
        out.append(g.op("Where", used, gathered, zero, **({"outputs": [outputs[i]]} if outputs else {})))
    return out


def window_positions(g: GraphBuilder, q: str, lengths: str, window: int) -> tuple[str, str, str]:
    """Each row's observation window, the last min(window, length) real tokens of right-padded rows: q [1] the
    padded length, lengths [B] -> (w' [1], prefix [B] = lengths - min(window, lengths), window positions [B, w']
    with -1 where a row has none)."""
    w_eff = g.op("Min", g.const([window]), q)
    prefix = g.op("Sub", lengths, g.op("Min", lengths, g.const(window)))
    pos = g.op("Add", g.op("Sub", g.unsqueeze(lengths, [1]), w_eff),
               g.unsqueeze(g.op("Range", g.const(0), g.scalar(w_eff), g.const(1)), [0]))  # [B, w']
    return w_eff, prefix, g.op("Max", pos, g.const(-1))


def top_with_window(g: GraphBuilder, scores: str, selected: str, keys: str, values: str, lengths: str,
                    q: str, heads: int, head_dim: int, window: int,
                    outputs: tuple[str, str, str] = ("kept_indices", "keys_out", "values_out")) -> list[str]:
    """The selection's top-k: scores [B, Hc, q] f32 (-inf outside each row's prefix), selected [B] int64 -> each
    row's top selected[b] picks (ties to the lower index) plus its window, compact and ascending, and K/V
    [B, Hc, q, d] gathered there -> `outputs` (kept [B, Hc, max(selected) + w'] int64, K, V)."""
    k = g.op("ReduceMax", selected, keepdims=1)  # [1]: the batch's largest budget
    _, idx = g.op("TopK", scores, k, outputs=2, axis=-1, largest=1, sorted=1)  # [B, Hc, k] by rank
    # Row b keeps its first selected[b] ranks; the rest become a sentinel that sorts last and then turns into -1.
    used = g.op("Less", g.unsqueeze(g.op("Range", g.const(0), g.scalar(k), g.const(1)), [0, 1]),
                g.unsqueeze(selected, [1, 2]))  # [B, 1, k]
    sentinel = g.op("Cast", q, to=TensorProto.FLOAT)
    picks = g.op("Where", used, g.op("Cast", idx, to=TensorProto.FLOAT), sentinel)
    return sort_with_window(g, picks, keys, values, lengths, q, heads, head_dim, window, outputs)


def sort_with_window(g: GraphBuilder, picks: str, keys: str, values: str, lengths: str, q: str, heads: int,
                     head_dim: int, window: int,
                     outputs: tuple[str, str, str] = ("kept_indices", "keys_out", "values_out")) -> list[str]:
    """picks [B, Hc, k] float positions (float(q) = unused) + each row's window (none for window 0) -> `outputs`:
    kept (ascending, compact, -1 after; without a window only as wide as the longest row) and K/V gathered from
    keys / values [B, Hc, q, d]."""
    sentinel = g.op("Cast", q, to=TensorProto.FLOAT)
    both = picks
    if window > 0:
        w_eff, _, win = window_positions(g, q, lengths, window)
        b = g.dim(keys, 0)
        win_f = g.op("Where", g.op("GreaterOrEqual", win, g.const(0)), g.op("Cast", win, to=TensorProto.FLOAT),
                     sentinel)
        win_f = g.op("Expand", g.unsqueeze(win_f, [1]), g.concat(b, g.const([heads]), w_eff))  # [B, Hc, w']
        both = g.op("Concat", picks, win_f, axis=-1)  # [B, Hc, k + w']
    width = g.dim(both, 2)
    if window == 0:  # ChunkKV: a partial chunk leaves slots unused; the output spans the longest row only
        used = g.op("Cast", g.op("Less", both, sentinel), to=TensorProto.INT64)
        width = g.reshape(g.op("ReduceMax", g.op("ReduceSum", used, g.const([2]), keepdims=0), keepdims=1),
                          g.const([1]))
    kept = compact(g, both, width, sentinel, outputs=[outputs[0]])  # [B, Hc, width]
    return [kept, *gather_kept(g, kept, [keys, values], head_dim, outputs=list(outputs[1:]))]
