"""StreamingLLM's selection as one GPU kernel: its picks are positions known in closed form, so no score needs
ranking (tested on CPU under TRITON_INTERPRET=1 against `trt_plugins.streaming_select`).

The spec scores position j of the prefix [0, p) as j + 2q for the first `sinks` (they outrank every other
position) and j otherwise, and keeps the top `sel` (ties cannot occur: the scores are distinct). With
s = min(sinks, p) sink positions in the prefix, that is

* sel <= s: the sel highest sinks, positions [s - sel, s);
* sel > s: every sink, [0, s), and the sel - s latest positions, [p - (sel - s), p) (which start at or after s,
  as sel <= p);

ascending, then the row's window [p, n), then -1. Slot t of the output holds a position computed from t alone,
so the NT programs of a (row, head) each take every NT-th block of slots and gather their K/V rows: the kernel
reads only the kept rows. It also writes the plugin's `scores` output [B, Hkv, 2, q] float32 (the positional
score in the prefix, 0 after it; pooled = raw), as the ONNX function does.
"""

from __future__ import annotations

import triton
import triton.language as tl

from trt_plugins.triton_topk import _copy_rows


@triton.jit
def _streaming_select(keys, values, lengths, selected, q_len, width, kept, keys_out, values_out, scores,
                      HKV: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr, WINDOW: tl.constexpr,
                      SINKS: tl.constexpr, NT: tl.constexpr, BLOCK_K: tl.constexpr):
    pid = tl.program_id(0)
    bh = pid // NT
    t = pid % NT
    b = bh // HKV
    n = tl.load(lengths + b).to(tl.int32)
    sel = tl.load(selected + b).to(tl.int32)
    w_eff = tl.minimum(n, WINDOW)
    prefix = n - w_eff
    sinks = tl.minimum(prefix, SINKS)
    row = bh.to(tl.int64) * q_len
    for j0 in range(t * BLOCK_K, q_len, NT * BLOCK_K):
        j = j0 + tl.arange(0, BLOCK_K)
        pos = j.to(tl.float32)
        score = tl.where(j < prefix, tl.where(j < SINKS, pos + 2.0 * q_len, pos), 0.0)
        tl.store(scores + 2 * row + j, score, mask=j < q_len)
        tl.store(scores + 2 * row + q_len + j, score, mask=j < q_len)
    out = bh.to(tl.int64) * width
    src = bh.to(tl.int64) * q_len * D
    for s0 in range(t * BLOCK_K, width, NT * BLOCK_K):
        s = s0 + tl.arange(0, BLOCK_K)
        pick = tl.where(sel <= sinks, sinks - sel + s, tl.where(s < sinks, s, prefix - sel + s))
        pos = tl.where(s < sel, pick, tl.where(s < sel + w_eff, prefix + s - sel, -1))
        tl.store(kept + out + s, pos.to(tl.int64), mask=s < width)
        slot = tl.where(s < width, s, -1)
        _copy_rows(keys + src, keys_out + out * D, pos, slot, pos >= 0, D, BLOCK_D)
        _copy_rows(values + src, values_out + out * D, pos, slot, pos >= 0, D, BLOCK_D)
