"""The KV slot pools of in-flight batching: one per layer, laid out by `exporter.slot_plan.plan_slots`.

Pools are host arrays (the CPU execution provider reads and writes them in place through OrtValues that share
their memory): K and V [S, Hc, cap_l, d] per layer, each row's valid lengths [L, S], and for windowed engines
the kept tokens' positions [S, Hc, kept_l] (-1 beyond a row's own). Active sequences occupy rows [0, n): the
decode of n rows binds the first n rows of every pool, so nothing is gathered or copied per step; a finished
sequence's row is refilled by moving the last active row into it.
"""

from __future__ import annotations

import numpy as np

from exporter.slot_plan import SlotPlan

NUMPY_DTYPE = {"fp32": np.float32, "fp16": np.float16}


class SlotPool:
    """The pools of one engine: rows [0, active) hold the running sequences."""

    def __init__(self, plan: SlotPlan, windowed: bool):
        s, hc, d = plan.slots, plan.cache_heads, plan.head_dim
        dtype = NUMPY_DTYPE[plan.dtype]
        self.plan = plan
        self.keys = [np.zeros((s, hc, cap, d), dtype) for cap in plan.capacity]  # [S, Hc, cap_l, d]
        self.values = [np.zeros((s, hc, cap, d), dtype) for cap in plan.capacity]
        self.lengths = np.zeros((len(plan.capacity), s), np.int64)  # [L, S] valid slots per row and layer
        self.positions = [np.full((s, hc, k), -1, np.int64) for k in plan.kept] if windowed else None
        self.active = 0

    def place(self, keys: list[np.ndarray], values: list[np.ndarray], lengths: list[int],
              positions: list[np.ndarray] | None) -> int:
        """Copy one prefilled sequence into the next free row; returns the row. keys/values[l]: [Hc, n_l, d]
        (n_l >= lengths[l]); positions[l]: [Hc, k_l] kept positions (windowed engines)."""
        row = self.active
        if row >= self.plan.slots:
            raise RuntimeError("no free slot")  # the scheduler admits only while one is free
        for layer, (k, v, n) in enumerate(zip(keys, values, lengths, strict=True)):
            if n > self.plan.kept[layer]:
                raise RuntimeError(f"layer {layer} kept {n} tokens, more than its slot's {self.plan.kept[layer]}")
            self.keys[layer][row, :, :n] = k[:, :n]
            self.values[layer][row, :, :n] = v[:, :n]
            self.lengths[layer, row] = n
            if self.positions is not None:
                held = positions[layer]
                self.positions[layer][row] = -1
                self.positions[layer][row, :, : held.shape[-1]] = held
        self.active += 1
        return row

    def release(self, row: int) -> int | None:
        """Free a row by moving the last active row into it; returns the row that moved (None if none did)."""
        last = self.active - 1
        moved = None
        if row != last:
            for layer in range(len(self.keys)):
                n = int(self.lengths[layer, last])
                self.keys[layer][row, :, :n] = self.keys[layer][last, :, :n]
                self.values[layer][row, :, :n] = self.values[layer][last, :, :n]
                if self.positions is not None:
                    self.positions[layer][row] = self.positions[layer][last]
            self.lengths[:, row] = self.lengths[:, last]
            moved = last
        self.lengths[:, last] = 0
        self.active -= 1
        return moved

    def bytes_held(self) -> int:
        """Bytes reserved by the active rows (whole slots: what admission counts against --kv-memory)."""
        return self.active * self.plan.slot_bytes
