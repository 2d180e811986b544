"""ChunkKV's selection (arXiv 2502.00299) in the same contract as `pyramidkv_select` (right padding, compact
output, per-row budgets): chunks of `chunk_size` consecutive prompt tokens, scored together, kept together. The
chunk grid and the window's chunks are kvpress's (`ChunkKVPress` over `SnapKVPress`, the implementation the
ChunkKV authors contributed):

* token scores are SnapKV's observation scores of the prefix [0, lengths[b] - w_b) (the last w_b = min(window,
  lengths[b]) real tokens attending, float32), averaged over each KV head's query group, pooled along keys as
  the op spec pools (`kernel`, `pooling`; kernel 1 = none, the paper's Algorithm 1; kvpress's SnapKVPress
  default is avg pooling of width 5, count_include_pad), and summed over the KV heads: one selection for all
  KV heads of a layer;
* the whole row [0, lengths[b]) is cut into chunks from position 0 (the last one may be partial); a chunk's
  score is the sum of its tokens' scores (kvpress takes the mean: the same ranking, as every chunk but the last
  is whole and the last one holds the window);
* the chunks that hold any window token (from floor((lengths[b] - w_b) / chunk_size) on) are always kept, whole
  (kvpress gives the window's tokens the highest score, so these chunks rank first there: here that is certain);
  the boundary chunk keeps the prefix tokens it shares with the window;
* row b keeps its window chunks (t_b tokens) and its top n_b = (selected[b] + w_b - t_b) // chunk_size other
  chunks (ties to the lower chunk), every token of them, in original order: at most selected[b] + w_b tokens;
  when chunk_size divides lengths[b] and the window, that is floor(selected[b] / chunk_size) chunks and the
  window;
* layer-wise index reuse: `chunkkv_from_scores` selects from chunk scores computed at another layer (the first
  of a group of `reuse` layers), skipping the attention scoring entirely; with a per-layer budget the layer
  takes its own number of chunks from the shared ranking.
"""

from __future__ import annotations

import torch

from trt_plugins.pyramidkv_select import (
    gather_kept,
    observation_scores_for,
    pool_scores,
    prefix_lengths,
    row_budgets,
    topk_lowest_index_first,
)


def num_chunks(q: int, chunk_size: int) -> int:
    return -(-q // chunk_size)


def window_chunks(lengths: torch.Tensor, window: int, chunk_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[B] the first chunk holding a window token, and [B] how many chunks from it to the row's end."""
    first = prefix_lengths(lengths, window) // chunk_size
    return first, (lengths + chunk_size - 1) // chunk_size - first


def chunk_scores(queries: torch.Tensor, keys: torch.Tensor, lengths: torch.Tensor, window: int,
                 chunk_size: int, kernel: int = 1, pooling: str = "avg") -> torch.Tensor:
    """queries [B, q, H, d], keys [B, Hkv, q, d], lengths [B] -> [B, C] float32, C = ceil(q / chunk_size):
    +inf for the chunks holding the window, -inf for chunks at or after a row's end."""
    scores = observation_scores_for(queries, keys, lengths, window, "window")
    return chunk_scores_from(scores, keys.shape[1], lengths, window, chunk_size, kernel, pooling)


def chunk_scores_from(scores: torch.Tensor, num_kv_heads: int, lengths: torch.Tensor, window: int, chunk_size: int,
                      kernel: int = 1, pooling: str = "avg") -> torch.Tensor:
    """`chunk_scores` after the attention: the window's observation scores [B, H, q] float32
    (`observation_scores_for`, what one prefill hands every selection that reads them) -> [B, C] as `chunk_scores`."""
    b, _, q = scores.shape
    hkv = num_kv_heads
    lengths = lengths.to(torch.long).reshape(b)
    scores = scores.view(b, hkv, -1, q).mean(dim=2)  # [B, Hkv, q]: the query group's mean
    in_prefix = (torch.arange(q)[None, :] < prefix_lengths(lengths, window)[:, None])[:, None, :]  # [B, 1, q]
    tokens = pool_scores(scores.masked_fill(~in_prefix, 0.0), kernel, pooling)
    tokens = tokens.masked_fill(~in_prefix, 0.0).sum(dim=1)  # [B, q]
    c = num_chunks(q, chunk_size)
    padded = torch.zeros(b, c * chunk_size, dtype=torch.float32)
    padded[:, :q] = tokens
    sums = padded.view(b, c, chunk_size).sum(dim=-1)  # [B, C]
    ids = torch.arange(c)[None, :]
    first, _ = window_chunks(lengths, window, chunk_size)
    sums = sums.masked_fill(ids >= first[:, None], float("inf"))
    return sums.masked_fill(ids * chunk_size >= lengths[:, None], float("-inf"))


def chunkkv_from_scores(scores: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, lengths: torch.Tensor,
                        selected: int | torch.Tensor, window: int, chunk_size: int
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Keep each row's window chunks and its top n_b other chunks of `scores` [B, C] (module docstring).

    keys/values [B, Hkv, q, d] -> indices [B, Hkv, n] (n: the most tokens any row keeps), K/V alike."""
    b, hkv, q, _ = keys.shape
    lengths, budgets = row_budgets(lengths, selected, window, q)
    first, n_window = window_chunks(lengths, window, chunk_size)
    window_tokens = lengths - first * chunk_size  # t_b
    others = torch.clamp(budgets + lengths.clamp(max=window) - window_tokens, min=0) // chunk_size
    top = topk_lowest_index_first(scores[:, None, :], n_window + others)[:, 0]  # [B, k] ascending, -1 unused
    idx = top[:, :, None] * chunk_size + torch.arange(chunk_size)[None, None, :]  # [B, k, c] token positions
    ok = (top[:, :, None] >= 0) & (idx < lengths[:, None, None])
    idx = torch.where(ok, idx, -1).reshape(b, 1, -1).expand(b, hkv, -1)
    idx, k, v = gather_kept(keys, values, idx, lengths, 0)  # the window is in its chunks
    n = int((idx >= 0).sum(-1).max()) if idx.numel() else 0  # a partial chunk leaves slots unused: drop them
    return idx[..., :n], k[..., :n, :], v[..., :n, :]


def chunkkv_select(queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, lengths: torch.Tensor,
                   selected: int | torch.Tensor, window: int, chunk_size: int = 10, kernel: int = 1,
                   pooling: str = "avg") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Score chunks, keep the best: (indices, K, V as `chunkkv_from_scores`, the chunk scores [B, C])."""
    scores = chunk_scores(queries, keys, lengths, window, chunk_size, kernel, pooling)
    return (*chunkkv_from_scores(scores, keys, values, lengths, selected, window, chunk_size), scores)


def chunkkv_select_scored(scores: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, lengths: torch.Tensor,
                          selected: int | torch.Tensor, window: int, chunk_size: int = 10, kernel: int = 1,
                          pooling: str = "avg") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """`chunkkv_select` from the window's observation scores [B, H, q] (`observation_scores_for`) instead of the
    queries: the same (indices, K, V, chunk scores [B, C])."""
    chunks = chunk_scores_from(scores, keys.shape[1], lengths, window, chunk_size, kernel, pooling)
    return (*chunkkv_from_scores(chunks, keys, values, lengths, selected, window, chunk_size), chunks)
