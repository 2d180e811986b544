"""StreamingLLM's selection in the same shape as `pyramidkv_select`: attention sinks + the most recent tokens.

No attention scores: the first `sinks` real tokens and the latest ones are kept. Written as a positional score
followed by the same top-k + gather, so every backend implements it with the ops it already has.
"""

from __future__ import annotations

import torch

from trt_plugins.pyramidkv_select import as_row_budgets, gather_kept, topk_lowest_index_first


def streaming_select(
    keys: torch.Tensor,
    values: torch.Tensor,
    selected: int | torch.Tensor,
    window: int,
    sinks: int = 4,
    key_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """keys/values: [B, Hkv, q, d], key_mask: [B, q] bool -> indices [B, Hkv, k + window], K/V alike.

    Of the prefix [0, q - window) row b keeps its first `sinks` real tokens and its `selected[b] - sinks` latest
    (`selected`: an int or [B] per-row budgets; k = max(selected); unused slots as in `pyramidkv_select`).
    """
    b, hkv, q, _ = keys.shape
    budgets = as_row_budgets(selected, b)
    if not bool(((budgets >= 0) & (budgets <= q - window)).all()):
        raise ValueError(f"selected={selected} must be in [0, q - window = {q - window}]")
    if key_mask is None:
        key_mask = torch.ones(b, q, dtype=torch.bool)
    prefix = q - window
    pos = torch.arange(prefix, dtype=torch.float32).expand(b, prefix)  # [B, q - w]
    real_rank = torch.cumsum(key_mask[:, :prefix].long(), dim=-1) - 1  # position among real tokens
    scores = torch.where(real_rank < sinks, pos + 2.0 * q, pos)  # sinks outrank everything, then recency
    scores = scores.masked_fill(~key_mask[:, :prefix], float("-inf"))
    prefix_idx = topk_lowest_index_first(scores.unsqueeze(1).expand(b, hkv, prefix), budgets)
    return gather_kept(keys, values, prefix_idx, window)
