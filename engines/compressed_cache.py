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

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface
from transformers.models.llama.modeling_llama import repeat_kv

from methods import KVPolicy
from methods.cache import LayerCache

ATTN_IMPLEMENTATION = "pkv"
# Attention scores held at once in the prefill, per batch row: blocks of query rows are sized to this, so a short
# prompt is one block (exactly eager's arithmetic) and a long one never holds [H, q, q].
PREFILL_BLOCK_ELEMENTS = 1 << 24


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
    num_layers: int = 0
    # The method's own, for one generation: what a layer leaves for later layers or for the decode steps
    # (ChunkKV's chunk ranking, PyramidInfer's recent rows), keyed as the method likes.
    shared: dict = field(default_factory=dict)
    # The keys the current prefill layer sees ([B, q] bool, left-padded like key_mask); None = key_mask. A method
    # that drops tokens between layers narrows it (PyramidInfer).
    visible: torch.Tensor | None = None
    # A forward of the method's own (KVzip's reconstruction pass) sets this: every attention call goes to
    # attention(state, layer, query, key, value, sliding_window) -> (out [B, s, H, d], None) instead.
    attention: Callable | None = None
    # Asked for by `inspect` only (None otherwise): layer -> the scores its selection ranked the prompt by, [B, Hc, q]
    # float32, recorded by the method (methods.base.record_scores).
    scores: dict | None = None


def compressed_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """query: [B, H, s, d], key/value: [B, Hkv, s, d] (this forward's tokens only) -> ([B, s, H, d], None)."""
    state: CompressedKVState | None = kwargs.pop("pkv_state", None)
    if state is None:
        raise RuntimeError("the 'pkv' attention needs a CompressedKVState (pass pkv_state=...)")
    sliding_window = kwargs.get("sliding_window")
    if state.attention is not None:
        return state.attention(state, module.layer_idx, query, key, value, sliding_window)
    if state.prefill:
        out = _prefill_attention(state, query, key, value, scaling, sliding_window)
        # After the layer's prefill attention: the method decides what the layer caches.
        state.layers[module.layer_idx] = state.policy.reference_layer(state, module.layer_idx, query, key, value)
        return out
    return _decode_attention(state, module, query, key, value, scaling, sliding_window)


def _prefill_attention(state: CompressedKVState, query, key, value, scaling, sliding_window):
    """Causal attention of the prompt over blocks of query rows, with eager's additive mask and float32 softmax."""
    q_len = query.shape[2]
    group = query.shape[1] // key.shape[1]
    k, v = repeat_kv(key, group), repeat_kv(value, group)
    cols = torch.arange(q_len)
    keys_seen = state.key_mask if state.visible is None else state.visible  # a method may drop tokens
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
    state.policy.reference_decode(state, module.layer_idx, cache, weights)  # per decode step (PyramidInfer)
    return out, None


def _no_mask(*args, **kwargs) -> None:
    """The 'pkv' attention builds its own block masks from the state: transformers materialises nothing."""
    return None


AttentionInterface.register(ATTN_IMPLEMENTATION, compressed_attention)
AttentionMaskInterface.register(ATTN_IMPLEMENTATION, _no_mask)
