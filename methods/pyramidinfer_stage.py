"""PyramidInfer's generation stage around the onnxruntime decode loop (trt_plugins.pyramidinfer_select).

The decode graph returns each new token's attention row per layer (`attn_rows.{i}`, mean over heads); this class
keeps the last 1 + max R of them per layer in a ring, and the per-row bookkeeping the compression needs (valid
slots, slots after the last compression, the tokens' positions for a sliding window). When a row is due, it runs
`evict.onnx` once for every layer: the graph scores the segment before each recent window and compacts the
caches; the caches are copied then, every `update_interval` tokens, never per step.
"""

from __future__ import annotations

import copy

import numpy as np


class GenerationStage:
    def __init__(self, engine, outputs: dict, cache: dict):
        """outputs: the prefill's (kv_lengths, recent_rows, recent_lengths, kept_indices), cache: its present.*"""
        self.engine, self.cache = engine, cache
        self.layers = range(engine.spec.num_layers)
        self.lengths = [outputs[f"kv_lengths.{i}"].numpy().astype(np.int64) for i in self.layers]  # [B] each
        self.past = [n.copy() for n in self.lengths]  # valid slots after the last compression (the prefill's)
        self.recent = outputs["recent_lengths"].numpy().astype(np.int64)  # [B] R_b
        self.rows, self.positions = [], []
        for i in self.layers:
            cap = cache[f"present.{i}.key"].shape()[2]
            first = outputs[f"recent_rows.{i}"].numpy()  # [B, r, n_i]
            ring = np.zeros((*first.shape[:2], cap), dtype=np.float32)
            ring[:, :, : first.shape[2]] = first
            self.rows.append(ring)
            kept = outputs[f"kept_indices.{i}"].numpy()  # [B, Hc, n_i]
            pos = np.full((*kept.shape[:2], cap), -1, dtype=np.int64)
            pos[:, :, : kept.shape[2]] = kept
            self.positions.append(pos)
        self.head = 0  # ring slot of the oldest row (the same for every layer)

    def copy(self, cache: dict) -> GenerationStage:
        """An independent stage over `cache` (copies of the buffers): a question on a compressed context."""
        other = copy.copy(self)
        other.cache = cache
        other.lengths, other.past = [n.copy() for n in self.lengths], [n.copy() for n in self.past]
        other.rows, other.positions = [r.copy() for r in self.rows], [p.copy() for p in self.positions]
        return other

    def cache_positions(self) -> list[np.ndarray]:
        """Per layer [B, Hc, cap]: the position every used slot holds (-1 elsewhere), for a sliding window."""
        return self.positions

    def record(self, out: dict, positions: np.ndarray) -> None:
        """After a decode step: its tokens (positions [B, S]) took the slots after each row's length."""
        steps = positions.shape[1]
        r = self.rows[0].shape[1]
        for i in self.layers:
            new = out[f"attn_rows.{i}"].numpy()  # [B, S, T]
            for s in range(steps):
                slot = (self.head + s) % r
                self.rows[i][:, slot, :] = 0.0
                self.rows[i][:, slot, : new.shape[2]] = new[:, s]
            for b, n in enumerate(self.lengths[i]):
                self.positions[i][b, :, n : n + steps] = positions[b]
            self.lengths[i] = self.lengths[i] + steps
        self.head = (self.head + steps) % r

    def evict_if_due(self) -> bool:
        """Compress every row that is due (`evict.onnx`); True when the caches were replaced."""
        import onnxruntime as ort

        due = (self.lengths[0] - self.recent - self.past[0]) >= self.engine.policy.update_interval
        if not due.any():
            return False
        feed = {"recent_lengths": self.recent, "evict": due}
        for i in self.layers:
            for part in ("key", "value"):
                feed[f"past_key_values.{i}.{part}"] = self.cache[f"present.{i}.{part}"].numpy()
            feed[f"rows.{i}"] = np.roll(self.rows[i], -self.head, axis=1)  # oldest first
            feed[f"lengths.{i}"] = self.lengths[i]
        names = [o.name for o in self.engine.graphs["evict.onnx"].get_outputs()]
        out = dict(zip(names, self.engine.graphs["evict.onnx"].run(None, feed), strict=True))
        device = self.engine.device_type
        for i in self.layers:
            for part in ("key", "value"):
                self.cache[f"present.{i}.{part}"] = ort.OrtValue.ortvalue_from_numpy(out[f"present.{i}.{part}"],
                                                                                   device)
            self.rows[i] = out[f"rows_out.{i}"]
            slot_map = np.broadcast_to(out[f"slot_map.{i}"][:, None, :], self.positions[i].shape)
            moved = np.take_along_axis(self.positions[i], slot_map, axis=2)
            length = out[f"lengths_out.{i}"]
            moved = np.where(np.arange(moved.shape[2])[None, None, :] >= length[:, None, None], -1, moved)
            self.positions[i] = moved
            self.past[i] = np.where(due, length - self.recent, self.past[i])
            self.lengths[i] = length
        self.head = 0
        return True
