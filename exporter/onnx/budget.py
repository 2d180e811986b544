"""The per-layer budget rule inside the prefill graph: selected count of every layer from the prompt length.

The rule itself is `exporter.budgets` (the one function every backend uses). Its result depends on the prompt
length q only in a narrow band (the max clamp near q = 2(C - w)); above it the budgets are constants. So the
graph holds a small table computed by that function for every q of the band and picks a row with the runtime q:
constant per layer, clamped to each prompt's own length exactly as the reference does.
"""

from __future__ import annotations

import numpy as np

from exporter.policies import KVPolicy
from trt_plugins.onnx_graph import GraphBuilder


def budget_table(policy: KVPolicy, num_layers: int) -> tuple[int, np.ndarray]:
    """(q0, table [rows, L]): row r holds the selected counts for prompt length q0 + r; the last row holds for
    every longer prompt. q0 = 2(C - w), below which the budgets are uniform C - w (or no compression)."""
    c, w = policy.kv_budget, policy.window
    q0 = max(2 * (c - w), c)
    q = q0
    rows = [policy.layer_selected(num_layers, q)]
    while True:  # extend until the rule stops depending on q (it is monotone in q, then flat)
        nxt = policy.layer_selected(num_layers, q + 1)
        if nxt == rows[-1] and q + 1 > q0 + w + c:
            break
        rows.append(nxt)
        q += 1
    return q0, np.array(rows, dtype=np.int64)


def selected_counts(g: GraphBuilder, policy: KVPolicy, num_layers: int, lengths: str) -> list[str]:
    """Per layer, a [B] int64 tensor: each prompt's own selected count, from its real length (lengths [B])."""
    c, w = policy.kv_budget, policy.window
    q0, table = budget_table(policy, num_layers)
    row = g.op("Clip", g.op("Sub", lengths, g.const(q0)), g.const(0), g.const(len(table) - 1))  # [B]
    picked = g.op("Gather", g.const(table), row, axis=0)  # [B, L]
    keep_all = g.op("Max", g.op("Sub", lengths, g.const(w)), g.const(0))  # no compression: the whole prefix
    short = g.op("Less", lengths, g.const(c))
    uniform_zone = g.op("Less", lengths, g.const(2 * (c - w)))
    out = []
    for layer in range(num_layers):
        from_table = g.op("Gather", picked, g.const(layer), axis=1)  # [B]
        uniform = g.op("Where", uniform_zone, g.const(c - w), from_table)
        out.append(g.op("Where", short, keep_all, uniform))
    return out
