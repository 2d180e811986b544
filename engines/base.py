"""The engine interface every backend implements: validation and serving never care which backend runs."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import torch

from pkv_core.errors import UserInputError


@dataclass
class GenerationResult:
    """What `Engine.generate` returns for a batch of B prompts.

    tokens[b]: generated token ids of prompt b (greedy; stops after EOS, which is included).
    text[b]: those tokens decoded, special tokens skipped.
    logits: [B, T, V] float32 logits of every decoding step (T = steps run), when requested.
    kept_indices[l]: [B, Hc, n_l] int64 prompt positions (0 = first real token) cached by layer l after the
        prefill, per cache head; -1 marks a slot holding padding, or one a prompt with a smaller budget than
        the batch's largest leaves unused. Present when requested.
    selected[b][l]: prefix tokens layer l selected for prompt b (None when the whole prompts were kept).
    scores[l]: [B, Hc, q] float32, the scores layer l's selection ranked the prompt by (right-aligned: position p
        is the row's p-th real token; NaN: no score; -inf: not a candidate), or None for a layer without;
        only the reference records them, and only when asked (`return_scores`).
    kv_bytes_after_prefill: bytes of K/V the engine holds after the prefill (its layout: each layer padded to the
        batch's, and with per-head lengths to its longest head); kv_bytes_ideal: the bytes of the kept pairs alone
        (what `plan` counts). None where an engine cannot say (TensorRT-LLM).
    timings: seconds, "prefill" and "decode".
    """

    tokens: list[list[int]]
    text: list[str]
    prompt_lengths: list[int]
    logits: torch.Tensor | None = None
    kept_indices: list[torch.Tensor] | None = None
    selected: list[list[int]] | None = None
    timings: dict[str, float] = field(default_factory=dict)
    scores: list[torch.Tensor | None] | None = None
    kv_bytes_after_prefill: int | None = None
    kv_bytes_ideal: int | None = None

    def to_json(self) -> dict:
        """`generate --json`'s schema, the same for every engine (README, `generate`)."""
        out = {
            "tokens": self.tokens,
            "text": self.text,
            "prompt_lengths": self.prompt_lengths,
            "selected_per_layer": self.selected,  # [prompt][layer]
            "kv_bytes_after_prefill": self.kv_bytes_after_prefill,
            "kv_bytes_ideal": self.kv_bytes_ideal,
            "timings_s": self.timings,
        }
        if self.kept_indices is not None:
            out["cached_per_layer"] = [[int((k[b, 0] >= 0).sum()) for k in self.kept_indices]
                                       for b in range(len(self.tokens))]
        return out


ProgressFn = Callable[[int, int], None]  # (steps done, steps total)


@dataclass
class ContextCache:
    """A context prefilled and compressed once (batch 1); `answer` continues a copy of it with each question, so
    the context is never prefilled again. `state` is the engine's own (buffers, lengths)."""

    length: int  # context tokens
    room: int  # question + answer tokens each answer may add
    kv_bytes: int  # K/V bytes the compressed context holds
    kept_indices: list[torch.Tensor] | None  # [1, Hc, n_l] per layer, as in GenerationResult
    state: object = None
    prefill_seconds: float = 0.0


@dataclass
class SharedPrefill:
    """One prompt prefilled once for several methods' selections (methods.shared_prefill; batch 1): each
    `generate_shared(shared, policy, ...)` selects from it and decodes a cache of its own, as that policy's own
    `generate` would. `state` is the engine's own (the captured layers, the capture graph's outputs)."""

    input_ids: torch.Tensor  # [1, q] int64
    mask: torch.Tensor  # [1, q] int64
    positions: torch.Tensor  # [1, q] int64
    first_logits: torch.Tensor  # [1, V] float32: the prefill's last-token logits, the first generated token's
    state: object
    seconds: float


def question_ids(tokenizer, question: str | list[int]) -> list[int]:
    """A question continues a context: its tokens without a BOS (the context has it)."""
    ids = tokenizer(question, add_special_tokens=False)["input_ids"] if isinstance(question, str) else list(question)
    if not ids:
        raise UserInputError("empty question")
    return ids


def check_room(context: ContextCache, question: list[int], max_new_tokens: int) -> None:
    need = len(question) + max_new_tokens - 1
    if max_new_tokens < 1 or need > context.room:
        raise UserInputError(f"a question of {len(question)} tokens and {max_new_tokens} new tokens need {need} "
                             f"cache slots; the context was compressed with room for {context.room}")


class Engine(Protocol):
    """A model with a KV policy baked in, generating greedily; `compress_context` + `answer` serve several
    questions from one compressed context."""

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

    def compress_context(self, context: str | list[int], room: int = 256) -> ContextCache: ...

    def answer(self, context: ContextCache, question: str | list[int], max_new_tokens: int = 32, *,
               return_logits: bool = False) -> GenerationResult: ...


def encode_prompts(tokenizer, prompts: list[str] | list[list[int]], pad_id: int, max_len: int,
                   padding_side: str = "left") -> tuple[torch.Tensor, torch.Tensor]:
    """Padded input_ids [B, q] int64 and attention_mask [B, q] int64 (shared by every engine): left padding as
    transformers' generate uses, or right padding (real tokens first) as fused attention kernels want."""
    if not prompts:
        raise UserInputError("no prompts given")
    ids = [tokenizer(p)["input_ids"] if isinstance(p, str) else list(p) for p in prompts]
    if any(len(x) == 0 for x in ids):
        raise UserInputError("empty prompt")
    q = max(len(x) for x in ids)
    if q > max_len:
        raise UserInputError(f"prompt has {q} tokens, the engine accepts at most {max_len}")
    input_ids = torch.full((len(ids), q), pad_id, dtype=torch.long)
    mask = torch.zeros((len(ids), q), dtype=torch.long)
    for b, x in enumerate(ids):
        start = q - len(x) if padding_side == "left" else 0
        input_ids[b, start : start + len(x)] = torch.tensor(x)
        mask[b, start : start + len(x)] = 1
    return input_ids, mask


def encode_batch(tokenizer, prompts: list[str] | list[list[int]], pad_id: int, max_len: int,
                 max_new_tokens: int, padding_side: str = "left", max_positions: int | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Checked inputs of one `generate` call: input_ids, attention_mask and position_ids, each [B, q] int64.
    With `max_positions`, the prompt plus the tokens fed back while decoding must fit the model's positions."""
    if max_new_tokens < 1:
        raise UserInputError(f"max_new_tokens must be at least 1 (got {max_new_tokens})")
    input_ids, mask = encode_prompts(tokenizer, prompts, pad_id, max_len, padding_side)
    longest = int(mask.sum(-1).max())
    if max_positions is not None and longest + max_new_tokens - 1 > max_positions:
        raise UserInputError(f"a prompt of {longest} tokens and {max_new_tokens} new tokens need "
                             f"{longest + max_new_tokens - 1} positions; the model has {max_positions}")
    return input_ids, mask, prompt_positions(mask)


def pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0


def prompt_positions(mask: torch.Tensor) -> torch.Tensor:
    """Absolute positions of a padded batch, as transformers' generate computes them (the first real token is
    position 0; padding gets 1, which nothing reads). mask: [B, q]."""
    return (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)


def eos_ids(spec_eos, tokenizer) -> set[int]:
    eos = spec_eos if spec_eos is not None else tokenizer.eos_token_id
    return set(eos if isinstance(eos, list) else [eos]) - {None}


def finish_result(tokenizer, generated: list[list[int]], mask: torch.Tensor, step_logits: list[torch.Tensor],
                  return_logits: bool, kept: list[torch.Tensor] | None, selected: list[list[int]] | None,
                  timings: dict[str, float], kv_bytes: tuple[int, int] | None = None) -> GenerationResult:
    """Assemble a GenerationResult (decoded text, prompt lengths, stacked logits [B, T, V]); `kv_bytes`: (held
    after the prefill, the kept pairs alone)."""
    held, ideal = kv_bytes if kv_bytes is not None else (None, None)
    return GenerationResult(
        tokens=generated,
        text=[tokenizer.decode(g, skip_special_tokens=True) for g in generated],
        prompt_lengths=[int(x) for x in mask.sum(-1)],
        logits=torch.stack(step_logits, dim=1) if return_logits else None,
        kept_indices=kept,
        selected=selected,
        timings=timings,
        kv_bytes_after_prefill=held,
        kv_bytes_ideal=ideal,
    )
