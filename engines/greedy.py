"""The greedy decoding loop every engine shares; engines only supply one decode step."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from engines.base import ProgressFn

StepFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (token [B], position [B]) -> logits [B, V]


def greedy_loop(first_logits: torch.Tensor, next_positions: torch.Tensor, step: StepFn, eos: set[int], pad_id: int,
                max_new_tokens: int, progress: ProgressFn | None = None) -> tuple[list[list[int]], list[torch.Tensor],
                                                                                   float]:
    """Argmax decoding from the prefill's logits [B, V]; finished rows are fed `pad_id` (as transformers does).

    next_positions: [B] absolute position of the first generated token. Returns (tokens per row, logits per step
    [B, V] float32, decode seconds). Stops when every row has produced EOS or after max_new_tokens.
    """
    b = first_logits.shape[0]
    step_logits = [first_logits.float()]
    finished = torch.zeros(b, dtype=torch.bool)
    generated: list[list[int]] = [[] for _ in range(b)]
    pos = next_positions.clone()
    t0 = time.perf_counter()
    for i in range(max_new_tokens):
        token = step_logits[-1].argmax(-1)
        token = torch.where(finished, torch.full_like(token, pad_id), token)
        for row in range(b):
            if not finished[row]:
                generated[row].append(int(token[row]))
        finished |= torch.tensor([int(t) in eos for t in token])
        if progress:
            progress(i + 1, max_new_tokens)
        if i == max_new_tokens - 1 or bool(finished.all()):
            break
        step_logits.append(step(token, pos).float())
        pos = pos + 1
    return generated, step_logits, time.perf_counter() - t0
