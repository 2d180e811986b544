"""How one step of the in-flight scheduler spends its token budget (`--step-tokens`): pure arithmetic, no engine.

A step advances every running sequence by one token (its decode tokens come first: a running stream never waits
for a prompt) and spends the rest of the budget on prompt chunks. Prompts are served oldest first; while another
prompt waits behind it, a prompt takes at most half of what is left (never less than `MIN_SHARE` tokens), so a
long prompt at the head of the queue slows the short ones behind it to about half speed instead of holding them
until its last chunk. A chunk ends at least `window` tokens before the prompt's end or at its end: the last chunk
holds the prompt's observation window, whose queries the method's selection reads.
"""

from __future__ import annotations

MIN_SHARE = 16  # tokens: a smaller chunk costs a step's fixed overhead for little progress
DECODE_FLOOR = 8  # prompts get at least 1 / DECODE_FLOOR of the budget, however many sequences decode


def prefill_budget(step_tokens: int, decoding: int) -> int:
    """Tokens of prompt chunks in a step that also decodes `decoding` sequences (at least step_tokens // 8, so
    waiting prompts progress however many sequences run)."""
    return max(step_tokens - decoding, step_tokens // DECODE_FLOOR, 1)


def share(left: int, behind: bool) -> int:
    """What the oldest prompt in line may take of the `left` tokens: all of them, or half (at least MIN_SHARE)
    while another prompt waits behind it."""
    return left if not behind else min(left, max(left // 2, MIN_SHARE))


def chunk_tokens(remaining: int, cap: int, window: int) -> int:
    """The next chunk of a prompt with `remaining` tokens to prefill, at most `cap` (>= 1) tokens, except that
    the last chunk must hold the last `window` tokens: a chunk that would leave fewer than `window` behind stops
    `window` tokens before the end, or, when that leaves nothing, takes the rest (at most `window` tokens more
    than `cap`)."""
    take = min(remaining, cap)
    if 0 < remaining - take < window:
        take = remaining - window if remaining > window else remaining
    return take


def plan_chunks(left: int, remaining: list[int], window: int, more_waiting: bool) -> list[int]:
    """Chunk sizes for the prompts in flight, oldest first (0: none this step), out of `left` prompt tokens;
    `more_waiting`: prompts still queued behind them."""
    sizes = []
    for i, rest in enumerate(remaining):
        if left <= 0:
            sizes.append(0)
            continue
        behind = i + 1 < len(remaining) or more_waiting
        n = chunk_tokens(rest, share(left, behind), window)
        sizes.append(n)
        left -= n
    return sizes
