"""Per-layer compressed KV caches and the attention function that fills and reads them.

The Hugging Face model runs with `attn_implementation="pkv"` and no HF cache; each forward passes a
`CompressedKVState` as the `pkv_state` keyword, which transformers hands to every attention call. In the
prefill the attention is the ordinary full (eager) attention, then the layer's K/V are compressed by the
policy. In decode, each layer attends to its own cache (its own length), masking padding slots and, for
Mistral, keys outside the sliding window measured in true absolute positions.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, eager_mask
from transformers.models.llama.modeling_llama import eager_attention_forward, repeat_kv

from exporter.policies import KVPolicy

ATTN_IMPLEMENTATION = "pkv"


@dataclass
class LayerCache:
    keys: torch.Tensor  # [B, Hc, n, d] post-RoPE
    values: torch.Tensor  # [B, Hc, n, d]
    positions: torch.Tensor  # [B, Hc, n] int64 absolute position of each cached token, -1 = padding slot
    kept: torch.Tensor  # [B, Hc, n0] int64 padded prompt index of what the prefill kept


@dataclass
class CompressedKVState:
    """Everything one generation needs across forwards. positions: [B, q] absolute positions of the prompt."""

    policy: KVPolicy
    selected: torch.Tensor | None  # [L, B] per-layer, per-prompt budgets; None = keep the whole prompt
    key_mask: torch.Tensor  # [B, q] bool, True = real token
    positions: torch.Tensor  # [B, q] int64
    prefill: bool = True
    step_positions: torch.Tensor | None = None  # [B] absolute position of the token being decoded
    layers: dict[int, LayerCache] = field(default_factory=dict)


def compressed_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """query: [B, H, s, d], key/value: [B, Hkv, s, d] (this forward's tokens only) -> ([B, s, H, d], None)."""
    state: CompressedKVState | None = kwargs.pop("pkv_state", None)
    sliding_window = kwargs.get("sliding_window")
    if state is None:
        return eager_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout)
    if state.prefill:
        out = eager_attention_forward(module, query, key, value, attention_mask, scaling=scaling)
        state.layers[module.layer_idx] = _compress(state, module.layer_idx, query, key, value)
        return out
    return _decode_attention(state, module, query, key, value, scaling, sliding_window)


def _compress(state: CompressedKVState, layer: int, query, key, value) -> LayerCache:
    b, hkv, q, _ = key.shape
    policy = state.policy
    if state.selected is None:
        idx = torch.arange(q).expand(b, hkv, q)
        k, v = key, value
        if policy.cache_heads_are_query_heads:
            g = query.shape[1] // hkv
            idx, k, v = idx.repeat_interleave(g, 1), key.repeat_interleave(g, 1), value.repeat_interleave(g, 1)
    else:
        idx, k, v = policy.select(query, key, value, state.selected[layer], state.key_mask)
    safe = idx.clamp(min=0)  # -1 marks a slot a prompt with a smaller budget leaves unused
    pos = torch.gather(state.positions.unsqueeze(1).expand(-1, idx.shape[1], -1), 2, safe)
    real = torch.gather(state.key_mask.unsqueeze(1).expand(-1, idx.shape[1], -1), 2, safe) & (idx >= 0)
    return LayerCache(k.contiguous(), v.contiguous(), pos.masked_fill(~real, -1), idx)


def _decode_attention(state: CompressedKVState, module, query, key, value, scaling, sliding_window):
    cache = state.layers[module.layer_idx]
    h, hc = query.shape[1], cache.keys.shape[1]
    if hc != key.shape[1]:  # query-head granularity caches H heads
        key, value = key.repeat_interleave(hc // key.shape[1], 1), value.repeat_interleave(hc // value.shape[1], 1)
    step = state.step_positions.view(-1, 1, 1).expand(-1, hc, 1)  # [B, Hc, 1]
    cache.keys = torch.cat([cache.keys, key], dim=2)  # [B, Hc, n + 1, d]
    cache.values = torch.cat([cache.values, value], dim=2)
    cache.positions = torch.cat([cache.positions, step], dim=2)  # [B, Hc, n + 1]
    visible = cache.positions >= 0
    if sliding_window is not None:
        visible &= (step - cache.positions) < sliding_window
    # Additive mask exactly like transformers' eager path, so FullKV reproduces it bit for bit.
    mask = torch.zeros(visible.shape, dtype=query.dtype).masked_fill(~visible, torch.finfo(query.dtype).min)
    k, v = repeat_kv(cache.keys, h // hc), repeat_kv(cache.values, h // hc)
    mask = repeat_kv(mask.unsqueeze(2), h // hc)  # [B, H, 1, n + 1]
    weights = torch.matmul(query, k.transpose(2, 3)) * scaling + mask
    weights = torch.softmax(weights, dim=-1, dtype=torch.float32).to(query.dtype)
    return torch.matmul(weights, v).transpose(1, 2).contiguous(), None


AttentionInterface.register(ATTN_IMPLEMENTATION, compressed_attention)
AttentionMaskInterface.register(ATTN_IMPLEMENTATION, eager_mask)
