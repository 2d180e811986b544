"""Stand-ins for the attributes of TensorRT-LLM objects the PyramidKV hook reads (shared by the hook's tests)."""

from __future__ import annotations

from types import SimpleNamespace

import torch

H, HKV, D = 4, 2, 8


class FakeRocket:
    """Stands in for RocketTrtllmAttention's attributes the hook reads (rocket.py sets them in __init__); its own
    predictions are never the answer."""

    def __init__(self, layer_idx: int):
        self.layer_idx, self.num_heads, self.num_kv_heads, self.head_dim = layer_idx, H, HKV, D

    def sparse_kv_predict(self, q, k, metadata, **kwargs):
        raise AssertionError("RocketKV's own selection ran")

    def sparse_attn_predict(self, q, k, metadata, **kwargs):
        raise AssertionError("RocketKV's generation-phase selection ran")


def metadata(lens: list[int]) -> SimpleNamespace:
    """The fields RocketTrtllmAttention.sparse_kv_predict reads from TrtllmAttentionMetadata."""
    return SimpleNamespace(num_contexts=len(lens), context_lens=torch.tensor(lens, dtype=torch.int32),
                           num_ctx_tokens=sum(lens))
