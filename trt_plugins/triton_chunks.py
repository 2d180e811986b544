"""ChunkKV's chunk scores and chunk selection as GPU kernels (tested on CPU under TRITON_INTERPRET=1 against
`trt_plugins.chunkkv_select`).

The token scores are the selection's observation scores (`triton_scores`, kv-head granularity, window rows),
then per batch row:

1. `_chunk_sums`, grid (B x NT): program t takes a share of the chunks; each token of them is pooled per KV head
   from the raw scores (its neighbours read across chunk and share edges), masked to the prefix, summed over
   the KV heads, and each chunk sums its tokens -> `chunk_scores` [B, C] float32, C = ceil(q / chunk), +inf for
   the chunks holding a window token, -inf past the row; the first radix pass over them -> hist
   [B, 1, 1, NT, 256] (`triton_topk`'s search, one selection per batch row shared by every KV head);
   `_chunk_hist` is that pass alone, for scores computed by another layer (index reuse, `ChunkKVGather`);
2. the radix passes 1..3 of `triton_topk._radix_pass` (CHUNK > 0);
3. `_chunk_emit`, grid (B x NT): each kept chunk (the top `window chunks + budget // chunk`, ties to the lower
   chunk) at its rank r writes its tokens at slots r x chunk + offset for every KV head (every kept chunk but the
   row's last is whole, and the last is a window chunk, kept and last: the slots are contiguous), gathers their
   K/V, then -1 up to the output width.
"""

from __future__ import annotations

import triton
import triton.language as tl

from trt_plugins.triton_topk import _copy_rows, _counts, _digits, _kept, _picks_before, _pool, _share, _wanted


@triton.jit
def _chunk_sums(raw, lengths, selected, q_len, chunk_scores, hist,
                HKV: tl.constexpr, WINDOW: tl.constexpr, KERNEL: tl.constexpr, POOLING: tl.constexpr,
                CHUNK: tl.constexpr, CHUNK_P2: tl.constexpr, NT: tl.constexpr, BLOCK_C: tl.constexpr,
                ALIGN: tl.constexpr):
    pid = tl.program_id(0)
    b = pid // NT
    t = pid % NT
    n = tl.load(lengths + b).to(tl.int32)
    prefix = n - tl.minimum(n, WINDOW)
    first_window = prefix // CHUNK
    n_chunks, k = _wanted(lengths, selected, b, WINDOW, CHUNK)
    length = tl.cdiv(q_len, CHUNK)
    lo, hi = _share(t, length, NT, ALIGN)
    counts = tl.zeros([256], tl.int32)
    o = tl.arange(0, CHUNK_P2)
    for c0 in range(lo, hi, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        tok = c[:, None] * CHUNK + o[None, :]  # [BLOCK_C, CHUNK_P2]
        scored = (o < CHUNK)[None, :] & (tok < prefix)
        tokens = tl.zeros([BLOCK_C, CHUNK_P2], tl.float32)
        for h in range(HKV):  # the spec's sum over KV heads, head by head
            pooled = _pool(raw + (b.to(tl.int64) * HKV + h) * q_len, tok, q_len, KERNEL, POOLING)
            tokens += tl.where(scored, pooled, 0.0)
        sums = tl.sum(tokens, axis=1)
        sums = tl.where(c >= first_window, float("inf"), sums)
        sums = tl.where(c * CHUNK >= n, float("-inf"), sums)
        tl.store(chunk_scores + b.to(tl.int64) * length + c, sums, mask=c < hi)
        bits = sums.to(tl.int32, bitcast=True)
        counts += tl.histogram((bits >> 24) & 0xFF, 256, mask=(c < hi) & (c < n_chunks) & (k > 0))
    tl.store(hist + (b * NT + t) * 256 + tl.arange(0, 256), counts)


@triton.jit
def _chunk_hist(chunk_scores, lengths, selected, length, hist,
                WINDOW: tl.constexpr, CHUNK: tl.constexpr, NT: tl.constexpr, BLOCK_K: tl.constexpr,
                ALIGN: tl.constexpr):
    """The first radix pass over given chunk scores [B, C] -> hist [B, 1, 1, NT, 256]."""
    pid = tl.program_id(0)
    b = pid // NT
    t = pid % NT
    n_chunks, k = _wanted(lengths, selected, b, WINDOW, CHUNK)
    counts = _counts(chunk_scores, b, t, length, n_chunks, k, 0, 0, NT, BLOCK_K, ALIGN)
    tl.store(hist + (b * NT + t) * 256 + tl.arange(0, 256), counts)


@triton.jit
def _chunk_emit(keys, values, lengths, selected, chunk_scores, hist, q_len, width, kept, keys_out, values_out,
                HKV: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr, WINDOW: tl.constexpr,
                CHUNK: tl.constexpr, CHUNK_P2: tl.constexpr, NT: tl.constexpr, BLOCK_C: tl.constexpr,
                ALIGN: tl.constexpr):
    """kept [B, Hkv, W] int64 (every head the same tokens), keys_out / values_out [B, Hkv, W, d]."""
    pid = tl.program_id(0)
    b = pid // NT
    t = pid % NT
    n = tl.load(lengths + b).to(tl.int32)
    n_chunks, k = _wanted(lengths, selected, b, WINDOW, CHUNK)
    o = tl.arange(0, CHUNK_P2)
    lo, hi = _share(t, tl.cdiv(q_len, CHUNK), NT, ALIGN)
    if (k > 0) & (lo < n_chunks):
        top, need = _digits(hist, b, k, 4, NT)
        rank0, ties = _picks_before(hist, b, t, top, need, NT)
        for c0 in range(lo, hi, BLOCK_C):
            c = c0 + tl.arange(0, BLOCK_C)
            bits = tl.load(chunk_scores + b.to(tl.int64) * tl.cdiv(q_len, CHUNK) + c, mask=c < hi,
                           other=0.0).to(tl.int32, bitcast=True)
            keep, equal = _kept(bits, (c < hi) & (c < n_chunks), top, need, ties)
            r = keep.to(tl.int32)
            rank = rank0 + tl.cumsum(r, axis=0) - r
            tok = c[:, None] * CHUNK + o[None, :]
            ok = keep[:, None] & (o < CHUNK)[None, :] & (tok < n) & (rank[:, None] * CHUNK + o[None, :] < width)
            tok = tl.reshape(tok, [BLOCK_C * CHUNK_P2])
            slot = tl.reshape(tl.where(ok, rank[:, None] * CHUNK + o[None, :], -1), [BLOCK_C * CHUNK_P2])
            ok = tl.reshape(ok, [BLOCK_C * CHUNK_P2])
            for h in range(HKV):
                bh = b.to(tl.int64) * HKV + h
                tl.store(kept + bh * width + slot, tok.to(tl.int64), mask=ok)
                _copy_rows(keys + bh * q_len * D, keys_out + bh * width * D, tok, slot, ok, D, BLOCK_D)
                _copy_rows(values + bh * q_len * D, values_out + bh * width * D, tok, slot, ok, D, BLOCK_D)
            rank0 += tl.sum(r, axis=0)
            ties += tl.sum(equal, axis=0)
    total = tl.maximum(k * CHUNK - (n_chunks * CHUNK - n), 0)  # tokens kept: the last chunk may be partial
    for s0 in range(total + t * BLOCK_C, width, NT * BLOCK_C):  # unused slots: -1, zero K/V
        s = s0 + tl.arange(0, BLOCK_C)
        slot = tl.where(s < width, s, -1)
        for h in range(HKV):
            bh = b.to(tl.int64) * HKV + h
            tl.store(kept + bh * width + s, tl.full([BLOCK_C], -1, tl.int64), mask=s < width)
            _copy_rows(keys, keys_out + bh * width * D, s, slot, s < 0, D, BLOCK_D)
            _copy_rows(values, values_out + bh * width * D, s, slot, s < 0, D, BLOCK_D)
