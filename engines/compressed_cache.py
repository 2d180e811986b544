"""Per-layer compressed KV caches and the attention function that fills and reads them.

The Hugging Face model runs with `attn_implementation="pkv"` and no HF cache; each forward passes a
`CompressedKVState` as the `pkv_state` keyword, which transformers hands to every attention call. In the
prefill the attention is the ordinary full causal attention (eager's arithmetic, computed over blocks of query
rows so no [q, q] tensor exists), then the layer's K/V are compressed by the policy. In decode, each layer
attends to its own cache (its own length), masking unused slots and, for Mistral, keys outside the sliding
window measured in true absolute positions. No [B, 1, q, q] mask is ever built: the registered mask function
returns None and the attention builds each block's mask from the state.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface
from transformers.models.llama.modeling_llama import repeat_kv

from exporter.policies import KVPolicy
from trt_plugins.kvzip_select import chunk_scores, reconstruction_attention
from trt_plugins.pyramidinfer_select import (
    gather_alive,
    generation_keep,
    next_alive,
    recent_length,
    recent_rows,
    segment_evictions,
    weighted_rows,
)

ATTN_IMPLEMENTATION = "pkv"
# Attention scores held at once in the prefill, per batch row: blocks of query rows are sized to this, so a short
# prompt is one block (exactly eager's arithmetic) and a long one never holds [H, q, q].
PREFILL_BLOCK_ELEMENTS = 1 << 24


@dataclass
class LayerCache:
    keys: torch.Tensor  # [B, Hc, n, d] post-RoPE
    values: torch.Tensor  # [B, Hc, n, d]
    positions: torch.Tensor  # [B, Hc, n] int64 absolute position of each cached token, -1 = unused slot
    kept: torch.Tensor  # [B, Hc, n0] int64 prompt position (0 = first real token) of what the prefill kept, -1


@dataclass
class CompressedKVState:
    """Everything one generation needs across forwards. positions: [B, q] absolute positions of the prompt."""

    policy: KVPolicy
    selected: torch.Tensor | None  # [L, B] per-layer, per-prompt budgets; None = keep the whole prompt
    key_mask: torch.Tensor  # [B, q] bool, True = real token (left padding)
    positions: torch.Tensor  # [B, q] int64
    prefill: bool = True
    step_positions: torch.Tensor | None = None  # [B, S] absolute positions of the tokens being decoded
    layers: dict[int, LayerCache] = field(default_factory=dict)
    shared: dict = field(default_factory=dict)  # what a layer's selection leaves for later layers (index reuse)
    # KVzip's reconstruction pass (set while it runs): lengths [B], positions / taking_part [B, s] of the chunk
    # being reconstructed, span (start, end) of the context slice it repeats, and scores {layer: [B, Hkv, q]}
    # (each chunk fills its own slice).
    reconstruction: dict | None = None
    # PyramidInfer: the tokens the current layer of the prefill sees ([B, q] bool, left-padded like key_mask)
    alive: torch.Tensor | None = None
    num_layers: int = 0
    # PyramidInfer's generation stage, per layer: rows [B, r, n] (the recent tokens' attention over the layer's
    # slots, mean over heads, newest last), past [B] (valid slots after the last compression), recent [B] (R_b)
    generation: dict[int, dict] = field(default_factory=dict)


def compressed_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """query: [B, H, s, d], key/value: [B, Hkv, s, d] (this forward's tokens only) -> ([B, s, H, d], None)."""
    state: CompressedKVState | None = kwargs.pop("pkv_state", None)
    if state is None:
        raise RuntimeError("the 'pkv' attention needs a CompressedKVState (pass pkv_state=...)")
    sliding_window = kwargs.get("sliding_window")
    if state.reconstruction is not None:
        return _reconstruction_attention(state, module.layer_idx, query, key, value, sliding_window)
    if state.prefill:
        out = _prefill_attention(state, query, key, value, scaling, sliding_window)
        state.layers[module.layer_idx] = _compress(state, module.layer_idx, query, key, value)
        return out
    return _decode_attention(state, module, query, key, value, scaling, sliding_window)


def _prefill_attention(state: CompressedKVState, query, key, value, scaling, sliding_window):
    """Causal attention of the prompt over blocks of query rows, with eager's additive mask and float32 softmax."""
    q_len = query.shape[2]
    group = query.shape[1] // key.shape[1]
    k, v = repeat_kv(key, group), repeat_kv(value, group)
    cols = torch.arange(q_len)
    keys_seen = state.key_mask if state.alive is None else state.alive  # PyramidInfer: this layer's tokens only
    real = keys_seen[:, None, None, :]  # [B, 1, 1, q]
    out = []
    step = max(1, PREFILL_BLOCK_ELEMENTS // (query.shape[1] * q_len))
    for start in range(0, q_len, step):
        rows = cols[start : start + step, None]  # [r, 1]
        visible = (cols[None, :] <= rows) & real  # [B, 1, r, q]
        if sliding_window is not None:
            visible = visible & ((rows - cols[None, :]) < sliding_window)
        mask = torch.zeros(visible.shape, dtype=query.dtype).masked_fill(~visible, torch.finfo(query.dtype).min)
        weights = torch.matmul(query[:, :, start : start + step], k.transpose(2, 3)) * scaling + mask
        weights = torch.softmax(weights, dim=-1, dtype=torch.float32).to(query.dtype)
        out.append(torch.matmul(weights, v))
    return torch.cat(out, dim=2).transpose(1, 2).contiguous(), None


def _reconstruction_attention(state: CompressedKVState, layer: int, query, key, value, sliding_window):
    """KVzip's scoring: the chunk attends to the layer's whole context cache and to itself (the forward), and the
    official score's softmax (sinks, the slice this chunk repeats, itself) scores that slice. The chunk's own K/V
    are not kept."""
    cache, rec = state.layers[layer], state.reconstruction
    out = reconstruction_attention(query, key, value, cache.keys, cache.values, rec["lengths"], rec["positions"],
                                   rec["taking_part"], sliding_window)
    scores = chunk_scores(query, key, cache.keys, rec["lengths"], rec["taking_part"], *rec["span"],
                          state.policy.sinks)
    best = rec["scores"].get(layer)
    rec["scores"][layer] = scores if best is None else torch.maximum(best, scores)  # disjoint slices
    return out, None


def right_aligned(x: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
    """Move every row's real tokens to the front: left padding -> right padding. x: [B, C, q, ...], key_mask [B, q]."""
    b, q = key_mask.shape
    pad = (~key_mask).sum(-1)  # [B]
    src = (torch.arange(q)[None, :] + pad[:, None]) % q  # [B, q]
    src = src.view(b, 1, q, *([1] * (x.dim() - 3))).expand(-1, x.shape[1], -1, *x.shape[3:])
    return torch.gather(x, 2, src)


def left_aligned(x: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
    """The inverse of `right_aligned` for a [B, q] tensor: real tokens back to the end of every row."""
    b, q = key_mask.shape
    pad = (~key_mask).sum(-1)  # [B]
    return torch.gather(x, 1, (torch.arange(q)[None, :] - pad[:, None]) % q)


def _compress(state: CompressedKVState, layer: int, query, key, value) -> LayerCache:
    b, hkv, q, _ = key.shape
    policy = state.policy
    lengths = state.key_mask.sum(-1)  # [B]
    # The op works on right-padded rows (as fused attention and the ONNX engine do): shift each row first.
    key, value = right_aligned(key, state.key_mask), right_aligned(value, state.key_mask)
    if policy.drops_tokens:  # PyramidInfer: cache this layer's tokens, pass the pivotal ones on
        alive = right_aligned(state.alive[:, None], state.key_mask)[:, 0]  # [B, q]
        idx, k, v = gather_alive(key, value, alive)
        queries = right_aligned(query, state.key_mask).transpose(1, 2)  # [B, q, H, d]
        rows = recent_rows(queries, key, alive, lengths, policy.recent_ratio)  # [B, r, q] by position
        recent = torch.tensor([recent_length(int(n), policy.recent_ratio) for n in lengths])
        scores = weighted_rows(rows, recent, policy.distance_weight)
        slots = idx[:, 0, :]  # [B, n] position held by each slot
        by_slot = torch.gather(rows, 2, slots.clamp(min=0)[:, None, :].expand(-1, rows.shape[1], -1))
        state.generation[layer] = {"rows": by_slot * (slots >= 0)[:, None, :], "past": alive.sum(-1),
                                   "recent": recent}
        alive = next_alive(scores, alive, lengths, layer, state.num_layers, policy.recent_ratio, policy.decay,
                           policy.decay_schedule, policy.min_context, policy.sinks)
        state.alive = left_aligned(alive, state.key_mask)
        return LayerCache(k.contiguous(), v.contiguous(), idx.clone(), idx)
    if state.selected is None:
        real = torch.arange(q)[None, :] < lengths[:, None]  # [B, q]
        idx = torch.where(real, torch.arange(q), -1)[:, None, :].expand(b, hkv, q)
        k, v = key, value
        if policy.cache_heads_are_query_heads:
            g = query.shape[1] // hkv
            idx, k, v = idx.repeat_interleave(g, 1), key.repeat_interleave(g, 1), value.repeat_interleave(g, 1)
        zero = torch.zeros((), dtype=k.dtype)
        k, v = torch.where(idx[..., None] >= 0, k, zero), torch.where(idx[..., None] >= 0, v, zero)
    else:
        queries = right_aligned(query, state.key_mask).transpose(1, 2)  # [B, q, H, d]
        idx, k, v = policy.select(queries, key, value, lengths, state.selected[layer], layer, state.shared)
    # Right-padded positions are the real tokens' absolute positions (transformers numbers them from 0).
    return LayerCache(k.contiguous(), v.contiguous(), idx.clone(), idx)


def _decode_attention(state: CompressedKVState, module, query, key, value, scaling, sliding_window):
    """S new tokens per row (1 while generating, a whole question at batch 1) appended to the layer's cache;
    each attends to the cached tokens and to the new ones up to itself, by true absolute positions."""
    cache = state.layers[module.layer_idx]
    h, hc = query.shape[1], cache.keys.shape[1]
    if hc != key.shape[1]:  # query-head granularity caches H heads
        key, value = key.repeat_interleave(hc // key.shape[1], 1), value.repeat_interleave(hc // value.shape[1], 1)
    steps = state.step_positions.view(query.shape[0], 1, -1).expand(-1, hc, -1)  # [B, Hc, S]
    cache.keys = torch.cat([cache.keys, key], dim=2)  # [B, Hc, n + S, d]
    cache.values = torch.cat([cache.values, value], dim=2)
    cache.positions = torch.cat([cache.positions, steps], dim=2)  # [B, Hc, n + S]
    cached, new = cache.positions[:, :, None, :], steps[..., None]  # [B, Hc, 1, n + S], [B, Hc, S, 1]
    visible = (cached >= 0) & (cached <= new)
    if sliding_window is not None:
        visible &= (new - cached) < sliding_window
    # Additive mask exactly like transformers' eager path, so FullKV reproduces it bit for bit.
    mask = torch.zeros(visible.shape, dtype=query.dtype).masked_fill(~visible, torch.finfo(query.dtype).min)
    k, v = repeat_kv(cache.keys, h // hc), repeat_kv(cache.values, h // hc)
    mask = repeat_kv(mask, h // hc)  # [B, H, S, n + S]
    weights = torch.matmul(query, k.transpose(2, 3)) * scaling + mask
    weights = torch.softmax(weights, dim=-1, dtype=torch.float32).to(query.dtype)
    out = torch.matmul(weights, v).transpose(1, 2).contiguous()
    if module.layer_idx in state.generation:
        _generation_stage(state, module.layer_idx, cache, weights)
    return out, None


def _generation_stage(state: CompressedKVState, layer: int, cache: LayerCache, weights: torch.Tensor) -> None:
    """PyramidInfer while generating: record the new tokens' attention rows; a row holding `update_interval`
    tokens more than its recent window beyond its last compression compresses the segment before the window
    (its evicted slots are released: position -1, zero K/V). weights: [B, H, S, n] this forward's attention."""
    pol, gen = state.policy, state.generation[layer]
    b, _, steps, _ = weights.shape
    r = gen["rows"].shape[1]
    rows = torch.cat([gen["rows"], torch.zeros(b, r, steps)], dim=2)
    gen["rows"] = rows = torch.cat([rows, weights.float().mean(dim=1)], dim=1)[:, -r:]  # [B, r, n]
    keep = generation_keep(layer, state.num_layers, pol.gen_decay, pol.update_interval)
    for row in range(b):
        valid = (cache.positions[row, 0] >= 0).nonzero()[:, 0]  # slots in token order
        recent = int(gen["recent"][row])
        if len(valid) - recent - int(gen["past"][row]) < pol.update_interval:
            continue
        evicted = segment_evictions(rows[row, r - 1 - recent :], valid, recent, pol.update_interval, keep,
                                    pol.distance_weight)
        cache.positions[row, :, evicted] = -1
        cache.keys[row, :, evicted] = 0
        cache.values[row, :, evicted] = 0
        gen["past"][row] = len(valid) - len(evicted) - recent


def _no_mask(*args, **kwargs) -> None:
    """The 'pkv' attention builds its own block masks from the state: transformers materialises nothing."""
    return None


AttentionInterface.register(ATTN_IMPLEMENTATION, compressed_attention)
AttentionMaskInterface.register(ATTN_IMPLEMENTATION, _no_mask)
