"""ChunkKV's selection (arXiv 2502.00299) in the same contract as `pyramidkv_select` (right padding, compact
output, per-row budgets): chunks of `chunk_size` consecutive prompt tokens, scored together, kept together.

* token scores are SnapKV's observation scores (the last `window` real tokens attending, float32), no pooling;
* a chunk's score is the sum of its tokens' scores over every query head (ChunkKV's Algorithm 1 sums the
  observation scores over the chunk; kvpress sums over heads too): one selection for all KV heads of a layer;
* the prefix [0, lengths[b] - w_b) is cut into chunks from position 0; the last one may be partial; chunks
  beyond the prefix never count;
* row b keeps its top floor(selected[b] / chunk_size) chunks (ties to the lower chunk), every token of them,
  in original order, then its window;
* layer-wise index reuse: `chunkkv_from_scores` selects from chunk scores computed at another layer (the first
  of a group of `reuse` layers), skipping the attention scoring entirely; with a per-layer budget the layer
  takes its own number of chunks from the shared ranking.
"""

from __future__ import annotations

import torch

from trt_plugins.pyramidkv_select import (
    as_row_budgets,
    check_budgets,
    gather_kept,
    observation_positions,
    observation_scores,
    prefix_lengths,
    topk_lowest_index_first,
)


def num_chunks(q: int, chunk_size: int) -> int:
    return -(-q // chunk_size)


def chunk_scores(queries: torch.Tensor, keys: torch.Tensor, lengths: torch.Tensor, window: int,
                 chunk_size: int) -> torch.Tensor:
    """queries [B, q, H, d], keys [B, Hkv, q, d], lengths [B] -> [B, C] float32, C = ceil(q / chunk_size);
    -inf for chunks entirely outside a row's prefix."""
    b, q = keys.shape[0], keys.shape[2]
    lengths = lengths.to(torch.long).reshape(b)
    scores = observation_scores(queries, keys, lengths, observation_positions(lengths, q, window, "window"))
    prefix = prefix_lengths(lengths, window)
    tokens = scores.sum(dim=1).masked_fill(torch.arange(q)[None, :] >= prefix[:, None], 0.0)  # [B, q]
    c = num_chunks(q, chunk_size)
    padded = torch.zeros(b, c * chunk_size, dtype=torch.float32)
    padded[:, :q] = tokens
    sums = padded.view(b, c, chunk_size).sum(dim=-1)  # [B, C]
    starts = torch.arange(c) * chunk_size
    return sums.masked_fill(starts[None, :] >= prefix[:, None], float("-inf"))


def chunkkv_from_scores(scores: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, lengths: torch.Tensor,
                        selected: int | torch.Tensor, window: int, chunk_size: int
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Keep the top floor(selected / chunk_size) chunks of `scores` [B, C] and the window.

    keys/values [B, Hkv, q, d] -> indices [B, Hkv, max_chunks * chunk_size + min(window, q)], K/V alike."""
    b, hkv, q, _ = keys.shape
    lengths = lengths.to(torch.long).reshape(b)
    budgets = as_row_budgets(selected, b)
    check_budgets(budgets, lengths, window, q)
    chunks = budgets // chunk_size  # [B]
    top = topk_lowest_index_first(scores[:, None, :], chunks)[:, 0]  # [B, k] ascending chunk ids, -1 unused
    offsets = torch.arange(chunk_size)
    idx = top[:, :, None] * chunk_size + offsets[None, None, :]  # [B, k, c] token positions
    prefix = prefix_lengths(lengths, window)
    ok = (top[:, :, None] >= 0) & (idx < prefix[:, None, None])
    idx = torch.where(ok, idx, -1).reshape(b, 1, -1).expand(b, hkv, -1)
    return gather_kept(keys, values, idx, lengths, window)


def chunkkv_select(queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, lengths: torch.Tensor,
                   selected: int | torch.Tensor, window: int, chunk_size: int = 10
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Score chunks, keep the best: (indices, K, V as `chunkkv_from_scores`, the chunk scores [B, C])."""
    scores = chunk_scores(queries, keys, lengths, window, chunk_size)
    return (*chunkkv_from_scores(scores, keys, values, lengths, selected, window, chunk_size), scores)
