"""Specification of the `PyramidKVSelect` op: SnapKV scoring + per-head top-k + gather, in plain PyTorch.

This function *is* the op's contract (design.md §4.2-4.3). Every other implementation (the ONNX function, the
Triton-lang kernel, the TensorRT plugin) must return the same kept index sets and the same K/V on the same
inputs. Definitions that backends could otherwise disagree on are fixed here:

* scores are computed in float32 whatever the K/V dtype;
* the observation queries are the last `n_obs` prompt positions; row r (absolute position q - n_obs + r) sees
  keys j <= q - n_obs + r, and padding keys are masked; a padding query row contributes nothing;
* `avg` pooling counts the pooling pad as zeros (count_include_pad, as KVCache-Factory's F.avg_pool1d);
  `max` pooling ignores the pad; both with stride 1 and padding kernel // 2;
* padding keys are never preferred over a real key (score -inf after pooling);
* ties in top-k go to the lower position (ONNX TopK's rule), and kept prefix indices are sorted ascending;
* `selected` may differ per batch row (each prompt's own budget, so a batched prompt keeps exactly what it
  keeps alone): the op keeps max(selected) slots, row b's picks come first (ascending) and its unused slots
  hold index -1 and zero K/V.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

POOLINGS = ("max", "avg", "none")
GRANULARITIES = ("kv-head", "query-head")


def observation_scores(
    queries: torch.Tensor, keys: torch.Tensor, key_mask: torch.Tensor, prefix_len: int
) -> torch.Tensor:
    """Attention mass each prefix key receives from the observation queries, per query head.

    queries: [B, H, n_obs, d], keys: [B, Hkv, q, d], key_mask: [B, q] bool -> scores: [B, H, prefix_len] f32
    """
    b, h, n_obs, d = queries.shape
    hkv, q = keys.shape[1], keys.shape[2]
    k = keys.float().repeat_interleave(h // hkv, dim=1)  # [B, H, q, d]
    logits = queries.float() @ k.transpose(-1, -2) / (d**0.5)  # [B, H, n_obs, q]
    row_pos = torch.arange(q - n_obs, q).unsqueeze(-1)  # [n_obs, 1]
    visible = torch.arange(q).unsqueeze(0) <= row_pos  # [n_obs, q] causal
    visible = visible & key_mask[:, None, None, :]  # [B, 1, n_obs, q]
    logits = logits.masked_fill(~visible, torch.finfo(torch.float32).min)
    probs = torch.softmax(logits, dim=-1)
    query_ok = key_mask[:, q - n_obs :].to(probs.dtype)[:, None, :, None]  # [B, 1, n_obs, 1]
    return (probs * query_ok).sum(dim=-2)[..., :prefix_len]  # [B, H, prefix_len]


def pool_scores(scores: torch.Tensor, kernel: int, pooling: str) -> torch.Tensor:
    """1-D pooling along keys, stride 1, padding kernel // 2. scores: [B, C, n] -> [B, C, n]."""
    if pooling == "none" or kernel == 1:
        return scores
    b, c, n = scores.shape
    flat = scores.reshape(b * c, 1, n)
    if pooling == "max":
        out = F.max_pool1d(flat, kernel, stride=1, padding=kernel // 2)
    elif pooling == "avg":
        out = F.avg_pool1d(flat, kernel, stride=1, padding=kernel // 2, count_include_pad=True)
    else:
        raise ValueError(f"unknown pooling '{pooling}' (choose from {', '.join(POOLINGS)})")
    return out.reshape(b, c, n)


def topk_lowest_index_first(scores: torch.Tensor, selected: torch.Tensor) -> torch.Tensor:
    """Per row b, the selected[b] largest scores (ties to the lower index), ascending, then -1 up to max(selected).

    scores: [B, C, n], selected: [B] int64 -> [B, C, max(selected)] int64
    """
    k = int(selected.max()) if selected.numel() else 0
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., :k]  # by rank
    used = torch.arange(k).view(1, 1, k) < selected.view(-1, 1, 1)  # [B, 1, k]
    sentinel = scores.shape[-1]  # sorts after every real index, then becomes -1
    ascending = torch.sort(torch.where(used, order, sentinel), dim=-1).values
    return ascending.masked_fill(ascending == sentinel, -1)


def as_row_budgets(selected: int | torch.Tensor, batch: int) -> torch.Tensor:
    """An int or a [B] tensor of per-row budgets -> [B] int64."""
    if isinstance(selected, int):
        return torch.full((batch,), selected, dtype=torch.long)
    return selected.to(torch.long).reshape(batch)


def gather_kept(
    keys: torch.Tensor, values: torch.Tensor, prefix_idx: torch.Tensor, window: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Append the window positions to the prefix picks and gather K/V (zeros where the index is -1).

    keys/values: [B, Hc, q, d], prefix_idx: [B, Hc, k] -> indices [B, Hc, k + window], K/V [B, Hc, k + window, d]
    """
    b, hc, q, d = keys.shape
    win = torch.arange(q - window, q).expand(b, hc, window)
    idx = torch.cat([prefix_idx, win], dim=-1)
    gidx = idx.clamp(min=0).unsqueeze(-1).expand(-1, -1, -1, d)
    used = (idx >= 0).unsqueeze(-1)
    zero = torch.zeros((), dtype=keys.dtype)
    kept_keys = torch.where(used, torch.gather(keys, 2, gidx), zero)
    return idx, kept_keys, torch.where(used, torch.gather(values, 2, gidx), zero)


def pyramidkv_select(
    queries: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    selected: int | torch.Tensor,
    window: int,
    kernel: int = 7,
    pooling: str = "max",
    granularity: str = "kv-head",
    key_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Keep, per head, the `selected` prefix tokens the observation queries attend to most, plus the window.

    Args:
        queries: [B, H, n_obs, d] post-RoPE queries of the last n_obs prompt positions (n_obs = window for
            SnapKV/PyramidKV; the whole prompt for H2O), any float dtype.
        keys, values: [B, Hkv, q, d] post-RoPE keys and values of the prompt; H % Hkv == 0.
        selected: prefix tokens kept per head: an int, or a [B] int64 tensor of per-row budgets;
            0 <= selected <= q - window (the layer's budget, clamped to the prompt).
        window: the last `window` positions are always kept.
        kernel: odd pooling width; pooling: "max" | "avg" | "none".
        granularity: "kv-head" scores each KV head by the mean over its query group and returns Hc = Hkv heads;
            "query-head" selects per query head and returns K/V expanded to Hc = H heads.
        key_mask: [B, q] bool, True for real tokens, False for (left) padding; None means all real.

    Returns:
        indices: [B, Hc, k + window] int64 prompt positions, k = max(selected): row b's prefix picks ascending,
            -1 in its unused slots, then the window;
        keys_out, values_out: [B, Hc, k + window, d] in the dtype of keys / values (zeros in unused slots).
    """
    b, h, n_obs, d = queries.shape
    hkv, q = keys.shape[1], keys.shape[2]
    if granularity not in GRANULARITIES:
        raise ValueError(f"unknown granularity '{granularity}' (choose from {', '.join(GRANULARITIES)})")
    budgets = as_row_budgets(selected, b)
    budgets_ok = bool(((budgets >= 0) & (budgets <= q - window)).all())
    if h % hkv or not 0 < window <= q or not 0 < n_obs <= q or not budgets_ok:
        raise ValueError(f"bad shapes/budget: H={h} Hkv={hkv} q={q} n_obs={n_obs} window={window} selected={selected}")
    if key_mask is None:
        key_mask = torch.ones(b, q, dtype=torch.bool)
    prefix = q - window
    scores = observation_scores(queries, keys, key_mask, prefix)  # [B, H, q - w]
    if granularity == "kv-head":
        scores = scores.view(b, hkv, h // hkv, prefix).mean(dim=2)  # [B, Hkv, q - w]
    else:
        keys = keys.repeat_interleave(h // hkv, dim=1)  # [B, H, q, d]
        values = values.repeat_interleave(h // hkv, dim=1)
    scores = pool_scores(scores, kernel, pooling)
    scores = scores.masked_fill(~key_mask[:, None, :prefix], float("-inf"))
    prefix_idx = topk_lowest_index_first(scores, budgets)  # [B, Hc, max(selected)]
    return gather_kept(keys, values, prefix_idx, window)
