"""The per-layer budget rule inside the prefill graph: selected count of every layer from the prompt length.

The rule itself is the policy's (`methods.budgets`, the one place budgets are computed). Its result depends on
the prompt length q only from C until the budgets stop being clamped to the prompt; above that they are
constants. So the graph holds a small table computed by that function for every q of that band and picks a row
with the runtime q: constant per layer, clamped to each prompt's own length exactly as the reference does.
"""

from __future__ import annotations

import numpy as np

from methods import KVPolicy
from trt_plugins.onnx_graph import GraphBuilder


def budget_table(policy: KVPolicy, num_layers: int) -> tuple[int, np.ndarray]:
    """(q0, table [rows, L]): row r holds the selected counts for prompt length q0 + r; the last row holds for
    every longer prompt. q0 = C, the shortest compressed prompt. Every budget rule here depends on the prompt
    length only until its budgets stop being clamped to the prompt, then stays at its long-prompt value: the
    table runs until it reaches that value."""
    q0 = policy.kv_budget
    flat = policy.layer_selected(num_layers, 2**40)
    rows = [policy.layer_selected(num_layers, q0)]
    while rows[-1] != flat:
        rows.append(policy.layer_selected(num_layers, q0 + len(rows)))
    return q0, np.array(rows, dtype=np.int64)


def selected_counts(g: GraphBuilder, policy: KVPolicy, num_layers: int, lengths: str) -> list[str]:
    """Per layer, a [B] int64 tensor: each prompt's own selected count, from its real length (lengths [B])."""
    q0, table = budget_table(policy, num_layers)
    row = g.op("Clip", g.op("Sub", lengths, g.const(q0)), g.const(0), g.const(len(table) - 1))  # [B]
    picked = g.op("Gather", g.const(table), row, axis=0)  # [B, L]
    keep_all = g.op("Max", g.op("Sub", lengths, g.const(policy.window)), g.const(0))  # no compression
    short = g.op("Less", lengths, g.const(q0))
    return [g.op("Where", short, keep_all, g.op("Gather", picked, g.const(layer), axis=1))
            for layer in range(num_layers)]
