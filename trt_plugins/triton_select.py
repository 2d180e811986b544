"""`PyramidKVSelect` and StreamingLLM's selection as one Triton-lang GPU kernel (tested on CPU under
TRITON_INTERPRET=1 against `trt_plugins.pyramidkv_select`).

One program per (batch row, cache head) does the whole op, so a TensorRT AOT plugin can bake it as its single
kernel:

1. observation scores: the observation rows (the query heads this cache head serves x the observed positions)
   go in blocks; for each block a first pass over the keys finds every row's softmax max and sum (causal, row
   length masked, float32, IEEE dot products), a second pass adds the probabilities into the scratch row
   `scores[b, hc, 0, :]` (mean over the query group for kv-head granularity);
2. pooling of the prefix (max or avg, the spec's padding rule) into `scores[b, hc, 1, :]`;
3. top-k with ties to the lower position: every prefix position gets the unique int64 key
   (float bits of its pooled score << 32) | (q - 1 - position) (scores are >= 0, so the bits order like the
   floats); a binary search over the key space finds the k-th largest key; one more pass writes the kept
   positions in ascending order (a running prefix sum), then the window, then -1;
4. gather of K/V into the compact output (zeros in unused slots).

`scores` is a [B, Hc, 2, q] float32 scratch output (the TensorRT plugin exposes it as an extra output, which
also makes the scores inspectable). StreamingLLM runs the same kernel with positional scores.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from trt_plugins.pyramidkv_select import GRANULARITIES, OBSERVE, POOLINGS, as_row_budgets, check_budgets

POOLING_CODES = {"none": 0, "max": 1, "avg": 2}


@triton.jit
def _select_kernel(
    # inputs, then int32 scalars, then outputs: the argument order TensorRT's AOT plugins pass
    q_ptr, k_ptr, v_ptr, len_ptr, sel_ptr,
    q_len, width, sq_b, sq_s, sq_h, sk_b, sk_h, sk_s, so_b, so_h, so_s,
    idx_ptr, ko_ptr, vo_ptr, sc_ptr,
    SCALE: tl.constexpr, H: tl.constexpr, HC: tl.constexpr, GROUP: tl.constexpr, D: tl.constexpr,
    BLOCK_D: tl.constexpr,
    WINDOW: tl.constexpr, KERNEL: tl.constexpr, POOLING: tl.constexpr, OBSERVE_ALL: tl.constexpr,
    QUERY_HEAD: tl.constexpr, POSITIONAL: tl.constexpr, SINKS: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    b = pid // HC
    hc = pid % HC
    b64 = b.to(tl.int64)  # batch offsets in int64: B x q x H x d may exceed int32
    n = tl.load(len_ptr + b).to(tl.int32)  # real tokens of this row
    sel = tl.load(sel_ptr + b).to(tl.int32)  # prefix tokens to keep
    w_eff = tl.minimum(n, WINDOW)
    prefix = n - w_eff
    kvh = hc // GROUP if QUERY_HEAD else hc  # the KV head whose keys this program reads
    heads = 1 if QUERY_HEAD else GROUP  # query heads scored by this program
    first_head = hc if QUERY_HEAD else hc * GROUP
    raw_ptr = sc_ptr + (b * HC + hc) * 2 * q_len
    pooled_ptr = raw_ptr + q_len
    d_offs = tl.arange(0, BLOCK_D)
    d_ok = d_offs < D
    k_base = k_ptr + b64 * sk_b + kvh * sk_h

    # 1. observation scores into raw[0:q]
    for j0 in range(0, q_len, BLOCK_K):
        j = j0 + tl.arange(0, BLOCK_K)
        tl.store(raw_ptr + j, tl.zeros([BLOCK_K], tl.float32), mask=j < q_len)
    tl.debug_barrier()
    if POSITIONAL:  # StreamingLLM: sinks outrank everything, then recency
        for j0 in range(0, q_len, BLOCK_K):
            j = j0 + tl.arange(0, BLOCK_K)
            pos = j.to(tl.float32)
            score = tl.where(j < SINKS, pos + 2.0 * q_len, pos)
            tl.store(raw_ptr + j, score, mask=j < q_len)
    else:
        n_obs = q_len if OBSERVE_ALL else tl.minimum(q_len, WINDOW)
        total_rows = heads * n_obs
        for r0 in range(0, total_rows, BLOCK_R):
            r = r0 + tl.arange(0, BLOCK_R)
            head = first_head + r // n_obs
            obs = r % n_obs
            pos = obs if OBSERVE_ALL else n - n_obs + obs  # absolute position of each observation query
            row_ok = (r < total_rows) & (pos >= 0) & (pos < n)
            q_rows = tl.load(q_ptr + b64 * sq_b + pos[:, None] * sq_s + head[:, None] * sq_h + d_offs[None, :],
                             mask=row_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
            m = tl.full([BLOCK_R], float("-inf"), tl.float32)
            s = tl.zeros([BLOCK_R], tl.float32)
            for j0 in range(0, q_len, BLOCK_K):  # pass 1: softmax max and sum of every row
                j = j0 + tl.arange(0, BLOCK_K)
                keys = tl.load(k_base + j[:, None] * sk_s + d_offs[None, :], mask=(j < q_len)[:, None] & d_ok[None, :],
                               other=0.0).to(tl.float32)
                logits = tl.dot(q_rows, tl.trans(keys), input_precision="ieee") * SCALE
                visible = (j[None, :] <= pos[:, None]) & (j[None, :] < n) & row_ok[:, None]
                logits = tl.where(visible, logits, float("-inf"))
                m_new = tl.maximum(m, tl.max(logits, axis=1))
                m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
                s = s * tl.exp(m - m_safe) + tl.sum(tl.exp(logits - m_safe[:, None]), axis=1)
                m = m_new
            m_safe = tl.where(m == float("-inf"), 0.0, m)
            s_safe = tl.where(s > 0, s, 1.0)
            for j0 in range(0, q_len, BLOCK_K):  # pass 2: probabilities summed over the rows
                j = j0 + tl.arange(0, BLOCK_K)
                keys = tl.load(k_base + j[:, None] * sk_s + d_offs[None, :], mask=(j < q_len)[:, None] & d_ok[None, :],
                               other=0.0).to(tl.float32)
                logits = tl.dot(q_rows, tl.trans(keys), input_precision="ieee") * SCALE
                visible = (j[None, :] <= pos[:, None]) & (j[None, :] < n) & row_ok[:, None]
                probs = tl.where(visible, tl.exp(logits - m_safe[:, None]) / s_safe[:, None], 0.0)
                acc = tl.load(raw_ptr + j, mask=j < q_len, other=0.0)
                tl.store(raw_ptr + j, acc + tl.sum(probs, axis=0), mask=j < q_len)
                tl.debug_barrier()
    tl.debug_barrier()
    # 2. the prefix only (0 elsewhere), mean over the query group, then pooling into pooled[0:q]
    for j0 in range(0, q_len, BLOCK_K):
        j = j0 + tl.arange(0, BLOCK_K)
        v = tl.load(raw_ptr + j, mask=j < q_len, other=0.0)
        if not POSITIONAL:
            v = v / heads
        tl.store(raw_ptr + j, tl.where(j < prefix, v, 0.0), mask=j < q_len)
    tl.debug_barrier()
    for j0 in range(0, q_len, BLOCK_K):
        j = j0 + tl.arange(0, BLOCK_K)
        if POOLING == 0:
            pooled = tl.load(raw_ptr + j, mask=j < q_len, other=0.0)
        else:
            pooled = tl.full([BLOCK_K], float("-inf"), tl.float32) if POOLING == 1 else tl.zeros([BLOCK_K],
                                                                                                 tl.float32)
            for t in tl.static_range(KERNEL):
                nb = j + t - KERNEL // 2
                inside = (nb >= 0) & (nb < q_len)
                val = tl.load(raw_ptr + nb, mask=inside, other=0.0)
                if POOLING == 1:
                    pooled = tl.maximum(pooled, tl.where(inside, val, float("-inf")))
                else:
                    pooled = pooled + val
            if POOLING == 2:
                pooled = pooled / KERNEL
        tl.store(pooled_ptr + j, pooled, mask=j < q_len)
    tl.debug_barrier()

    # 3. the sel-th largest key among the prefix (keys are unique: ties go to the lower position)
    lo = tl.full([], 0, tl.int64)
    hi = tl.full([], 0x7FFFFFFFFFFFFFFF, tl.int64)
    if sel > 0:
        for _ in range(64):
            mid = lo + ((hi - lo) >> 1) + ((hi - lo) & 1)  # ceil of the middle, without overflowing int64
            count = tl.full([], 0, tl.int32)
            for j0 in range(0, q_len, BLOCK_K):
                j = j0 + tl.arange(0, BLOCK_K)
                pooled = tl.load(pooled_ptr + j, mask=j < q_len, other=0.0)
                key = (pooled.to(tl.int32, bitcast=True).to(tl.int64) << 32) | (q_len - 1 - j).to(tl.int64)
                count += tl.sum(((key >= mid) & (j < prefix)).to(tl.int32), axis=0)
            if count >= sel:
                lo = mid
            else:
                hi = mid - 1
    threshold = lo
    out_base = idx_ptr + (b * HC + hc) * width
    written = tl.full([], 0, tl.int32)
    if sel > 0:
        for j0 in range(0, q_len, BLOCK_K):
            j = j0 + tl.arange(0, BLOCK_K)
            pooled = tl.load(pooled_ptr + j, mask=j < q_len, other=0.0)
            key = (pooled.to(tl.int32, bitcast=True).to(tl.int64) << 32) | (q_len - 1 - j).to(tl.int64)
            keep = (key >= threshold) & (j < prefix)
            slot = written + tl.cumsum(keep.to(tl.int32), axis=0) - 1
            tl.store(out_base + slot, j.to(tl.int64), mask=keep)
            written += tl.sum(keep.to(tl.int32), axis=0)
    for t0 in range(0, width, BLOCK_K):  # the window after the picks, then -1
        t = t0 + tl.arange(0, BLOCK_K)
        win = prefix + (t - sel)
        value = tl.where((t >= sel) & (t < sel + w_eff), win, -1).to(tl.int64)
        tl.store(out_base + t, value, mask=(t >= sel) & (t < width))
    tl.debug_barrier()

    # 4. gather K/V (zeros in unused slots)
    v_base = v_ptr + b64 * sk_b + kvh * sk_h
    for t0 in range(0, width, BLOCK_K):
        t = t0 + tl.arange(0, BLOCK_K)
        idx = tl.load(out_base + t, mask=t < width, other=-1)
        used = (idx >= 0) & (t < width)
        safe = tl.where(used, idx, 0)
        mask = used[:, None] & d_ok[None, :]
        out_mask = (t < width)[:, None] & d_ok[None, :]
        out_off = b64 * so_b + hc * so_h + t[:, None] * so_s + d_offs[None, :]
        kk = tl.load(k_base + safe[:, None] * sk_s + d_offs[None, :], mask=mask, other=0.0)
        tl.store(ko_ptr + out_off, kk, mask=out_mask)
        vv = tl.load(v_base + safe[:, None] * sk_s + d_offs[None, :], mask=mask, other=0.0)
        tl.store(vo_ptr + out_off, vv, mask=out_mask)


def _launch(queries, keys, values, lengths, selected, window, kernel, pooling, granularity, observe, positional,
            sinks, width, block_k):
    b, hkv, q, d = keys.shape
    h = queries.shape[2] if queries is not None else hkv
    hc = h if granularity == "query-head" else hkv
    lengths = lengths.to(torch.int64).reshape(b).contiguous()
    budgets = as_row_budgets(selected, b).to(lengths.device)
    check_budgets(budgets.cpu(), lengths.cpu(), window, q)
    if width is None:
        width = (int(budgets.max()) if b else 0) + min(window, q)
    device = keys.device
    outputs = (torch.empty(b, hc, width, dtype=torch.int64, device=device),
               torch.empty(b, hc, width, d, dtype=keys.dtype, device=device),
               torch.empty(b, hc, width, d, dtype=values.dtype, device=device),
               torch.empty(b, hc, 2, q, dtype=torch.float32, device=device))
    launch_into(queries, keys, values, lengths, budgets, *outputs, h=h, window=window, kernel=kernel, pooling=pooling,
                granularity=granularity, observe=observe, positional=positional, sinks=sinks, block_k=block_k)
    return outputs


@triton.jit
def _streaming_kernel(
    k_ptr, v_ptr, len_ptr, sel_ptr,
    q_len, width, sq_b, sq_s, sq_h, sk_b, sk_h, sk_s, so_b, so_h, so_s,
    idx_ptr, ko_ptr, vo_ptr, sc_ptr,
    SCALE: tl.constexpr, H: tl.constexpr, HC: tl.constexpr, GROUP: tl.constexpr, D: tl.constexpr,
    BLOCK_D: tl.constexpr, WINDOW: tl.constexpr, KERNEL: tl.constexpr, POOLING: tl.constexpr,
    OBSERVE_ALL: tl.constexpr, QUERY_HEAD: tl.constexpr, POSITIONAL: tl.constexpr, SINKS: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """StreamingLLMSelect(keys, values, lengths, selected): the same kernel with positional scores and no queries
    (the plugin's inputs are exactly these four; the query pointer is never read when POSITIONAL)."""
    _select_kernel(k_ptr, k_ptr, v_ptr, len_ptr, sel_ptr, q_len, width, sq_b, sq_s, sq_h, sk_b, sk_h, sk_s,
                   so_b, so_h, so_s, idx_ptr, ko_ptr, vo_ptr, sc_ptr, SCALE, H, HC, GROUP, D, BLOCK_D, WINDOW,
                   KERNEL, POOLING, OBSERVE_ALL, QUERY_HEAD, POSITIONAL, SINKS, BLOCK_R, BLOCK_K)


def launch_into(queries, keys, values, lengths, selected, kept, keys_out, values_out, scores, *, h: int, window: int,
                kernel: int, pooling: str, granularity: str, observe: str, positional: bool = False, sinks: int = 0,
                block_k: int = 64) -> None:
    """Run the kernel into preallocated outputs (the TensorRT plugin's JIT path hands over its own buffers; the
    output width is theirs, wider than needed is fine). Tensors contiguous, on one device."""
    b, hkv, q, d = keys.shape
    keys, values = keys.contiguous(), values.contiguous()
    hc = kept.shape[1]
    if queries is None:  # StreamingLLM: positional scores, no queries
        kernel_fn, tensors, q_strides = _streaming_kernel, (keys, values, lengths, selected), (0, 0, 0)
    else:
        queries = queries.contiguous()
        kernel_fn, tensors = _select_kernel, (queries, keys, values, lengths, selected)
        q_strides = (queries.stride(0), queries.stride(1), queries.stride(2))
    kernel_fn[(b * hc,)](
        *tensors,
        q, kept.shape[2], *q_strides, keys.stride(0), keys.stride(1),
        keys.stride(2), keys_out.stride(0), keys_out.stride(1), keys_out.stride(2),
        kept, keys_out, values_out, scores,
        **kernel_constants(h, hkv, d, window, kernel, pooling, granularity, observe, positional, sinks, q, block_k),
        enable_fp_fusion=False,  # no fused multiply-add: the spec's float32 arithmetic, operation by operation
    )


def kernel_constants(num_heads: int, num_kv_heads: int, head_dim: int, window: int, kernel: int, pooling: str,
                     granularity: str, observe: str, positional: bool, sinks: int, q_hint: int | None = None,
                     block_k: int = 64) -> dict:
    """The compile-time constants of one specialisation of the kernel (the TensorRT plugin compiles with these)."""
    group = num_heads // num_kv_heads
    rows = group * (window if q_hint is None else min(window, q_hint))
    return dict(SCALE=float(head_dim) ** -0.5, H=num_heads,
                HC=num_heads if granularity == "query-head" else num_kv_heads, GROUP=group, D=head_dim,
                BLOCK_D=triton.next_power_of_2(head_dim), WINDOW=window, KERNEL=kernel if pooling != "none" else 1,
                POOLING=POOLING_CODES[pooling], OBSERVE_ALL=observe == "all", QUERY_HEAD=granularity == "query-head",
                POSITIONAL=positional, SINKS=sinks, BLOCK_R=max(16, triton.next_power_of_2(min(rows, 64))),
                BLOCK_K=block_k)


def pyramidkv_select_triton(queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, lengths: torch.Tensor,
                            selected: int | torch.Tensor, window: int, kernel: int = 7, pooling: str = "max",
                            granularity: str = "kv-head", observe: str = "window", width: int | None = None,
                            block_k: int = 64, return_scores: bool = False):
    """The op on the kernel: same arguments and results as `pyramidkv_select` (queries [B, q, H, d], keys / values
    [B, Hkv, q, d], lengths [B]); `width` pads the output further with -1 slots (a plugin's static width)."""
    if pooling not in POOLINGS or granularity not in GRANULARITIES or observe not in OBSERVE:
        raise ValueError(f"bad pooling/granularity/observe: {pooling}, {granularity}, {observe}")
    if queries.shape[2] % keys.shape[1] or queries.shape[1] != keys.shape[2] or window < 1:
        raise ValueError(f"bad shapes: queries {tuple(queries.shape)}, keys {tuple(keys.shape)}, window {window}")
    out = _launch(queries, keys, values, lengths, selected, window, kernel if pooling != "none" else 1,
                  pooling, granularity, observe, False, 0, width, block_k)
    return out if return_scores else out[:3]


def streaming_select_triton(keys: torch.Tensor, values: torch.Tensor, lengths: torch.Tensor,
                            selected: int | torch.Tensor, window: int, sinks: int = 4, width: int | None = None,
                            block_k: int = 64):
    """StreamingLLM's selection on the kernel: same results as `streaming_select`."""
    return _launch(None, keys, values, lengths, selected, window, 1, "none", "kv-head", "window", True, sinks, width,
                   block_k)[:3]
