"""The engine interface every backend implements (design.md §3)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import torch


@dataclass
class GenerationResult:
    """What `Engine.generate` returns for a batch of B prompts.

    tokens[b]: generated token ids of prompt b (greedy; stops after EOS, which is included).
    text[b]: those tokens decoded, special tokens skipped.
    logits: [B, T, V] float32 logits of every decoding step (T = steps run), when requested.
    kept_indices[l]: [B, Hc, n_l] int64 prompt positions (0 = first real token) cached by layer l after the
        prefill, per cache head; -1 marks a slot holding padding. Present when requested.
    selected[l]: prefix tokens layer l selected (None when the policy kept the whole prompt).
    """

    tokens: list[list[int]]
    text: list[str]
    prompt_lengths: list[int]
    logits: torch.Tensor | None = None
    kept_indices: list[torch.Tensor] | None = None
    selected: list[int] | None = None
    timings: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> dict:
        out = {
            "tokens": self.tokens,
            "text": self.text,
            "prompt_lengths": self.prompt_lengths,
            "selected_per_layer": self.selected,
            "timings_s": self.timings,
        }
        if self.kept_indices is not None:
            out["cached_per_layer"] = [int(k.shape[-1]) for k in self.kept_indices]
        return out


ProgressFn = Callable[[int, int], None]  # (steps done, steps total)


class Engine(Protocol):
    """A model with a KV policy baked in, generating greedily."""

    name: str

    def generate(
        self,
        prompts: list[str] | list[list[int]],
        max_new_tokens: int = 32,
        *,
        return_logits: bool = False,
        return_indices: bool = False,
        progress: ProgressFn | None = None,
    ) -> GenerationResult: ...
