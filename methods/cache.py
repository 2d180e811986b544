"""The reference engine's per-layer cache, as a method's reference hooks produce it, and the row alignment the op
specifications work in (right padding) versus the Hugging Face model's (left padding)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class LayerCache:
    keys: torch.Tensor  # [B, Hc, n, d] post-RoPE
    values: torch.Tensor  # [B, Hc, n, d]
    positions: torch.Tensor  # [B, Hc, n] int64 absolute position of each cached token, -1 = unused slot
    kept: torch.Tensor  # [B, Hc, n0] int64 prompt position (0 = first real token) of what the prefill kept, -1

    @classmethod
    def from_selection(cls, idx: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> LayerCache:
        """A selection's compact rows (idx [B, Hc, n], -1 = unused; K/V [B, Hc, n, d]) as a cache: right-padded
        positions are the real tokens' absolute positions (transformers numbers them from 0)."""
        return cls(keys.contiguous(), values.contiguous(), idx.clone(), idx)


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
