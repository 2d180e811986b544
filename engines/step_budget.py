"""How one step of the in-flight scheduler spends its token budget (`--step-tokens`): pure arithmetic, no engine.

A step advances every running sequence by one token (its decode tokens come first: a running stream never waits
for a prompt) and gives the rest of the budget to one prompt's next chunk, which runs in the same graph as the
decode (engines/mixed_step.py): on a CPU every separate run reads all the weights again, so a step runs one piece
of prompt work, never several. Prompts are served oldest first; while another prompt waits behind it, the oldest
gets every other step and the next in line the steps between, so a long prompt at the head of the queue slows the
prompt behind it to half speed instead of holding it until its last chunk. A chunk ends at least `window` tokens
before the prompt's end or at its end: the last chunk holds the prompt's observation window, whose queries the
method's selection reads. With nothing decoding the scheduler gives the chosen prompt all it has left: there is
no stream to keep, and every chunk costs a pass over the weights.
"""

from __future__ import annotations

DECODE_FLOOR = 8  # a prompt's chunk gets at least 1 / DECODE_FLOOR of the budget, however many sequences decode


def prefill_budget(step_tokens: int, decoding: int) -> int:
    """Prompt tokens in a step that also decodes `decoding` sequences (at least step_tokens // 8, so waiting
    prompts progress however many sequences run)."""
    return max(step_tokens - decoding, step_tokens // DECODE_FLOOR, 1)


def chunk_tokens(remaining: int, cap: int, window: int) -> int:
    """The next chunk of a prompt with `remaining` tokens to prefill, at most `cap` (>= 1) tokens, except that
    the last chunk must hold the last `window` tokens: a chunk that would leave fewer than `window` behind stops
    `window` tokens before the end, or, when that leaves nothing, takes the rest (at most `window` tokens more
    than `cap`)."""
    take = min(remaining, cap)
    if 0 < remaining - take < window:
        take = remaining - window if remaining > window else remaining
    return take


def whose_turn(step: int, waiting: int) -> int:
    """Which of the `waiting` prompts (in flight or queued, oldest first) gets step number `step`: the oldest, or
    on every other step the next in line when there is one."""
    return 1 if waiting > 1 and step % 2 else 0
