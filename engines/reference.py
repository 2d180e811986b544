"""The PyTorch reference engine: Hugging Face's own model with a compressed, per-layer KV cache.

Greedy decoding over a batch of left-padded prompts. The prefill attends to the full prompt; each layer then
keeps what the policy selects; every decode step appends to each layer's own cache at the token's true absolute
position (prompt length + t), never the compressed length. This is what every other engine is compared with.
"""

from __future__ import annotations

import time

import torch

from engines.base import GenerationResult, ProgressFn
from engines.compressed_cache import ATTN_IMPLEMENTATION, CompressedKVState
from engines.hf_model import build_hf_model
from exporter.checkpoint import LoadedModel
from exporter.errors import UserInputError
from exporter.policies import KVPolicy


class ReferenceEngine:
    name = "torch-reference"

    def __init__(self, loaded: LoadedModel, policy: KVPolicy, dtype: torch.dtype = torch.float32):
        self.loaded, self.policy, self.dtype = loaded, policy, dtype
        self.spec = loaded.spec
        self.model = build_hf_model(loaded, dtype, attn_implementation=ATTN_IMPLEMENTATION)
        self.tokenizer = loaded.tokenizer()
        eos = self.spec.eos_token_id if self.spec.eos_token_id is not None else self.tokenizer.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos]) - {None}
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0

    def encode(self, prompts: list[str] | list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Left-padded input_ids [B, q] int64 and attention_mask [B, q] int64."""
        if not prompts:
            raise UserInputError("no prompts given")
        if isinstance(prompts[0], str):
            ids = [self.tokenizer(p)["input_ids"] for p in prompts]
        else:
            ids = [list(p) for p in prompts]
        if any(len(x) == 0 for x in ids):
            raise UserInputError("empty prompt")
        q = max(len(x) for x in ids)
        if q > self.spec.max_position_embeddings:
            raise UserInputError(f"prompt has {q} tokens, the model accepts {self.spec.max_position_embeddings}")
        input_ids = torch.full((len(ids), q), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(ids), q), dtype=torch.long)
        for b, x in enumerate(ids):
            input_ids[b, q - len(x) :] = torch.tensor(x)
            mask[b, q - len(x) :] = 1
        return input_ids, mask

    @torch.inference_mode()
    def generate(
        self,
        prompts: list[str] | list[list[int]],
        max_new_tokens: int = 32,
        *,
        return_logits: bool = False,
        return_indices: bool = False,
        progress: ProgressFn | None = None,
    ) -> GenerationResult:
        if max_new_tokens < 1:
            raise UserInputError(f"max_new_tokens must be at least 1 (got {max_new_tokens})")
        input_ids, mask = self.encode(prompts)
        b, q = input_ids.shape
        positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)  # as transformers' generate does
        selected = self.policy.layer_selected(self.spec.num_layers, q)
        state = CompressedKVState(self.policy, selected, mask.bool(), positions)

        t0 = time.perf_counter()
        out = self.model(
            input_ids=input_ids, attention_mask=mask, position_ids=positions, use_cache=False,
            logits_to_keep=1, pkv_state=state,
        )
        timings = {"prefill": time.perf_counter() - t0}
        step_logits = [out.logits[:, -1].float()]  # [B, V]
        state.prefill = False
        kept = None
        if return_indices:
            kept = [self._unpad(state.layers[i].kept, mask) for i in range(self.spec.num_layers)]

        next_pos = positions[:, -1] + 1  # [B] true absolute position of the next token
        finished = torch.zeros(b, dtype=torch.bool)
        generated: list[list[int]] = [[] for _ in range(b)]
        t1 = time.perf_counter()
        for step in range(max_new_tokens):
            token = step_logits[-1].argmax(-1)  # [B]
            token = torch.where(finished, torch.full_like(token, self.pad_id), token)
            for i in range(b):
                if not finished[i]:
                    generated[i].append(int(token[i]))
            finished |= torch.tensor([int(t) in self.eos_ids for t in token])
            if progress:
                progress(step + 1, max_new_tokens)
            if step == max_new_tokens - 1 or bool(finished.all()):
                break
            state.step_positions = next_pos
            out = self.model(
                input_ids=token.unsqueeze(-1), position_ids=next_pos.unsqueeze(-1), use_cache=False, pkv_state=state
            )
            step_logits.append(out.logits[:, -1].float())
            next_pos = next_pos + 1
        timings["decode"] = time.perf_counter() - t1
        return GenerationResult(
            tokens=generated,
            text=[self.tokenizer.decode(g, skip_special_tokens=True) for g in generated],
            prompt_lengths=[int(x) for x in mask.sum(-1)],
            logits=torch.stack(step_logits, dim=1) if return_logits else None,
            kept_indices=kept,
            selected=selected,
            timings=timings,
        )

    @staticmethod
    def _unpad(kept: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Padded prompt indices [B, Hc, n] -> positions among real tokens, -1 for padding slots."""
        pad = (mask == 0).sum(-1).view(-1, 1, 1)
        return torch.where(kept >= pad, kept - pad, torch.full_like(kept, -1))
