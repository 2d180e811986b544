"""Fixed-size KV slots for in-flight batching, planned before any request is admitted (no weights needed).

After the prefill a sequence holds, in layer l, its kept prompt tokens (the policy's budget for its length, or
the whole prompt when it is not compressed) and then one slot per generated token. The largest kept prompt of a
layer over every prompt length up to the engine's `max_input_len`, plus the server's `max_new_tokens`, is that
layer's slot capacity: known before admission, so a slot never grows and memory is never over-committed. FullKV
gets the same machinery with slots of `max_input_len` tokens, which is why a compressed policy fits many more
sequences into the same memory. The pools themselves are engines/slots.py.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from methods import KVPolicy
from methods.backends import SLOTS
from pkv_core.errors import UserInputError

ITEMSIZE = {"fp32": 4, "fp16": 2}
# The in-flight scheduler's default token budget per step (decode tokens + prompt chunks; engines/step_budget.py).
# On a CPU a prompt token costs about what a decode step over a few sequences costs divided by 15-20 (SmolLM2-135M:
# ~4 ms against ~70 ms): a 64-token step keeps the running streams' steps within about 3x their decode alone, at
# the price of a slower prefill (each chunk reads the weights again; docs/benchmarks.md measures both sides).
DEFAULT_STEP_TOKENS = 64


class SlotsUnsupported(UserInputError):
    """The engine's policy cannot run in fixed-size slots (the message says why)."""


def kept_prompt(policy: KVPolicy, num_layers: int, prompt_len: int) -> list[int]:
    """Tokens each layer holds after the prefill of a `prompt_len`-token prompt (budget + window, or the whole
    prompt when it is shorter than the budget)."""
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
    best = np.zeros(num_layers, np.int64)
    for q in range(1, max_input_len + 1):
        np.maximum(best, kept_prompt(policy, num_layers, q), out=best)
    return best.tolist()


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
    reason = policy.why_not(SLOTS)
    if reason is not None:
        raise SlotsUnsupported(f"in-flight batching cannot run {policy.name}: {reason} (serve it with --batching "
                               "static)")


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
