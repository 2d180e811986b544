"""Specification of the `PyramidKVSelect` op: SnapKV scoring + per-head top-k + gather, in plain PyTorch.

This function *is* the op's contract. Every other implementation (the ONNX function, the
Triton-lang kernel, the TensorRT plugin) must return the same kept index sets and the same K/V on the same
inputs. Definitions that backends could otherwise disagree on are fixed here:

* rows are right-padded (as fused attention kernels and KV caches lay them out): row b's real tokens are the
  positions [0, lengths[b]); everything after is padding;
* queries are [B, q, H, d] (the projection's layout), keys / values [B, Hkv, q, d] (the cache's layout);
* the observation queries of row b are its last `window` real tokens (`observe="window"`, SnapKV/PyramidKV) or
  all of its real tokens (`observe="all"`, H2O); a query at position p sees keys j <= p of its own row;
* scores are computed in float32 whatever the K/V dtype, over blocks of observation rows
  (`observation_rows_per_block`), so memory stays linear in q even when every query observes;
* the prefix of row b is [0, lengths[b] - w_b) with w_b = min(window, lengths[b]); pooling sees only the prefix:
  scores outside it count as 0 (`avg` pooling counts the pooling pad as zeros, count_include_pad, as
  KVCache-Factory's F.avg_pool1d; `max` ignores it; scores are >= 0, so both read 0 as "no key"); both with
  stride 1 and padding kernel // 2; keys outside the prefix are never picked (score -inf after pooling);
* ties in top-k go to the lower position (ONNX TopK's rule);
* `selected` may differ per row (each prompt's own budget, so a batched prompt keeps exactly what it keeps
  alone); the output is compact: row b's picks and then its window, all ascending, come first, and the
  remaining slots up to max(selected) + min(window, q) hold index -1 and zero K/V, so a cache built from it
  has every row's valid tokens first (what GroupQueryAttention's per-row lengths need).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

POOLINGS = ("max", "avg", "none")
GRANULARITIES = ("kv-head", "query-head")
OBSERVE = ("window", "all")
# Observation logits are computed for at most this many (row x key) pairs per head at a time.
OBS_BLOCK_ELEMENTS = 1 << 22


def observation_rows_per_block(q: int) -> int:
    """How many observation rows one block holds for a prompt of q tokens (the ONNX function uses the same)."""
    return max(1, OBS_BLOCK_ELEMENTS // max(q, 1))


def observation_positions(lengths: torch.Tensor, q: int, window: int, observe: str) -> torch.Tensor:
    """[B, n_obs] int64 position of each observation query, -1 where a row has none (shorter than the window,
    or padding). n_obs = min(window, q) for "window", q for "all"."""
    if observe == "all":
        pos = torch.arange(q, device=lengths.device).expand(lengths.shape[0], q)
        return torch.where(pos < lengths[:, None], pos, -1)
    w = min(window, q)
    pos = lengths[:, None] - w + torch.arange(w, device=lengths.device)[None, :]
    return pos.clamp(min=-1)


def observation_scores(queries: torch.Tensor, keys: torch.Tensor, lengths: torch.Tensor,
                       rows: torch.Tensor) -> torch.Tensor:
    """Attention mass each key receives from the observation queries, per query head.

    queries: [B, q, H, d], keys: [B, Hkv, q, d], lengths: [B] int64, rows: [B, n] observation positions (-1: none)
    -> scores: [B, H, q] float32 (0 for keys no observation row sees)
    """
    b, q, h, d = queries.shape
    hkv = keys.shape[1]
    k = keys.float().repeat_interleave(h // hkv, dim=1)  # [B, H, q, d]
    cols = torch.arange(q, device=queries.device)
    scores = torch.zeros(b, h, q, dtype=torch.float32, device=queries.device)
    step = observation_rows_per_block(q)
    for s in range(0, rows.shape[1], step):
        pos = rows[:, s : s + step]  # [B, r]
        safe = pos.clamp(min=0)
        qb = torch.gather(queries.float(), 1, safe[:, :, None, None].expand(-1, -1, h, d))  # [B, r, H, d]
        logits = qb.transpose(1, 2) @ k.transpose(-1, -2) / (d**0.5)  # [B, H, r, q]
        visible = (cols[None, None, :] <= pos[:, :, None]) & (cols[None, None, :] < lengths[:, None, None])
        logits = logits.masked_fill(~visible[:, None], torch.finfo(torch.float32).min)
        probs = torch.softmax(logits, dim=-1) * (pos >= 0).to(torch.float32)[:, None, :, None]
        scores = scores + probs.sum(dim=-2)
    return scores


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
    used = torch.arange(k, device=scores.device).view(1, 1, k) < selected.view(-1, 1, 1).to(scores.device)  # [B, 1, k]
    return compact_ascending(torch.where(used, order, -1))


def compact_ascending(idx: torch.Tensor) -> torch.Tensor:
    """Valid (>= 0) indices first and ascending, -1 after them. idx: [..., n] int64 -> [..., n]."""
    sentinel = torch.iinfo(torch.int64).max
    ordered = torch.sort(torch.where(idx >= 0, idx, sentinel), dim=-1).values
    return ordered.masked_fill(ordered == sentinel, -1)


def as_row_budgets(selected: int | torch.Tensor, batch: int) -> torch.Tensor:
    """An int or a [B] tensor of per-row budgets -> [B] int64."""
    if isinstance(selected, int):
        return torch.full((batch,), selected, dtype=torch.long)
    return selected.to(torch.long).reshape(batch)


def prefix_lengths(lengths: torch.Tensor, window: int) -> torch.Tensor:
    """[B] the prefix each row selects from: its length minus its window (the window never exceeds the row)."""
    return lengths - lengths.clamp(max=window)


def row_budgets(lengths: torch.Tensor, selected: int | torch.Tensor, window: int, q: int
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Every selection's inputs checked: lengths [B] and `selected` (an int, or [B] per-row budgets) -> lengths,
    budgets [B] int64 (on the lengths' device), each budget within its row's prefix."""
    lengths = lengths.to(torch.long).reshape(-1)
    budgets = as_row_budgets(selected, lengths.shape[0]).to(lengths.device)
    check_budgets(budgets, lengths, window, q)
    return lengths, budgets


def check_budgets(budgets: torch.Tensor, lengths: torch.Tensor, window: int, q: int) -> None:
    prefix = prefix_lengths(lengths, window)
    if not bool(((lengths >= 0) & (lengths <= q)).all()) or not bool(((budgets >= 0) & (budgets <= prefix)).all()):
        raise ValueError(f"bad lengths/budgets: lengths={lengths.tolist()} selected={budgets.tolist()} "
                         f"window={window} q={q}")


def gather_kept(keys: torch.Tensor, values: torch.Tensor, prefix_idx: torch.Tensor, lengths: torch.Tensor,
                window: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Add each row's window to its prefix picks, compact, and gather K/V (zeros where the index is -1).

    keys/values: [B, Hc, q, d], prefix_idx: [B, Hc, k] (-1 unused), lengths: [B]
    -> indices [B, Hc, k + min(window, q)], K/V [B, Hc, k + min(window, q), d]
    """
    b, hc, q, d = keys.shape
    win = observation_positions(lengths, q, window, "window")  # [B, w']: the last w' real tokens, -1 if none
    idx = compact_ascending(torch.cat([prefix_idx, win[:, None, :].expand(b, hc, -1)], dim=-1))
    gidx = idx.clamp(min=0).unsqueeze(-1).expand(-1, -1, -1, d)
    used = (idx >= 0).unsqueeze(-1)
    zero = torch.zeros((), dtype=keys.dtype, device=keys.device)
    kept_keys = torch.where(used, torch.gather(keys, 2, gidx), zero)
    return idx, kept_keys, torch.where(used, torch.gather(values, 2, gidx), zero)


def pyramidkv_select(
    queries: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    lengths: torch.Tensor,
    selected: int | torch.Tensor,
    window: int,
    kernel: int = 7,
    pooling: str = "max",
    granularity: str = "kv-head",
    observe: str = "window",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Keep, per head, the `selected` prefix tokens the observation queries attend to most, plus the window.

    Args:
        queries: [B, q, H, d] post-RoPE queries of the prompt (right-padded), any float dtype.
        keys, values: [B, Hkv, q, d] post-RoPE keys and values of the prompt; H % Hkv == 0.
        lengths: [B] int64 real tokens per row (row b's tokens are positions [0, lengths[b])).
        selected: prefix tokens kept per head: an int, or a [B] int64 tensor of per-row budgets;
            0 <= selected[b] <= lengths[b] - min(window, lengths[b]) (the layer's budget, clamped to the prompt).
        window: the last `window` real tokens of every row are always kept.
        kernel: odd pooling width; pooling: "max" | "avg" | "none".
        granularity: "kv-head" scores each KV head by the mean over its query group and returns Hc = Hkv heads;
            "query-head" selects per query head and returns K/V expanded to Hc = H heads.
        observe: "window" (the last `window` real tokens observe) or "all" (every real token, H2O).

    Returns:
        indices: [B, Hc, max(selected) + min(window, q)] int64 positions: row b's picks and window ascending,
            then -1 in its unused slots;
        keys_out, values_out: [B, Hc, max(selected) + min(window, q), d] in the dtype of keys / values.
    """
    b, q, h, d = queries.shape
    hkv = keys.shape[1]
    if granularity not in GRANULARITIES:
        raise ValueError(f"unknown granularity '{granularity}' (choose from {', '.join(GRANULARITIES)})")
    if observe not in OBSERVE:
        raise ValueError(f"unknown observe '{observe}' (choose from {', '.join(OBSERVE)})")
    if h % hkv or keys.shape[2] != q or window < 1:
        raise ValueError(f"bad shapes: queries {tuple(queries.shape)}, keys {tuple(keys.shape)}, window {window}")
    lengths, budgets = row_budgets(lengths, selected, window, q)
    scores = observation_scores_for(queries, keys, lengths, window, observe)
    return select_from_scores(scores, keys, values, lengths, budgets, window, kernel, pooling, granularity)


def observation_scores_for(queries: torch.Tensor, keys: torch.Tensor, lengths: torch.Tensor, window: int,
                           observe: str) -> torch.Tensor:
    """The observation scores `pyramidkv_select` ranks by, before any grouping or pooling: queries [B, q, H, d],
    keys [B, Hkv, q, d], lengths [B] -> [B, H, q] float32 (`observation_scores` of the last `window` rows, or of
    every row with observe="all"). What one prefill hands every selection that reads the same scores."""
    lengths = lengths.to(torch.long).reshape(-1)
    return observation_scores(queries, keys, lengths, observation_positions(lengths, queries.shape[1], window, observe))


def select_from_scores(scores: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, lengths: torch.Tensor,
                       selected: int | torch.Tensor, window: int, kernel: int = 7, pooling: str = "max",
                       granularity: str = "kv-head") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`pyramidkv_select` after its scoring: observation scores [B, H, q] float32 (`observation_scores_for`),
    keys / values [B, Hkv, q, d], lengths [B], selected (an int or [B]) -> indices, keys_out, values_out as
    `pyramidkv_select` returns them."""
    h, hkv = scores.shape[1], keys.shape[1]
    lengths, budgets = row_budgets(lengths, selected, window, scores.shape[2])
    ranked = ranking_scores(scores, hkv, lengths, window, kernel, pooling, granularity)
    if granularity == "query-head":
        keys = keys.repeat_interleave(h // hkv, dim=1)  # [B, H, q, d]
        values = values.repeat_interleave(h // hkv, dim=1)
    prefix_idx = topk_lowest_index_first(ranked, budgets)  # [B, Hc, max(selected)]
    return gather_kept(keys, values, prefix_idx, lengths, window)


def selection_scores(queries: torch.Tensor, keys: torch.Tensor, lengths: torch.Tensor, window: int,
                     kernel: int = 7, pooling: str = "max", granularity: str = "kv-head", observe: str = "window"
                     ) -> torch.Tensor:
    """What `pyramidkv_select` ranks the prefix by (arguments as there): [B, Hc, q] float32, pooled, -inf outside
    each row's prefix [0, lengths[b] - min(window, lengths[b]))."""
    scores = observation_scores_for(queries, keys, lengths, window, observe)
    return ranking_scores(scores, keys.shape[1], lengths, window, kernel, pooling, granularity)


def ranking_scores(scores: torch.Tensor, num_kv_heads: int, lengths: torch.Tensor, window: int, kernel: int = 7,
                   pooling: str = "max", granularity: str = "kv-head") -> torch.Tensor:
    """`selection_scores` from the observation scores [B, H, q] float32 (`observation_scores_for`)."""
    b, h, q = scores.shape
    lengths = lengths.to(torch.long).reshape(-1)
    if granularity == "kv-head":
        scores = scores.view(b, num_kv_heads, h // num_kv_heads, q).mean(dim=2)  # [B, Hkv, q]
    positions = torch.arange(q, device=scores.device)
    in_prefix = (positions[None, :] < prefix_lengths(lengths, window)[:, None])[:, None, :]  # [B, 1, q]
    scores = pool_scores(scores.masked_fill(~in_prefix, 0.0), kernel, pooling)
    return scores.masked_fill(~in_prefix, float("-inf"))
