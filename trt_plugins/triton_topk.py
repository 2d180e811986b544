"""The selection's top-k, spread over the GPU: pooling, a radix search for the k-th largest score done by NT
programs per row, and the compaction + gather (tested on CPU under TRITON_INTERPRET=1 against the op spec).

Scores are >= 0 (probabilities, their sums and pools; +inf marks ChunkKV's window chunks), so their float32 bits,
read as int32, order like the floats. The k-th largest value T is found 8 bits at a time, most significant
first: pass i histograms digit i (256 bins) of the values whose higher digits equal T's, one histogram per
program over its own share of the row ([B, rows, passes, NT, 256] int32, no atomics: each program writes only
its slice). The next kernel sums the NT histograms and picks the digit where the count from the top reaches the
rank still wanted. After 4 passes T is exact and `need`, the number of values equal to T still to take, too.

The spec keeps ties at the lower position (`topk_lowest_index_first`): a value is kept when it is > T, or == T
and fewer than `need` values == T lie before it. The histograms already hold, per program, how many of its
values are > T (digit i above T's after equal higher digits) and == T (the last pass at T's digit), so the emit
kernel knows how many picks every earlier program makes and writes its own at their final, ascending slots
without another pass: the kept positions, the row's window after them, then -1 (zero K/V).

Positions a program owns: [t x share, (t + 1) x share), share = ceil(ceil(n / NT) / ALIGN) x ALIGN, the same in
every kernel of a chain (the counts of one kernel index the shares of another).
"""

from __future__ import annotations

import triton
import triton.language as tl

BINS = 256  # one radix digit: 8 bits
PASSES = 4  # digits of a float32


@triton.jit
def _share(t, length, NT: tl.constexpr, ALIGN: tl.constexpr):
    """Positions [lo, hi) of program t among NT over a row of `length` values."""
    share = tl.cdiv(tl.cdiv(length, NT), ALIGN) * ALIGN
    lo = t * share
    return lo, tl.minimum(length, lo + share)


@triton.jit
def _wanted(lengths, selected, b, WINDOW: tl.constexpr, CHUNK: tl.constexpr):
    """(values a row selects from, how many it keeps): its prefix and budget, or for ChunkKV (CHUNK > 0) its
    chunks and the chunk count `chunkkv_from_scores` keeps (window chunks + whole chunks of the budget)."""
    n = tl.load(lengths + b).to(tl.int32)
    sel = tl.load(selected + b).to(tl.int32)
    w_eff = tl.minimum(n, WINDOW)
    if CHUNK > 0:
        first = (n - w_eff) // CHUNK
        window_chunks = tl.cdiv(n, CHUNK) - first
        others = tl.maximum(sel + w_eff - (n - first * CHUNK), 0) // CHUNK
        return tl.cdiv(n, CHUNK), window_chunks + others
    return n - w_eff, sel


@triton.jit
def _pool(raw_row, j, q_len, KERNEL: tl.constexpr, POOLING: tl.constexpr):
    """Pooled scores at positions j: max / avg (count_include_pad) over KERNEL neighbours, stride 1, padding
    KERNEL // 2 (POOLING 0: none), the spec's `pool_scores` on rows already 0 past their prefix."""
    if POOLING == 0:
        pooled = tl.load(raw_row + j, mask=j < q_len, other=0.0)
    else:
        pooled = tl.full(j.shape, float("-inf"), tl.float32) if POOLING == 1 else tl.zeros(j.shape, tl.float32)
        for t in tl.static_range(KERNEL):
            nb = j + t - KERNEL // 2
            inside = (nb >= 0) & (nb < q_len)
            val = tl.load(raw_row + nb, mask=inside, other=0.0)
            if POOLING == 1:
                pooled = tl.maximum(pooled, tl.where(inside, val, float("-inf")))
            else:
                pooled = pooled + val
        if POOLING == 2:
            pooled = pooled / KERNEL
    return pooled


@triton.jit
def _digits(hist, bh, k, STORED: tl.constexpr, NT: tl.constexpr):
    """The top 8 x STORED bits of the k-th largest value, from the first STORED passes' histograms
    ([bh, STORED, NT, 256]), and how many values sharing those bits are still wanted."""
    x = tl.arange(0, 256)
    t = tl.arange(0, NT)
    top = tl.zeros([], tl.int32)
    for i in tl.static_range(STORED):
        counts = tl.sum(tl.load(hist + ((bh * STORED + i) * NT + t[:, None]) * 256 + x[None, :]), axis=0)
        at_least = tl.sum(counts, axis=0) - tl.cumsum(counts, axis=0) + counts  # values with digit >= x
        d = tl.max(tl.where(at_least >= k, x, -1), axis=0)
        k = k - tl.sum(tl.where(x > d, counts, 0), axis=0)
        top = (top << 8) | d
    return top, k


@triton.jit
def _counts(ranked, bh, t, length, n_valid, k, top, PASS: tl.constexpr, NT: tl.constexpr, BLOCK_K: tl.constexpr,
            ALIGN: tl.constexpr):
    """Program t's histogram of digit PASS over its share of row bh of values [.., length] f32, counting the
    first n_valid positions whose higher digits equal `top`'s (none when k == 0: nothing is wanted)."""
    counts = tl.zeros([256], tl.int32)
    lo, hi = _share(t, length, NT, ALIGN)
    row = ranked + bh.to(tl.int64) * length
    for j0 in range(lo, hi, BLOCK_K):
        j = j0 + tl.arange(0, BLOCK_K)
        bits = tl.load(row + j, mask=j < hi, other=0.0).to(tl.int32, bitcast=True)
        match = (j < hi) & (j < n_valid) & (k > 0)
        if PASS > 0:
            match = match & ((bits >> (32 - 8 * PASS)) == top)
        counts += tl.histogram((bits >> (24 - 8 * PASS)) & 0xFF, 256, mask=match)
    return counts


@triton.jit
def _radix_pass(ranked, lengths, selected, hist_in, length, hist,
                PASS: tl.constexpr, WINDOW: tl.constexpr, ROWS: tl.constexpr, NT: tl.constexpr,
                BLOCK_K: tl.constexpr, ALIGN: tl.constexpr, CHUNK: tl.constexpr):
    """Pass PASS (1..3): digit PASS's histogram of the values matching the digits the earlier passes fixed.
    ranked [B, ROWS, length] f32 (pooled token scores, or ChunkKV's chunk scores), hist_in [B, ROWS, PASS, NT, 256]
    -> hist [B, ROWS, PASS + 1, NT, 256] (the earlier passes copied first)."""
    pid = tl.program_id(0)
    bh = pid // NT
    t = pid % NT
    n_valid, k = _wanted(lengths, selected, bh // ROWS, WINDOW, CHUNK)
    x = tl.arange(0, 256)
    for i in tl.static_range(PASS):
        prev = tl.load(hist_in + ((bh * PASS + i) * NT + t) * 256 + x)
        tl.store(hist + ((bh * (PASS + 1) + i) * NT + t) * 256 + x, prev)
    counts = tl.zeros([256], tl.int32)
    if t * tl.cdiv(tl.cdiv(length, NT), ALIGN) * ALIGN < tl.minimum(length, n_valid):  # a share with values
        top, _ = _digits(hist_in, bh, k, PASS, NT)
        counts = _counts(ranked, bh, t, length, n_valid, k, top, PASS, NT, BLOCK_K, ALIGN)
    tl.store(hist + ((bh * (PASS + 1) + PASS) * NT + t) * 256 + x, counts)


@triton.jit
def _pool_hist(raw, lengths, selected, q_len, pooled, hist,
               WINDOW: tl.constexpr, KERNEL: tl.constexpr, POOLING: tl.constexpr, HC: tl.constexpr,
               NT: tl.constexpr, BLOCK_K: tl.constexpr, ALIGN: tl.constexpr):
    """raw [B, Hc, q] f32 -> pooled [B, Hc, q] f32 and the first radix pass, hist [B, Hc, 1, NT, 256] int32."""
    pid = tl.program_id(0)
    bh = pid // NT
    t = pid % NT
    prefix, k = _wanted(lengths, selected, bh // HC, WINDOW, 0)
    counts = tl.zeros([256], tl.int32)
    lo, hi = _share(t, q_len, NT, ALIGN)
    for j0 in range(lo, hi, BLOCK_K):
        j = j0 + tl.arange(0, BLOCK_K)
        p = _pool(raw + bh.to(tl.int64) * q_len, j, q_len, KERNEL, POOLING)
        tl.store(pooled + bh.to(tl.int64) * q_len + j, p, mask=j < hi)
        bits = p.to(tl.int32, bitcast=True)
        counts += tl.histogram((bits >> 24) & 0xFF, 256, mask=(j < hi) & (j < prefix) & (k > 0))
    tl.store(hist + (bh * NT + t) * 256 + tl.arange(0, 256), counts)


@triton.jit
def _picks_before(hist, bh, t, top, need, NT: tl.constexpr):
    """(picks, values == T) in the shares of the programs before t, from the 4 passes' histograms."""
    x = tl.arange(0, 256)
    tt = tl.arange(0, NT)
    above = tl.zeros([NT], tl.int32)
    for i in tl.static_range(4):
        counts = tl.load(hist + ((bh * 4 + i) * NT + tt[:, None]) * 256 + x[None, :])
        above += tl.sum(tl.where(x[None, :] > ((top >> (24 - 8 * i)) & 0xFF), counts, 0), axis=1)
    last = tl.load(hist + ((bh * 4 + 3) * NT + tt[:, None]) * 256 + x[None, :])
    equal = tl.sum(tl.where(x[None, :] == (top & 0xFF), last, 0), axis=1)
    equal_before = tl.cumsum(equal, axis=0) - equal
    picks = above + tl.minimum(tl.maximum(need - equal_before, 0), equal)
    earlier = tt < t
    return tl.sum(tl.where(earlier, picks, 0), axis=0), tl.sum(tl.where(earlier, equal, 0), axis=0)


@triton.jit
def _kept(bits, valid, top, need, ties):
    """Which of a block's values are kept, and the values == T in it (ties: those == T before the block)."""
    equal = (valid & (bits == top)).to(tl.int32)
    rank = ties + tl.cumsum(equal, axis=0) - equal
    return (valid & (bits > top)) | ((equal > 0) & (rank < need)), equal


@triton.jit
def _copy_rows(src, dst, rows, slots, ok, D: tl.constexpr, BLOCK_D: tl.constexpr):
    """dst[slots] = src[rows] for the rows where ok; dst[slots] = 0 where not (slots must be valid then)."""
    d = tl.arange(0, BLOCK_D)
    d_ok = (d < D)[None, :]
    vals = tl.load(src + rows[:, None].to(tl.int64) * D + d[None, :], mask=ok[:, None] & d_ok, other=0.0)
    tl.store(dst + slots[:, None].to(tl.int64) * D + d[None, :], vals, mask=(slots >= 0)[:, None] & d_ok)


@triton.jit
def _select_emit(keys, values, lengths, selected, pooled, hist, q_len, width, kept, keys_out, values_out,
                 HKV: tl.constexpr, HC: tl.constexpr, GROUP: tl.constexpr, QUERY_HEAD: tl.constexpr,
                 D: tl.constexpr, BLOCK_D: tl.constexpr, WINDOW: tl.constexpr, NT: tl.constexpr,
                 BLOCK_K: tl.constexpr, ALIGN: tl.constexpr):
    """The kept positions, ascending, then the window, then -1 -> kept [B, Hc, W] int64, and K/V gathered there
    (zero in unused slots) -> keys_out / values_out [B, Hc, W, d]. hist: the 4 passes [B, Hc, 4, NT, 256]."""
    pid = tl.program_id(0)
    bh = pid // NT
    t = pid % NT
    b = bh // HC
    hc = bh % HC
    kvh = hc // GROUP if QUERY_HEAD else hc
    n = tl.load(lengths + b).to(tl.int32)
    prefix, sel = _wanted(lengths, selected, b, WINDOW, 0)
    src = (b.to(tl.int64) * HKV + kvh) * q_len * D
    out = bh.to(tl.int64) * width
    lo, hi = _share(t, q_len, NT, ALIGN)
    if (sel > 0) & (lo < prefix):
        top, need = _digits(hist, bh, sel, 4, NT)
        slot0, ties = _picks_before(hist, bh, t, top, need, NT)
        for j0 in range(lo, hi, BLOCK_K):
            j = j0 + tl.arange(0, BLOCK_K)
            bits = tl.load(pooled + bh.to(tl.int64) * q_len + j, mask=j < hi, other=0.0).to(tl.int32, bitcast=True)
            keep, equal = _kept(bits, (j < hi) & (j < prefix), top, need, ties)
            k = keep.to(tl.int32)
            slot = slot0 + tl.cumsum(k, axis=0) - k
            keep = keep & (slot < width)  # never past the output, even for a budget wider than it was built for
            slot = tl.where(keep, slot, -1)
            tl.store(kept + out + slot, j.to(tl.int64), mask=keep)
            _copy_rows(keys + src, keys_out + out * D, j, slot, keep, D, BLOCK_D)
            _copy_rows(values + src, values_out + out * D, j, slot, keep, D, BLOCK_D)
            slot0 += tl.sum(k, axis=0)
            ties += tl.sum(equal, axis=0)
    w_eff = tl.minimum(n, WINDOW)
    for s0 in range(sel + t * BLOCK_K, width, NT * BLOCK_K):  # the window after the picks, then unused slots
        s = s0 + tl.arange(0, BLOCK_K)
        in_window = s < sel + w_eff
        pos = prefix + s - sel
        tl.store(kept + out + s, tl.where(in_window, pos, -1).to(tl.int64), mask=s < width)
        slot = tl.where(s < width, s, -1)
        _copy_rows(keys + src, keys_out + out * D, pos, slot, in_window, D, BLOCK_D)
        _copy_rows(values + src, values_out + out * D, pos, slot, in_window, D, BLOCK_D)
