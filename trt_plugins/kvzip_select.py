"""Specification of KVzip's selection (arXiv 2505.23416), in plain PyTorch: scores from a context-reconstruction
pass, one top-k over every layer and KV head at once, and per-head cache lengths.

KVzip is query-agnostic: after the context is prefilled, the model is teacher-forced to repeat it ("Repeat the
previous context exactly." followed by the context again), attending to the context's cache; a cached pair is
worth what the reconstruction attends to it. The contract every backend follows is the official code's
(snu-mllab/KVzip: `model/wrapper.py` `self_task`/`scoring`, `attention/score.py` `_get_score`), with the first
`sinks` tokens in the role of its system prompt (there is no chat template here):

* rows are right-padded (row b's real tokens are [0, lengths[b])); each layer's context cache is keys / values
  [B, Hkv, q, d], post-RoPE;
* the first `sinks` tokens are the "system prompt": never scored, always kept, and attended in every chunk's
  score; the rest of the context, [sinks, q), is reconstructed in chunks of `chunk` tokens from position `sinks`
  (chunk i repeats [sinks + i * chunk, sinks + (i + 1) * chunk)). Chunk i's input is a repeat prompt, then the
  chunk's tokens: the first chunk's prompt is FIRST_PROMPT, a later chunk's is LATER_PROMPT followed by the
  previous chunk's last `postfix` tokens. Token j of row b's input sits at position lengths[b] + j; a row takes
  part in chunk i while its start is below lengths[b], and its input tokens past its context's end do not;
* the forward pass (what the next layer receives): each input token attends (softmax in float32) to the row's
  real context keys and to its own chunk input's keys up to itself; with a sliding window (Mistral) only to keys
  within the window, by absolute position; a token that takes no part attends to its own chunk input's keys only;
* the score is a second softmax (float32) over the keys the official code scores with: the sink keys, the keys
  of the context slice this chunk repeats, and the chunk input's own keys up to itself (no sliding window: the
  official score ignores it too). Context token t of chunk i scores the maximum, over chunk i's taking-part input
  tokens and the query heads of KV head h, of that probability: each token is scored by the one chunk that
  repeats it (the official code concatenates the chunks' scores);
* the sinks score 2.0 (above any probability): always kept; padding scores -1;
* row b keeps its top min(C, lengths[b]) * L * Hkv pairs over the flattened [L, Hkv, q] scores (ties to the
  lower flat index, ONNX TopK's rule), so C is the mean cache length per head, as for every other policy (the
  official code thresholds a ratio of the context's pairs and keeps its system prompt on top);
* per layer, each head's kept positions are compact and ascending; the layer holds n_l = the largest count of
  any row and head; a head's slots after its count hold -1 and zero K/V (masked by the decode).
"""

from __future__ import annotations

import torch

from trt_plugins.pyramidkv_select import compact_ascending

FIRST_PROMPT = "\n\nRepeat the previous context exactly."
LATER_PROMPT = "\n\nRepeat the part of the previous context exactly, starting with "
SINK_SCORE = 2.0


def chunk_count(q: int, chunk: int, sinks: int = 0) -> int:
    """Chunks of the scoring pass for a padded length q: the context after the sinks, `chunk` tokens each."""
    return max(1, -(-(q - sinks) // chunk))


def chunk_span(i: int, q: int, chunk: int, sinks: int) -> tuple[int, int]:
    """[start, end) of the context slice chunk i repeats (clipped to q; empty when nothing is left)."""
    start = min(sinks + i * chunk, q)
    return start, min(start + chunk, q)


def chunk_inputs(context_ids: torch.Tensor, lengths: torch.Tensor, i: int, chunk: int, postfix: int,
                 first: list[int], later: list[int], pad: int, sinks: int = 0
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Reconstruction input of chunk i. context_ids: [B, q] right-padded, lengths [B]
    -> ids [B, s], positions [B, s] (lengths[b] + j), taking_part [B, s] bool."""
    b, q = context_ids.shape
    start, end = chunk_span(i, q, chunk, sinks)
    if i == 0:
        prompt = torch.tensor(first, dtype=torch.long).expand(b, -1)
    else:  # the official code's postfix: the previous chunk's last tokens (never more than that chunk)
        tail = context_ids[:, max(start - postfix, start - chunk) : start]
        prompt = torch.cat([torch.tensor(later, dtype=torch.long).expand(b, -1), tail], dim=1)
    ids = torch.cat([prompt, context_ids[:, start:end]], dim=1)  # [B, s]
    s, p = ids.shape[1], prompt.shape[1]
    j = torch.arange(s)
    in_context = (start + j[None, :] - p) < lengths[:, None]  # prompt tokens: start - p + j < start < len
    taking_part = in_context & (start < lengths[:, None])
    return torch.where(taking_part, ids, pad), lengths[:, None] + j[None, :], taking_part


def chunk_scores(query: torch.Tensor, own_keys: torch.Tensor, cache_keys: torch.Tensor, lengths: torch.Tensor,
                 taking_part: torch.Tensor, start: int, end: int, sinks: int) -> torch.Tensor:
    """The official score of one chunk at one layer. query [B, H, s, d], own keys [B, Hkv, s, d], cache keys
    [B, Hkv, q, d] -> [B, Hkv, q] float32: each token of the slice [start, end) its maximum probability, 0
    elsewhere. The softmax runs over the sink keys, the slice's keys and the input's own keys up to itself."""
    b, h, s, d = query.shape
    hkv, q = cache_keys.shape[1], cache_keys.shape[2]
    group = h // hkv
    ns = min(sinks, q)
    keys = torch.cat([cache_keys[:, :, :ns], cache_keys[:, :, start:end], own_keys], dim=2).float()
    keys = keys.repeat_interleave(group, dim=1)  # [B, H, ns + n + s, d]
    cols = torch.cat([torch.arange(ns), torch.arange(start, end)])  # context positions of the cached keys
    real = (cols[None, :] < lengths[:, None])[:, None, :].expand(b, s, -1)  # [B, s, ns + n]
    causal = torch.ones(s, s, dtype=torch.bool).tril().expand(b, s, s)  # own keys: up to itself
    visible = torch.cat([real, causal], dim=2)  # [B, s, ns + n + s]
    logits = (query.float() * d**-0.5) @ keys.transpose(-1, -2)  # [B, H, s, ns + n + s]
    probs = torch.softmax(logits.masked_fill(~visible[:, None], torch.finfo(torch.float32).min), dim=-1)
    probs = probs[..., ns : ns + end - start] * taking_part[:, None, :, None]  # [B, H, s, n]: the slice, real rows
    best = probs.amax(dim=2).view(b, hkv, group, -1).amax(dim=2)  # [B, Hkv, n]
    out = torch.zeros(b, hkv, q, dtype=torch.float32)
    out[..., start:end] = best
    return out


def reconstruction_attention(
    query: torch.Tensor, own_keys: torch.Tensor, own_values: torch.Tensor, cache_keys: torch.Tensor,
    cache_values: torch.Tensor, lengths: torch.Tensor, positions: torch.Tensor, taking_part: torch.Tensor,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """One layer of the reconstruction pass, the forward half. query [B, H, s, d]; own keys / values
    [B, Hkv, s, d] (this chunk's input); cache keys / values [B, Hkv, q, d] (the context); positions,
    taking_part [B, s] -> attention output [B, s, H, d] in the query's dtype."""
    b, h, s, d = query.shape
    hkv, q = cache_keys.shape[1], cache_keys.shape[2]
    group = h // hkv
    keys = torch.cat([cache_keys, own_keys], dim=2).float().repeat_interleave(group, dim=1)  # [B, H, q + s, d]
    values = torch.cat([cache_values, own_values], dim=2).float().repeat_interleave(group, dim=1)
    key_pos = torch.cat([torch.arange(q).expand(b, q), positions], dim=1)  # [B, q + s]
    real = (torch.arange(q)[None, :] < lengths[:, None])[:, None, :] & taking_part[:, :, None]  # [B, s, q]
    real = torch.cat([real, torch.ones(b, s, s, dtype=torch.bool)], dim=2)
    visible = real & (key_pos[:, None, :] <= positions[:, :, None])  # [B, s, q + s]
    if sliding_window is not None:
        visible &= (positions[:, :, None] - key_pos[:, None, :]) < sliding_window
    logits = (query.float() * d**-0.5) @ keys.transpose(-1, -2)  # [B, H, s, q + s]
    probs = torch.softmax(logits.masked_fill(~visible[:, None], torch.finfo(torch.float32).min), dim=-1)
    return (probs @ values).to(query.dtype).transpose(1, 2).contiguous()  # [B, s, H, d]


def kvzip_select(
    scores: list[torch.Tensor], keys: list[torch.Tensor], values: list[torch.Tensor], lengths: torch.Tensor,
    kv_budget: int, sinks: int,
) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Per layer l: scores [B, Hkv, q] float32, keys / values [B, Hkv, q, d] -> per layer (indices [B, Hkv, n_l],
    K, V [B, Hkv, n_l, d]), as the module docstring says."""
    num_layers = len(scores)
    b, hkv, q = scores[0].shape
    pos = torch.arange(q)
    flat = torch.stack(scores, dim=1).float()  # [B, L, Hkv, q]
    flat = torch.where(pos < sinks, SINK_SCORE, flat)
    flat = torch.where((pos[None, :] < lengths[:, None])[:, None, None, :], flat, -1.0)  # padding: never kept
    budgets = torch.clamp(lengths, max=kv_budget) * num_layers * hkv  # [B] pairs each row keeps
    k = int(budgets.max())
    order = torch.sort(flat.reshape(b, -1), dim=-1, descending=True, stable=True).indices[:, :k]  # [B, k] by rank
    used = torch.arange(k)[None, :] < budgets[:, None]
    keep = torch.zeros(b, num_layers * hkv * q, dtype=torch.bool)
    keep.scatter_(1, order, used)
    keep = keep.view(b, num_layers, hkv, q)
    out = []
    for layer in range(num_layers):
        held = keep[:, layer]  # [B, Hkv, q]
        n = int(held.sum(-1).max())
        idx = compact_ascending(torch.where(held, pos, -1))[..., :n]  # [B, Hkv, n]
        gidx = idx.clamp(min=0).unsqueeze(-1).expand(-1, -1, -1, keys[layer].shape[-1])
        used_slot = (idx >= 0).unsqueeze(-1)
        zero = torch.zeros((), dtype=keys[layer].dtype)
        out.append((idx, torch.where(used_slot, torch.gather(keys[layer], 2, gidx), zero),
                    torch.where(used_slot, torch.gather(values[layer], 2, gidx), zero)))
    return out
