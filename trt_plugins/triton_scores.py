"""Observation scores of the selection as two GPU kernels whose programs split the prompt (tested on CPU under
TRITON_INTERPRET=1 against `trt_plugins.pyramidkv_select.observation_scores` through the whole op).

The spec's step: every observation row (a query head x an observed position) takes a softmax over the keys its
position sees (float32, causal, row length masked), and a key's raw score is the sum of the probabilities it gets
from the rows of its cache head, divided by the rows' head count (the query group's mean for kv-head
granularity). A softmax needs its row's max and sum over *all* keys before any probability is known, so:

1. `_obs_partials`, grid (B x Hc x NS): each program takes a share of the work and writes, per row, the max `m`
   and the sum `s` of exp(logit - m) over the keys it saw, into `partials` [B, Hc, 2, PS, R] float32
   (R = rows, obs-major: r = observed index x heads + head offset). With `observe="window"` the rows are few
   (heads x window) and the keys many, so program p takes the p-th of NS key ranges and all rows (PS = NS
   partial slots per row); with `observe="all"` (H2O) every position observes, so program p takes the p-th of
   NS row ranges and all the keys each row sees (PS = 1);
2. `_obs_scores`, grid (B x Hc x NS): program p takes the p-th key range, merges each row's partial (max, sum)
   pairs (m = max m_i, s = sum s_i exp(m_i - m)), recomputes the logits of its keys and adds up the
   probabilities; it writes `raw` [B, Hc, q] float32: the score inside the row's prefix, 0 after it (the spec's
   masking before pooling). Keys past the prefix need no dot product: their score is 0 by definition.

Both read K once (a key range per program), in float32 with IEEE dot products and no fused multiply-add, as the
spec computes. Tensors are contiguous: queries [B, q, H, d], keys [B, Hkv, q, d], lengths [B] int64.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _row_heads(r, n, n_obs, first_head, HEADS: tl.constexpr, OBSERVE_ALL: tl.constexpr):
    """Observation rows r (obs-major) -> (query head, absolute position) of each."""
    obs = r // HEADS
    head = first_head + r % HEADS
    pos = obs if OBSERVE_ALL else n - n_obs + obs
    return head, pos


@triton.jit
def _load_rows(queries, b, q_len, head, pos, ok, H: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr):
    """The rows' queries [BLOCK_R, BLOCK_D] float32 (0 where not ok)."""
    d = tl.arange(0, BLOCK_D)
    base = queries + b.to(tl.int64) * q_len * (H * D)
    offs = pos[:, None].to(tl.int64) * (H * D) + head[:, None] * D + d[None, :]
    return tl.load(base + offs, mask=ok[:, None] & (d < D)[None, :], other=0.0).to(tl.float32)


@triton.jit
def _logits(q_rows, k_base, j, q_len, D: tl.constexpr, BLOCK_D: tl.constexpr, SCALE: tl.constexpr):
    """q_rows [BLOCK_R, BLOCK_D] f32 . keys j [BLOCK_K] -> logits [BLOCK_R, BLOCK_K] f32 (IEEE, no TF32)."""
    d = tl.arange(0, BLOCK_D)
    keys = tl.load(k_base + j[:, None].to(tl.int64) * D + d[None, :], mask=(j < q_len)[:, None] & (d < D)[None, :],
                   other=0.0).to(tl.float32)
    return tl.dot(q_rows, tl.trans(keys), input_precision="ieee") * SCALE


@triton.jit
def _program(HC: tl.constexpr, GROUP: tl.constexpr, QUERY_HEAD: tl.constexpr, PROGRAMS: tl.constexpr):
    """(row-head index bh, batch row b, KV head read, first query head scored, program index within bh)."""
    pid = tl.program_id(0)
    bh = pid // PROGRAMS
    hc = bh % HC
    kvh = hc // GROUP if QUERY_HEAD else hc
    first_head = hc if QUERY_HEAD else hc * GROUP
    return bh, bh // HC, kvh, first_head, pid % PROGRAMS


@triton.jit
def _obs_partials(queries, keys, lengths, q_len, partials,
                  SCALE: tl.constexpr, H: tl.constexpr, HKV: tl.constexpr, HC: tl.constexpr, GROUP: tl.constexpr,
                  HEADS: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr, WINDOW: tl.constexpr,
                  OBSERVE_ALL: tl.constexpr, QUERY_HEAD: tl.constexpr, NS: tl.constexpr, PS: tl.constexpr,
                  BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, ALIGN: tl.constexpr):
    bh, b, kvh, first_head, p = _program(HC, GROUP, QUERY_HEAD, NS)
    n = tl.load(lengths + b).to(tl.int32)
    n_obs = q_len if OBSERVE_ALL else tl.minimum(q_len, WINDOW)
    rows = HEADS * n_obs
    if OBSERVE_ALL:  # program p: a range of rows, every key each row sees
        share = tl.cdiv(tl.cdiv(rows, NS), BLOCK_R) * BLOCK_R
        row_lo = p * share
        row_hi = tl.minimum(rows, row_lo + share)
        key_lo = 0
        key_hi = tl.minimum(q_len, n)
        slot = 0
    else:  # program p: a range of keys, every row
        share = tl.cdiv(tl.cdiv(q_len, NS), ALIGN) * ALIGN
        row_lo = 0
        row_hi = rows
        key_lo = p * share
        key_hi = tl.minimum(tl.minimum(q_len, key_lo + share), n)
        slot = p
    k_base = keys + (b.to(tl.int64) * HKV + kvh) * q_len * D
    out = partials + bh.to(tl.int64) * (2 * PS) * rows
    if (row_lo < row_hi) & (key_lo < key_hi):  # a share past the row: nothing to do (and nothing is read back)
        for r0 in range(row_lo, row_hi, BLOCK_R):
            r = r0 + tl.arange(0, BLOCK_R)
            head, pos = _row_heads(r, n, n_obs, first_head, HEADS, OBSERVE_ALL)
            ok = (r < row_hi) & (pos >= 0) & (pos < n)
            q_rows = _load_rows(queries, b, q_len, head, pos, ok, H, D, BLOCK_D)
            m = tl.full([BLOCK_R], float("-inf"), tl.float32)
            s = tl.zeros([BLOCK_R], tl.float32)
            end = key_hi
            if OBSERVE_ALL:  # causal: no row of this block sees past its last position
                end = tl.minimum(key_hi, (tl.minimum(row_hi, r0 + BLOCK_R) - 1) // HEADS + 1)
            for j0 in range(key_lo, end, BLOCK_K):
                j = j0 + tl.arange(0, BLOCK_K)
                logits = _logits(q_rows, k_base, j, q_len, D, BLOCK_D, SCALE)
                visible = (j[None, :] <= pos[:, None]) & (j[None, :] < end) & ok[:, None]
                logits = tl.where(visible, logits, float("-inf"))
                m_new = tl.maximum(m, tl.max(logits, axis=1))
                m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
                s = s * tl.exp(m - m_safe) + tl.sum(tl.exp(logits - m_safe[:, None]), axis=1)
                m = m_new
            tl.store(out + slot * rows + r, m, mask=r < row_hi)
            tl.store(out + (PS + slot) * rows + r, s, mask=r < row_hi)


@triton.jit
def _mass(q_rows, pos, ok, m, s, k_base, j, n, q_len, D: tl.constexpr, BLOCK_D: tl.constexpr, SCALE: tl.constexpr):
    """The probability mass keys j [BLOCK_K] get from the rows (softmax max m, sum s per row) -> [BLOCK_K] f32."""
    logits = _logits(q_rows, k_base, j, q_len, D, BLOCK_D, SCALE)
    visible = (j[None, :] <= pos[:, None]) & (j[None, :] < n) & ok[:, None]
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    s_safe = tl.where(s > 0, s, 1.0)
    probs = tl.where(visible, tl.exp(logits - m_safe[:, None]) / s_safe[:, None], 0.0)
    return tl.sum(probs, axis=0)


@triton.jit
def _obs_scores(queries, keys, lengths, partials, q_len, raw,
                SCALE: tl.constexpr, H: tl.constexpr, HKV: tl.constexpr, HC: tl.constexpr, GROUP: tl.constexpr,
                HEADS: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr, WINDOW: tl.constexpr,
                OBSERVE_ALL: tl.constexpr, QUERY_HEAD: tl.constexpr, NS: tl.constexpr, PS: tl.constexpr,
                BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, ALIGN: tl.constexpr):
    bh, b, kvh, first_head, p = _program(HC, GROUP, QUERY_HEAD, NS)
    n = tl.load(lengths + b).to(tl.int32)
    n_obs = q_len if OBSERVE_ALL else tl.minimum(q_len, WINDOW)
    rows = HEADS * n_obs
    prefix = n - tl.minimum(n, WINDOW)
    share = tl.cdiv(tl.cdiv(q_len, NS), ALIGN) * ALIGN
    key_lo = p * share
    key_hi = tl.minimum(q_len, key_lo + share)
    scored = tl.minimum(key_hi, prefix)  # keys [key_lo, scored) need the dot products; the rest score 0
    k_base = keys + (b.to(tl.int64) * HKV + kvh) * q_len * D
    part = partials + bh.to(tl.int64) * (2 * PS) * rows
    out = raw + bh.to(tl.int64) * q_len
    if OBSERVE_ALL:  # many rows: per key block, every row block that can see it (PS = 1: the rows' exact m, s)
        for j0 in range(key_lo, scored, BLOCK_K):
            j = j0 + tl.arange(0, BLOCK_K)
            acc = tl.zeros([BLOCK_K], tl.float32)
            for r0 in range((j0 * HEADS) // BLOCK_R * BLOCK_R, tl.minimum(rows, n * HEADS), BLOCK_R):
                r = r0 + tl.arange(0, BLOCK_R)
                head, pos = _row_heads(r, n, n_obs, first_head, HEADS, OBSERVE_ALL)
                ok = (r < rows) & (pos >= 0) & (pos < n)
                q_rows = _load_rows(queries, b, q_len, head, pos, ok, H, D, BLOCK_D)
                m = tl.load(part + r, mask=ok, other=float("-inf"))
                s = tl.load(part + rows + r, mask=ok, other=0.0)
                acc += _mass(q_rows, pos, ok, m, s, k_base, j, n, q_len, D, BLOCK_D, SCALE)
            tl.store(out + j, tl.where(j < prefix, acc / HEADS, 0.0), mask=j < key_hi)
    elif key_lo < scored:  # few rows (BLOCK_R >= heads x window): merge every row's partials, then walk the keys
        r = tl.arange(0, BLOCK_R)
        head, pos = _row_heads(r, n, n_obs, first_head, HEADS, OBSERVE_ALL)
        ok = (r < rows) & (pos >= 0) & (pos < n)
        q_rows = _load_rows(queries, b, q_len, head, pos, ok, H, D, BLOCK_D)
        slots = tl.arange(0, PS)
        written = (slots < tl.cdiv(n, share))[:, None] & ok[None, :]  # the key shares holding real keys
        m_i = tl.load(part + slots[:, None] * rows + r[None, :], mask=written, other=float("-inf"))
        s_i = tl.load(part + (PS + slots[:, None]) * rows + r[None, :], mask=written, other=0.0)
        m = tl.max(m_i, axis=0)
        m_safe = tl.where(m == float("-inf"), 0.0, m)
        s = tl.sum(s_i * tl.exp(m_i - m_safe[None, :]), axis=0)
        for j0 in range(key_lo, scored, BLOCK_K):
            j = j0 + tl.arange(0, BLOCK_K)
            acc = _mass(q_rows, pos, ok, m, s, k_base, j, n, q_len, D, BLOCK_D, SCALE)
            tl.store(out + j, tl.where(j < prefix, acc / HEADS, 0.0), mask=j < key_hi)
    rest = key_lo + tl.cdiv(tl.maximum(scored - key_lo, 0), BLOCK_K) * BLOCK_K
    for j0 in range(rest, key_hi, BLOCK_K):  # past the prefix: no score
        j = j0 + tl.arange(0, BLOCK_K)
        tl.store(out + j, tl.zeros([BLOCK_K], tl.float32), mask=j < key_hi)
