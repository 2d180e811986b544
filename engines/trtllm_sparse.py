"""PyramidKV / SnapKV as a sparse-attention algorithm of TensorRT-LLM 1.2's PyTorch backend.

TensorRT-LLM 1.2 compresses a sequence's KV cache after the context phase through the sparse-attention hook
`TrtllmAttention.sparse_kv_predict(q, k, metadata)`, which returns, per KV head, the sorted positions to keep of
every context sequence (RocketKV's prefill is SnapKV there). Its runtime holds ONE KV length per request for all
layers (the metadata's offsets and the cache manager's rewind are per request), so per-layer budgets cannot be
represented without patching its metadata, `plan()`, the C++ cache compaction and the cache manager.

The integration here is the smallest that is honest about that: every layer keeps the same number of tokens,
the largest of the PyramidKV layer budgets (layer 0's), but each layer, and each KV head, selects its own tokens
by PyramidKV's scoring (SnapKV: observation window, pooling). Because top-k sets are nested, each layer's kept set
contains exactly what PyramidKV would keep there, plus the extra tokens up to layer 0's budget: accuracy at least
PyramidKV's, memory L x max_l(budget_l) instead of sum_l budget_l (for 32 layers at C = 128, w = 8: 242 instead of
the pyramid's mean of 133.5 tokens per layer, 1.8x). `context_indices` (pure PyTorch, tested on CPU against the
op specification) builds the hook's output; `install()` (GPU hosts, TensorRT-LLM 1.2 only) registers the
algorithm by subclassing RocketKV's attention, whose metadata and cache manager already shrink each request to
`prompt_budget`.
"""

from __future__ import annotations

import torch

from trt_plugins.pyramidkv_select import pyramidkv_select


def context_indices(qkv: torch.Tensor, seq_lens: list[int], num_heads: int, num_kv_heads: int, head_dim: int,
                    budget: int, window: int, kernel: int = 7, pooling: str = "max"
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """The context-phase output of the hook, in RocketKV's layout.

    qkv: [num_tokens, (H + 2 Hkv) * d] post-RoPE fused projections of the context sequences, back to back;
    seq_lens: their lengths; budget: tokens kept per sequence and head, the window included.
    Returns indices int32 [Hkv, total] (per sequence: sorted positions relative to its start; a sequence shorter
    than the budget keeps all its tokens) and offsets int32 [num_sequences + 1] into them.
    """
    q_all, k_all, _ = qkv.split([num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim], dim=-1)
    pieces, offsets, start = [], [0], 0
    for n in seq_lens:
        q = q_all[start : start + n].view(1, n, num_heads, head_dim)
        k = k_all[start : start + n].view(n, num_kv_heads, head_dim).transpose(0, 1)[None]  # [1, Hkv, n, d]
        if n < budget:
            idx = torch.arange(n).expand(num_kv_heads, n)
        else:
            kept, _, _ = pyramidkv_select(q, k, k, torch.tensor([n]), budget - min(window, n), window, kernel,
                                          pooling)
            idx = kept[0]  # [Hkv, budget]: compact, every slot used
        pieces.append(idx.to(torch.int32))
        offsets.append(offsets[-1] + idx.shape[-1])
        start += n
    return torch.cat(pieces, dim=-1), torch.tensor(offsets, dtype=torch.int32)


def install(policy_record: dict, num_layers: int, max_input_len: int):  # pragma: no cover - TensorRT-LLM 1.2, GPU
    """Register the `pyramidkv` algorithm with TensorRT-LLM 1.2's PyTorch backend; returns its config object."""
    from tensorrt_llm._torch.attention_backend.sparse import rocket, utils
    from tensorrt_llm.llmapi import RocketSparseAttentionConfig

    from exporter.policies import check_policy_record

    policy = check_policy_record(policy_record)
    selected = policy.layer_selected(num_layers, max_input_len) or [max_input_len]
    budget = max(selected) + policy.window  # the runtime's one length per request: the largest layer budget

    class PyramidKVTrtllmAttention(rocket.RocketTrtllmAttention):
        """RocketKV's attention with the context selection replaced; no generation-phase sparsity."""

        def sparse_kv_predict(self, q, k, metadata, **kwargs):
            lens = metadata.prompt_lens[: metadata.num_contexts] if hasattr(metadata, "prompt_lens") else None
            if lens is None or q is None or metadata.num_contexts == 0:
                return None, None
            indices, offsets = context_indices(q.float(), [int(n) for n in lens], self.num_heads,
                                               self.num_kv_heads, self.head_dim, budget, policy.window,
                                               getattr(policy, "kernel", 1), getattr(policy, "pooling", "max"))
            return indices.to(q.device), offsets.to(q.device)

        def sparse_attn_predict(self, q, k, metadata, **kwargs):
            return None, None

    original = utils.get_trtllm_sparse_attn_attention_backend

    def backend_for(config):
        return PyramidKVTrtllmAttention if getattr(config, "pkv", False) else original(config)

    utils.get_trtllm_sparse_attn_attention_backend = backend_for
    config = RocketSparseAttentionConfig(prompt_budget=budget, window_size=policy.window,
                                         kernel_size=getattr(policy, "kernel", 1), kt_cache_dtype="bfloat16")
    object.__setattr__(config, "pkv", True)  # marks it for backend_for (RocketKV's cache manager is reused)
    return config
