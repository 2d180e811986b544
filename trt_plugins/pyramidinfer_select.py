"""Specification of PyramidInfer's prefill selection (Yang et al., ACL Findings 2024), in plain PyTorch.

PyramidInfer compresses *during* the prefill: layer l caches the tokens alive at layer l (every token at layer
0); after layer l, the recent window scores the other alive tokens and only the pivotal context (PvC) goes on to
layer l + 1, so deeper layers compute over fewer tokens and cache fewer (the paper's code drops their hidden
states). The contract, as the paper's code computes it:

* rows are right-padded; row b has L_b = lengths[b] tokens; its recent window is its last 1 + R_b tokens,
  R_b = int(L_b * recent_ratio), always alive; its context is every other token, C_b = L_b - 1 - R_b at layer 0;
* at layer l the alive tokens attend (causally, by position) to the alive tokens only; the recent window's
  attention probabilities (float32 softmax) are averaged over the query heads, weighted over the window's rows
  linearly from 1 (its oldest row) to `distance_weight` (its newest) and averaged over the rows: one score per
  alive context token (the ensemble); the first `sinks` tokens outrank everything;
* the layer keeps k = int(c * keep_l) of its c alive context tokens (top scores, ties to the lower position),
  or all of them when that is not more than m_b = min(min_context, C_b), or when c <= m_b or keep_l >= 1;
  keep_l = `decay` for every layer ("geometric": the context shrinks as decay^l) or the paper code's
  "cosine" ramp (1 - decay) * (cos(pi * l / L) + 1) / 2 + decay;
* positions are the tokens' own ("gather"): a kept key keeps the rotation of its original position.
The counts depend on L_b only (`context_counts`), so `plan` knows every layer's cache length in advance.

Generation (the paper's code, `generation_stage`): every layer keeps the attention rows (mean over heads) of the
last 1 + R_b tokens it processed, over its cache. After a forward, a row whose cache holds `update_interval` (E)
tokens more than 1 + R_b beyond what it held after its last compression (its prefill cache at first) compresses
the E tokens just before its recent window: the same weighted ensemble of its recent rows scores them and
`generation_keep` of them stay (top scores, ties to the lower slot), in order. So the first compression comes
after R_b + E new tokens, then one every E tokens.
"""

from __future__ import annotations

import math

import torch

from trt_plugins.pyramidkv_select import compact_ascending, topk_lowest_index_first

SCHEDULES = ("geometric", "cosine")
SINK_SCORE = 1e30
GEN_COMPRESS_RATIO = 0.9  # the paper code's gen_compress_ratio default


def keep_ratio(layer: int, num_layers: int, decay: float, schedule: str) -> float:
    if schedule == "cosine":
        return (1.0 - decay) * (math.cos(math.pi * layer / num_layers) + 1) / 2 + decay
    return decay


def recent_length(length: int, recent_ratio: float) -> int:
    """R: the recent window is the last 1 + R tokens."""
    return int(length * recent_ratio)


def context_counts(length: int, num_layers: int, recent_ratio: float, decay: float, schedule: str,
                   min_context: int) -> list[int]:
    """Alive context tokens at each layer (what layer l caches besides the 1 + R recent tokens)."""
    context = length - 1 - recent_length(length, recent_ratio)
    if context <= 0:
        return [max(context, 0)] * num_layers
    floor = min(min_context, context)
    counts = []
    for layer in range(num_layers):
        counts.append(context)
        keep = keep_ratio(layer, num_layers, decay, schedule)
        if context > floor and keep < 1.0:
            kept = int(context * keep)
            context = kept if kept > floor else context
    return counts


def generation_keep(layer: int, num_layers: int, gen_decay: float, exceed: int) -> int:
    """Tokens of a compressed segment of `exceed` that layer `layer` keeps while generating (the paper code's
    cosine schedule of `gen_decay`)."""
    return max(int(exceed * GEN_COMPRESS_RATIO * keep_ratio(layer, num_layers, gen_decay, "cosine")), 1)


def recent_rows(queries: torch.Tensor, keys: torch.Tensor, alive: torch.Tensor, lengths: torch.Tensor,
                recent_ratio: float) -> torch.Tensor:
    """The recent window's attention rows, mean over the query heads. queries [B, q, H, d], keys [B, Hkv, q, d]
    (post-RoPE), alive [B, q] bool, lengths [B] -> [B, r, q] float32, r = 1 + max R_b, right-aligned: row i of
    row b is the token at position L_b - r + i (rows before its window are zeros)."""
    b, q, h, d = queries.shape
    hkv = keys.shape[1]
    recent = torch.tensor([recent_length(int(n), recent_ratio) for n in lengths])
    rows = int(recent.max()) + 1
    pos = lengths[:, None] - rows + torch.arange(rows)[None, :]  # [B, r]
    in_window = torch.arange(rows)[None, :] >= (rows - 1 - recent)[:, None]
    safe = pos.clamp(min=0)
    qr = torch.gather(queries.float(), 1, safe[:, :, None, None].expand(-1, -1, h, d))  # [B, r, H, d]
    k = keys.float().repeat_interleave(h // hkv, dim=1)  # [B, H, q, d]
    logits = qr.transpose(1, 2) @ k.transpose(-1, -2) / d**0.5  # [B, H, r, q]
    cols = torch.arange(q)
    visible = alive[:, None, :] & (cols[None, None, :] <= safe[:, :, None])  # [B, r, q]
    probs = torch.softmax(logits.masked_fill(~visible[:, None], torch.finfo(torch.float32).min), dim=-1)
    return probs.mean(dim=1) * in_window[:, :, None]


def weighted_rows(rows: torch.Tensor, recent: torch.Tensor, distance_weight: float) -> torch.Tensor:
    """The ensemble: rows [B, r, T] right-aligned, recent [B] R_b -> [B, T], each row's last 1 + R_b rows weighted
    linearly from 1 (the oldest) to `distance_weight` (the newest) and averaged."""
    r = rows.shape[1]
    j = (torch.arange(r)[None, :] - (r - 1 - recent)[:, None]).float()  # [B, r] index in the row's window
    weight = 1.0 + (distance_weight - 1.0) * j / recent.clamp(min=1).float()[:, None]
    weight = torch.where(j >= 0, weight, 0.0)
    return (rows * weight[:, :, None]).sum(dim=1) / (recent + 1).float()[:, None]


def ensemble_scores(queries: torch.Tensor, keys: torch.Tensor, alive: torch.Tensor, lengths: torch.Tensor,
                    recent_ratio: float, distance_weight: float) -> torch.Tensor:
    """queries [B, q, H, d], keys [B, Hkv, q, d] (post-RoPE), alive [B, q] bool, lengths [B]
    -> [B, q] float32: each alive key's ensemble score (0 elsewhere)."""
    recent = torch.tensor([recent_length(int(n), recent_ratio) for n in lengths])
    return weighted_rows(recent_rows(queries, keys, alive, lengths, recent_ratio), recent, distance_weight)


def segment_evictions(rows: torch.Tensor, valid_slots: torch.Tensor, recent: int, exceed: int, keep: int,
                      distance_weight: float) -> torch.Tensor:
    """One row's generation-stage compression. rows [r, T] (its attention rows over its cache slots, newest
    last), valid_slots [m] its used slots in token order -> the slots to evict: the segment of `exceed` tokens
    before the recent window, less its `keep` best by the weighted ensemble."""
    segment = valid_slots[len(valid_slots) - 1 - recent - exceed : len(valid_slots) - 1 - recent]  # [E]
    scores = weighted_rows(rows[None, :, segment], torch.tensor([recent]), distance_weight)  # [1, E]
    picks = topk_lowest_index_first(scores[None], torch.tensor([keep]))[0, 0]
    keep_mask = torch.zeros(len(segment), dtype=torch.bool)
    keep_mask[picks[picks >= 0]] = True
    return segment[~keep_mask]


def next_alive(scores: torch.Tensor, alive: torch.Tensor, lengths: torch.Tensor, layer: int, num_layers: int,
               recent_ratio: float, decay: float, schedule: str, min_context: int, sinks: int) -> torch.Tensor:
    """The tokens alive at layer + 1: the recent window and the top context tokens. scores [B, q] -> [B, q] bool."""
    b, q = scores.shape
    pos = torch.arange(q)
    out = alive.clone()
    for row in range(b):
        n = int(lengths[row])
        counts = context_counts(n, num_layers, recent_ratio, decay, schedule, min_context)
        if layer + 1 >= num_layers or counts[layer + 1] == counts[layer]:
            continue
        context = alive[row] & (pos < n - 1 - recent_length(n, recent_ratio))
        ranked = torch.where(pos < sinks, SINK_SCORE, scores[row].float())
        ranked = ranked.masked_fill(~context, float("-inf"))
        picks = topk_lowest_index_first(ranked.view(1, 1, q), torch.tensor([counts[layer + 1]]))[0, 0]
        out[row] = (alive[row] & ~context)
        out[row, picks[picks >= 0]] = True
    return out


def gather_alive(keys: torch.Tensor, values: torch.Tensor, alive: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The layer's cache: its alive tokens, compact and ascending, the same for every head.
    keys / values [B, Hkv, q, d], alive [B, q] -> indices [B, Hkv, n], K, V [B, Hkv, n, d] (n: most alive)."""
    b, hkv, q, d = keys.shape
    n = int(alive.sum(-1).max())
    idx = compact_ascending(torch.where(alive, torch.arange(q), -1))[:, :n]  # [B, n]
    idx = idx[:, None, :].expand(b, hkv, n)
    gidx = idx.clamp(min=0).unsqueeze(-1).expand(-1, -1, -1, d)
    used = (idx >= 0).unsqueeze(-1)
    zero = torch.zeros((), dtype=keys.dtype)
    return (idx.contiguous(), torch.where(used, torch.gather(keys, 2, gidx), zero),
            torch.where(used, torch.gather(values, 2, gidx), zero))
