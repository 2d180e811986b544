"""Fixed-size KV slots for in-flight batching: one pool per layer, sized before any request is admitted.

After the prefill a sequence holds, in layer l, its kept prompt tokens (the policy's budget for its length, or
the whole prompt when it is not compressed) and then one slot per generated token. The largest kept prompt of a
layer over every prompt length up to the engine's `max_input_len`, plus the server's `max_new_tokens`, is that
layer's slot capacity: known before admission, so a slot never grows and memory is never over-committed. FullKV
gets the same machinery with slots of `max_input_len` tokens, which is why a compressed policy fits many more
sequences into the same memory.

Pools are host arrays (the CPU execution provider reads and writes them in place through OrtValues that share
their memory): K and V [S, Hc, cap_l, d] per layer, each row's valid lengths [L, S], and for windowed engines
the kept tokens' positions [S, Hc, kept_l] (-1 beyond a row's own). Active sequences occupy rows [0, n): the
decode of n rows binds the first n rows of every pool, so nothing is gathered or copied per step; a finished
sequence's row is refilled by moving the last active row into it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from exporter.errors import UserInputError
from exporter.policies import KVPolicy

ITEMSIZE = {"fp32": 4, "fp16": 2}
NUMPY_DTYPE = {"fp32": np.float32, "fp16": np.float16}


class SlotsUnsupported(UserInputError):
    """The engine's policy cannot run in fixed-size slots (the message says why)."""


def kept_prompt(policy: KVPolicy, num_layers: int, prompt_len: int) -> list[int]:
    """Tokens each layer holds after the prefill of a `prompt_len`-token prompt (budget + window, or the whole
    prompt when it is shorter than the budget)."""
    if policy.compresses and prompt_len >= policy.kv_budget:
        selected = policy.layer_selected(num_layers, prompt_len)
        if selected is not None:
            return [policy.kept_prefix(s) + min(policy.window, prompt_len) for s in selected]
    return [prompt_len] * num_layers


def largest_kept(policy: KVPolicy, num_layers: int, max_input_len: int) -> list[int]:
    """Per layer, the most tokens any prompt of 1..max_input_len tokens leaves in it. Not simply the value at
    max_input_len: PyramidKV's deep layers keep more of a prompt just above the budget (its uniform regime) than
    of a long one."""
    if not policy.compresses:
        return [max_input_len] * num_layers
    best = [0] * num_layers
    for q in range(1, max_input_len + 1):
        best = [max(a, b) for a, b in zip(best, kept_prompt(policy, num_layers, q), strict=True)]
    return best


@dataclass(frozen=True)
class SlotPlan:
    """How many fixed-size slots a KV memory holds, and their shape per layer."""

    kept: list[int]  # per layer: the largest kept prompt
    capacity: list[int]  # per layer: kept + max_new_tokens
    cache_heads: int
    head_dim: int
    dtype: str
    max_new_tokens: int
    slot_bytes: int  # K and V of every layer of one slot
    slots: int  # how many fit in kv_memory

    def to_json(self) -> dict:
        return {"slots": self.slots, "slot_bytes": self.slot_bytes, "kv_bytes_reserved": self.slots * self.slot_bytes,
                "capacity_per_layer": self.capacity, "max_new_tokens": self.max_new_tokens}


def check_supported(policy: KVPolicy) -> None:
    """Refuse the policies whose cache sizes are not known before a request is admitted."""
    if policy.drops_tokens:
        raise SlotsUnsupported(f"in-flight batching cannot run {policy.name}: its generation stage compacts every "
                               "layer's cache every --update-interval tokens, so a sequence's lengths change under "
                               "the slot (serve it with --batching static)")
    if policy.global_selection:
        raise SlotsUnsupported(f"in-flight batching cannot run {policy.name}: its one top-k over every layer and head "
                               "decides each layer's length from the data, so no per-layer slot size is known "
                               "before admission (serve it with --batching static)")


def plan_slots(policy: KVPolicy, num_layers: int, cache_heads: int, head_dim: int, dtype: str, max_input_len: int,
               max_new_tokens: int, kv_memory: int) -> SlotPlan:
    """The slot layout for an engine and how many slots `kv_memory` bytes hold (at least one, or refused)."""
    check_supported(policy)
    if dtype not in ITEMSIZE:
        raise SlotsUnsupported(f"in-flight batching supports fp32 and fp16 engines (this one is {dtype})")
    if max_new_tokens < 1:
        raise UserInputError("max_new_tokens must be at least 1")
    kept = largest_kept(policy, num_layers, max_input_len)
    capacity = [k + max_new_tokens for k in kept]
    slot_bytes = 2 * sum(capacity) * cache_heads * head_dim * ITEMSIZE[dtype]
    slots = kv_memory // slot_bytes
    if slots < 1:
        raise UserInputError(f"--kv-memory {kv_memory} bytes holds no slot: one sequence of this engine needs "
                             f"{slot_bytes} bytes ({policy.name}, up to {max_input_len} prompt tokens and "
                             f"{max_new_tokens} new ones)")
    return SlotPlan(kept, capacity, cache_heads, head_dim, dtype, max_new_tokens, slot_bytes, int(slots))


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
