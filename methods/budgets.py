"""Per-layer KV budgets: how many prefix tokens each layer keeps after the prefill.

`kv_budget` C is the PyramidKV paper's "KV size" (KVCache-Factory's max_capacity_prompt): the average per-layer
cache length *including* the window w. A layer keeps `selected[l]` top-scored prefix tokens plus the last w.
This is the one place budgets are computed; every backend and the planner call it.
"""

from __future__ import annotations

import math

SCHEDULES = ("paper", "mean")


def uniform_selected(num_layers: int, kv_budget: int, window: int, prompt_len: int) -> list[int] | None:
    """SnapKV / H2O / StreamingLLM: every layer keeps C - w prefix tokens; None when q < C (no compression)."""
    if prompt_len < kv_budget:
        return None
    return [kv_budget - window] * num_layers


def pyramid_selected(
    num_layers: int, kv_budget: int, window: int, prompt_len: int, beta: int = 20, schedule: str = "paper"
) -> list[int] | None:
    """PyramidKV: selected prefix tokens per layer, layer 0 the most; None when q < C (no compression).

    Regimes: q < C -> None; C <= q < 2(C - w) -> uniform C - w; otherwise the pyramid. "paper" is
    KVCache-Factory's integer rule (its floored step makes the mean exceed C - w); "mean" spreads the same
    range with a float step and rounds by largest remainder so the mean is exactly C - w.
    """
    c, w, q, n = kv_budget, window, prompt_len, num_layers
    if q < c:
        return None
    if q < 2 * (c - w):
        return [c - w] * n
    min_sel = (c - w) // beta
    max_sel = 2 * (c - w) - min_sel
    if max_sel >= q - w:
        max_sel = q - w
        min_sel = 2 * (c - w) - max_sel
    if n == 1:
        return [c - w]
    if schedule == "paper":
        step = (max_sel - min_sel) // (n - 1)
        return [max_sel - layer * step for layer in range(n)]
    if schedule == "mean":
        exact = [max_sel - layer * (max_sel - min_sel) / (n - 1) for layer in range(n)]
        floors = [math.floor(x) for x in exact]
        missing = n * (c - w) - sum(floors)
        by_remainder = sorted(range(n), key=lambda i: (-(exact[i] - floors[i]), i))
        for i in by_remainder[:missing]:
            floors[i] += 1
        return floors
    raise ValueError(f"unknown schedule '{schedule}' (choose from {', '.join(SCHEDULES)})")
