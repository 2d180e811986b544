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
the pyramid's mean of 133.5 tokens per layer, 1.8x).

What RocketKV's `sparse_kv_predict` hands over and expects (read in `sparse/rocket.py`, 1.2-era): `q` is the fused
post-RoPE qkv of the batch, context tokens first (`k` is None; when it is not, q and k are separate), the metadata
gives `num_contexts`, `context_lens` and `num_ctx_tokens`; the result is int32 indices [Hkv, total] relative to
each sequence (prefix picks then the window, ascending; a sequence shorter than the budget keeps all its tokens)
and int32 offsets [num_contexts + 1], or (None, None) when no sequence reaches the budget. `attention_class`
builds that answer with the op specification (`trt_plugins.pyramidkv_select`, CPU PyTorch: the context's q/k are
copied to the host, which costs a transfer per layer but runs exactly the tested spec) and turns RocketKV's
generation-phase sparsity off. `engines.trtllm_hook` installs it; `engines.trtllm_hook_record` can record what it
returned so a GPU host can check it ran (scripts/gpu_acceptance.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engines.trtllm_hook_record import Recorder
from methods.backends import TRTLLM
from trt_plugins.pyramidkv_select import pyramidkv_select


@dataclass(frozen=True)
class HookSpec:
    """What the hook keeps: `budget` tokens per sequence and KV head, the last `window` included."""

    budget: int
    window: int
    kernel: int
    pooling: str


def hook_spec(policy_record: dict, num_layers: int, max_input_len: int) -> HookSpec:
    """The hook's parameters for a manifest's policy; refuses what the hook would silently run as SnapKV."""
    from methods import check_policy_record

    policy = check_policy_record(policy_record)
    policy.check_backend(TRTLLM)  # the methods whose selection is pyramidkv_select with a window, KV heads
    selected = policy.layer_selected(num_layers, max_input_len)
    # One length per request for every layer: the largest layer budget; none at all when no prompt of at most
    # max_input_len tokens is compressed (a budget above every prompt keeps everything).
    budget = max(selected) + policy.window if selected else max_input_len + 1
    return HookSpec(budget, policy.window, policy.kernel, policy.pooling)


def split_context(q: torch.Tensor, k: torch.Tensor | None, num_ctx_tokens: int, num_heads: int,
                  num_kv_heads: int, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The context tokens' queries [T, H*d] and keys [T, Hkv*d] from what the hook receives: fused qkv
    [N, (H + 2 Hkv) * d] with k None, or separate q [N, H*d] and k [N, Hkv*d]; the context tokens come first."""
    if k is None:
        q, k, _ = q[:num_ctx_tokens].split([num_heads * head_dim, num_kv_heads * head_dim,
                                            num_kv_heads * head_dim], dim=-1)
        return q, k
    return q[:num_ctx_tokens], k[:num_ctx_tokens]


def context_indices(q: torch.Tensor, k: torch.Tensor, seq_lens: list[int], num_heads: int, num_kv_heads: int,
                    head_dim: int, spec: HookSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """The kept positions of every context sequence, in RocketKV's layout.

    q: [T, H*d], k: [T, Hkv*d] post-RoPE projections of the context sequences, back to back (T = sum(seq_lens)).
    Returns indices int32 [Hkv, total] (per sequence: sorted positions relative to its start; a sequence shorter
    than the budget keeps all its tokens) and offsets int32 [num_sequences + 1] into them, on q's device.
    """
    pieces, offsets, start = [], [0], 0
    for n in seq_lens:
        if n < spec.budget:
            idx = torch.arange(n, device=q.device).expand(num_kv_heads, n)
        else:
            qs = q[start : start + n].view(1, n, num_heads, head_dim)
            ks = k[start : start + n].view(n, num_kv_heads, head_dim).transpose(0, 1)[None]  # [1, Hkv, n, d]
            kept, _, _ = pyramidkv_select(qs, ks, ks, torch.tensor([n]), spec.budget - min(spec.window, n),
                                          spec.window, spec.kernel, spec.pooling)
            idx = kept[0]  # [Hkv, budget]: compact, every slot used
        pieces.append(idx.to(torch.int32))
        offsets.append(offsets[-1] + idx.shape[-1])
        start += n
    return torch.cat(pieces, dim=-1), torch.tensor(offsets, dtype=torch.int32, device=q.device)


def attention_class(base: type, spec: HookSpec, recorder: Recorder | None = None) -> type:
    """`base` (RocketKV's TrtllmAttention subclass on a GPU host) with PyramidKV's context selection and no
    generation-phase sparsity."""

    class PyramidKVTrtllmAttention(base):
        pkv_spec = spec

        def sparse_kv_predict(self, q, k, metadata, *args, **kwargs):
            num_contexts = int(metadata.num_contexts)
            if num_contexts == 0:
                return None, None
            lens = [int(n) for n in metadata.context_lens[:num_contexts]]
            if sum(lens) != int(metadata.num_ctx_tokens):  # chunked prefill would split a prompt: refuse
                raise RuntimeError(f"context lengths {lens} do not add up to the {metadata.num_ctx_tokens} context "
                                   "tokens: the PyramidKV hook needs whole prompts (chunked prefill off)")
            q_ctx, k_ctx = split_context(q, k, sum(lens), self.num_heads, self.num_kv_heads, self.head_dim)
            if all(n < spec.budget for n in lens):  # nothing to compress: RocketKV's answer too
                indices = offsets = None
            else:
                q_ctx, k_ctx = q_ctx.float().cpu(), k_ctx.float().cpu()  # the op spec is CPU PyTorch
                indices, offsets = context_indices(q_ctx, k_ctx, lens, self.num_heads, self.num_kv_heads,
                                                   self.head_dim, spec)
            if recorder is not None:
                recorder.record(int(self.layer_idx), lens, spec, q_ctx, k_ctx, indices, offsets, self.num_heads,
                                self.num_kv_heads, self.head_dim)
            if indices is None:
                return None, None
            return indices.to(q.device), offsets.to(q.device)

        def sparse_attn_predict(self, q, k, metadata, *args, **kwargs):
            return None, None  # dense decode over the compressed cache (RocketKV would pick pages here)

    return PyramidKVTrtllmAttention


def install(policy_record: dict, num_layers: int, max_input_len: int):  # pragma: no cover - TensorRT-LLM 1.2, GPU
    """Install the PyramidKV class where TensorRT-LLM 1.2 chooses its sparse attention class (in this process:
    the runner forces the executor into it, engines.trtllm_hook) and return the LLM API config that selects it."""
    from tensorrt_llm.llmapi import RocketSparseAttentionConfig

    from engines import trtllm_hook as hook
    from engines.trtllm_hook_record import recorder_from_env

    spec = hook_spec(policy_record, num_layers, max_input_len)
    cls = attention_class(hook.resolve(hook.ROCKET_CLASS), spec, recorder_from_env())

    def choose(config):  # RocketKV configs carrying this spec's values (they survive the LLM API's copies)
        ours = (getattr(config, "algorithm", None) == hook.ROCKET_ALGORITHM and config.prompt_budget == spec.budget
                and config.window_size == spec.window)
        return cls if ours else None

    hook.install_dispatch(hook.resolve(hook.DISPATCH_CALLER), hook.DISPATCH_NAME, choose)
    return RocketSparseAttentionConfig(prompt_budget=spec.budget, window_size=spec.window,
                                       kernel_size=spec.kernel, kt_cache_dtype="bfloat16")
