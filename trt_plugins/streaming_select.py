"""StreamingLLM's selection in the same shape as `pyramidkv_select`: attention sinks + the most recent tokens.

No attention scores: the first `sinks` tokens and the latest ones are kept. Written as a positional score
followed by the same top-k + gather, so every backend implements it with the ops it already has. Same layout
rules as `pyramidkv_select` (right padding, compact output).
"""

from __future__ import annotations

import torch

from trt_plugins.pyramidkv_select import (
    gather_kept,
    prefix_lengths,
    row_budgets,
    topk_lowest_index_first,
)


def streaming_select(
    keys: torch.Tensor,
    values: torch.Tensor,
    lengths: torch.Tensor,
    selected: int | torch.Tensor,
    window: int,
    sinks: int = 4,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """keys/values: [B, Hkv, q, d], lengths: [B] -> indices [B, Hkv, k + min(window, q)], K/V alike.

    Of its prefix, row b keeps the first `sinks` tokens and the `selected[b] - sinks` latest (`selected`: an int
    or [B] per-row budgets; k = max(selected); unused slots as in `pyramidkv_select`).
    """
    b, hkv, q, _ = keys.shape
    lengths, budgets = row_budgets(lengths, selected, window, q)
    pos = torch.arange(q, dtype=torch.float32).expand(b, q)  # [B, q]
    scores = torch.where(pos < sinks, pos + 2.0 * q, pos)  # sinks outrank everything, then recency
    scores = scores.masked_fill(pos >= prefix_lengths(lengths, window)[:, None], float("-inf"))
    prefix_idx = topk_lowest_index_first(scores.unsqueeze(1).expand(b, hkv, q), budgets)
    return gather_kept(keys, values, prefix_idx, lengths, window)
