"""The KV slot pools of in-flight batching: one per layer, laid out by `exporter.slot_plan.plan_slots`.

Pools are host arrays (the CPU execution provider reads and writes them in place through OrtValues that share
their memory): K and V [S, Hc, cap_l, d] per layer, each row's valid lengths [L, S], and for windowed engines
the kept tokens' positions [S, Hc, kept_l] (-1 beyond a row's own). Active sequences occupy rows [0, n): the
decode of n rows binds the first n rows of every pool, so nothing is gathered or copied per step; a finished
sequence's row is refilled by moving the last active row into it.

A prompt whose chunked prefill writes straight into its slot (FullKV: a slot holds a whole prompt) gets a row
above the active ones (`reserve`, from the top) and becomes the next active row when its last chunk is done
(`activate`). The pools live in private anonymous memory maps, so `trim` can hand the pages of the rows nobody
holds back to the system: a compressing method's chunked prefill stages its uncompressed cache outside the pools,
in memory the scheduler takes from the free slots' share of --kv-memory.
"""

from __future__ import annotations

import mmap

import numpy as np

from exporter.slot_plan import SlotPlan

NUMPY_DTYPE = {"fp32": np.float32, "fp16": np.float16}


def _mapped(shape: tuple[int, ...], dtype) -> tuple[np.ndarray, mmap.mmap]:
    """A zero array in its own private anonymous mapping (pages exist once written; `madvise` can drop them)."""
    size = int(np.prod(shape)) * np.dtype(dtype).itemsize
    region = mmap.mmap(-1, max(size, 1), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    return np.frombuffer(region, dtype, count=int(np.prod(shape))).reshape(shape), region


class SlotPool:
    """The pools of one engine: rows [0, active) hold the running sequences; `reserved` rows hold prompts whose
    chunks are being written into their slot."""

    def __init__(self, plan: SlotPlan, windowed: bool):
        s, hc, d = plan.slots, plan.cache_heads, plan.head_dim
        dtype = NUMPY_DTYPE[plan.dtype]
        self.plan = plan
        self._regions: list[mmap.mmap] = []
        self.keys = [self._array((s, hc, cap, d), dtype) for cap in plan.capacity]  # [S, Hc, cap_l, d]
        self.values = [self._array((s, hc, cap, d), dtype) for cap in plan.capacity]
        self.lengths = np.zeros((len(plan.capacity), s), np.int64)  # [L, S] valid slots per row and layer
        self.positions = [np.full((s, hc, k), -1, np.int64) for k in plan.kept] if windowed else None
        self.active = 0
        self.reserved: set[int] = set()

    def _array(self, shape: tuple[int, ...], dtype) -> np.ndarray:
        array, region = _mapped(shape, dtype)
        self._regions.append(region)
        return array

    def place(self, keys: list[np.ndarray], values: list[np.ndarray], lengths: list[int],
              positions: list[np.ndarray] | None) -> int:
        """Copy one prefilled sequence into the next free row; returns the row. keys/values[l]: [Hc, n_l, d]
        (n_l >= lengths[l]); positions[l]: [Hc, k_l] kept positions (windowed engines)."""
        row = self.active
        if row >= self.plan.slots or row in self.reserved:
            raise RuntimeError("no free slot")  # the scheduler admits only while one is free
        for layer, (k, v, n) in enumerate(zip(keys, values, lengths, strict=True)):
            if n > self.plan.kept[layer]:
                raise RuntimeError(f"layer {layer} kept {n} tokens, more than its slot's {self.plan.kept[layer]}")
            self.keys[layer][row, :, :n] = k[:, :n]
            self.values[layer][row, :, :n] = v[:, :n]
            self.lengths[layer, row] = n
        self._set_positions(row, positions)
        self.active += 1
        return row

    def _set_positions(self, row: int, positions: list[np.ndarray] | None) -> None:
        if self.positions is not None:
            for layer, held in enumerate(positions):
                self.positions[layer][row] = -1
                self.positions[layer][row, :, : held.shape[-1]] = held

    def reserve(self) -> int:
        """The highest row nobody holds, for a prompt whose chunks write into its slot (pool.lengths[:, row] says
        how many it wrote); the scheduler reserves only while one is free."""
        row = self._free_row()
        self.reserved.add(row)
        self.lengths[:, row] = 0
        return row

    def _free_row(self) -> int:
        return next(r for r in range(self.plan.slots - 1, self.active - 1, -1) if r not in self.reserved)

    def unreserve(self, row: int) -> None:
        self.reserved.discard(row)
        self.lengths[:, row] = 0

    def clear_next_row(self) -> tuple[int, int] | None:
        """Before `place`: if the next active row is reserved, move that prompt's chunks to another free row.
        Returns (from, to) when a reserved row moved (the scheduler points those chunks there)."""
        row = self.active
        if row not in self.reserved:
            return None
        self.reserved.discard(row)
        to = self._free_row()
        self._copy(row, to)
        self.lengths[:, row] = 0
        self.reserved.add(to)
        return row, to

    def activate(self, row: int, positions: list[np.ndarray] | None) -> tuple[int, tuple[int, int] | None]:
        """A reserved row whose prompt is complete becomes the next active row (its lengths already set). Returns
        (the row it is now in, (from, to) when another prompt's reserved row moved: the two rows swapped)."""
        dst, moved = self.active, None
        self.reserved.discard(row)
        if row != dst:
            if dst in self.reserved:  # another prompt is writing there: the two rows swap
                self._swap(row, dst)
                self.reserved.discard(dst)
                self.reserved.add(row)
                moved = (dst, row)
            else:
                self._copy(row, dst)
                self.lengths[:, row] = 0
        self._set_positions(dst, positions)
        self.active += 1
        return dst, moved

    def _copy(self, src: int, dst: int) -> None:
        for layer in range(len(self.keys)):
            n = int(self.lengths[layer, src])
            self.keys[layer][dst, :, :n] = self.keys[layer][src, :, :n]
            self.values[layer][dst, :, :n] = self.values[layer][src, :, :n]
            if self.positions is not None:
                self.positions[layer][dst] = self.positions[layer][src]
        self.lengths[:, dst] = self.lengths[:, src]

    def _swap(self, a: int, b: int) -> None:
        for layer in range(len(self.keys)):
            pools = [self.keys[layer], self.values[layer]]
            if self.positions is not None:
                pools.append(self.positions[layer])
            for pool in pools:
                pool[[a, b]] = pool[[b, a]]
        self.lengths[:, [a, b]] = self.lengths[:, [b, a]]

    def release(self, row: int) -> int | None:
        """Free a row by moving the last active row into it; returns the row that moved (None if none did)."""
        last = self.active - 1
        moved = None
        if row != last:
            self._copy(last, row)
            moved = last
        self.lengths[:, last] = 0
        self.active -= 1
        return moved

    def trim(self) -> None:
        """Hand the pages of the rows above the active ones back to the system (they read as zeros when used
        again): the room a staged prompt's uncompressed cache takes. Only without reserved rows (those are above
        the active ones and hold chunks)."""
        if self.reserved:
            return
        for pool, region in zip([*self.keys, *self.values], self._regions, strict=True):
            start = -(-self.active * pool[0].nbytes // mmap.PAGESIZE) * mmap.PAGESIZE  # the first page no row uses
            if start < len(region):
                region.madvise(mmap.MADV_DONTNEED, start, len(region) - start)

    def bytes_held(self) -> int:
        """Bytes reserved by the active rows (whole slots: what admission counts against --kv-memory)."""
        return self.active * self.plan.slot_bytes
