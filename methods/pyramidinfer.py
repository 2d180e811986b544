"""PyramidInfer (Yang et al., ACL Findings 2024): compression inside the prefill. After each layer the recent
window's attention (mean over heads, rows weighted by recency) picks the pivotal context that goes on to the next
layer, a fraction of it per layer on the official configs' cosine ramp from 1 to `decay` (or `decay` at every
layer: `geometric`), at least `min_context`; the recent window (last `recent_ratio` of the prompt) and the first
`sinks` tokens always stay. While generating, every `update_interval` tokens that leave the recent window are
compressed the same way, `gen_decay` on the paper code's cosine ramp. Prefill budgets follow from the prompt length
alone. Specification: trt_plugins.pyramidinfer_select; graphs: methods.pyramidinfer_graph; the onnxruntime
engine's generation stage: methods.pyramidinfer_stage."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from onnx import TensorProto, helper

from methods import backends
from methods.base import KVPolicy, record_scores, recording_scores
from methods.cache import LayerCache, left_aligned, right_aligned
from methods.options import in_range, non_negative, option, positive, positive_number
from trt_plugins.pyramidinfer_select import SCHEDULES as DECAY_SCHEDULES
from trt_plugins.pyramidinfer_select import (
    context_counts,
    gather_alive,
    generation_keep,
    next_alive,
    recent_length,
    recent_rows,
    segment_evictions,
    weighted_rows,
)


@dataclass(frozen=True)
class PyramidInferPolicy(KVPolicy):
    """PyramidInfer: each layer passes only its pivotal context (and the recent window) on to the next layer, and
    the cache is compressed again every `update_interval` generated tokens."""

    name: ClassVar[str] = "pyramidinfer"
    runs_on: ClassVar[frozenset[str]] = frozenset({backends.ONNXRUNTIME})
    chunked_prefill: ClassVar[bool] = False  # drops tokens between the prefill's layers
    refusals: ClassVar[dict[str, str]] = {
        backends.SLOTS: "its generation stage compacts every layer's cache every --update-interval tokens, so a "
                        "sequence's lengths change under the slot",
    }
    recent_ratio: float = option(0.2, "the recent window is the prompt's last 1 + int(ratio * q) tokens; they score "
                                      "the rest and are always kept", check=in_range(0, 1, high_open=True))
    decay: float = option(0.9, "the smallest fraction of its pivotal context a layer passes on to the next (the "
                               "cosine ramp's floor; with geometric, every layer's)",
                          check=in_range(0, 1, low_open=True))
    decay_schedule: str = option("cosine", "the official configs' cosine ramp from 1 to --decay, or --decay at "
                                           "every layer", choices=DECAY_SCHEDULES)
    min_context: int = option(64, "a layer never cuts its context below this many tokens", check=positive)
    sinks: int = option(4, "the first tokens (attention sinks), always kept", check=non_negative)
    distance_weight: float = option(1.2, "weight of the newest recent row in the ensemble (the oldest has 1)",
                                    check=positive_number)
    update_interval: int = option(16, "while generating, the tokens leaving the recent window are compressed this "
                                      "many at a time", check=positive)
    gen_decay: float = option(0.1, "kept fraction of such a segment at the deepest layer (cosine ramp from 0.9 at "
                                   "layer 0)", check=in_range(0, 1, low_open=True))

    @property
    def compresses(self) -> bool:
        return True

    def cached_counts(self, num_layers: int, prompt_len: int) -> list[int]:
        """Tokens each layer caches for a prompt of `prompt_len`: its alive context and the recent window."""
        recent = recent_length(prompt_len, self.recent_ratio) + 1
        return [c + min(recent, prompt_len) for c in context_counts(
            prompt_len, num_layers, self.recent_ratio, self.decay, self.decay_schedule, self.min_context)]

    def always_kept(self, prompt_len: int) -> tuple[int, int]:
        return min(self.sinks, prompt_len), min(recent_length(prompt_len, self.recent_ratio) + 1, prompt_len)

    def layer_selected(self, num_layers: int, prompt_len: int) -> list[int] | None:
        counts = self.cached_counts(num_layers, prompt_len)
        return None if counts[-1] == prompt_len else counts

    # --- reference: each layer caches what it saw and passes the pivotal tokens on ------------------------------
    def reference_layer(self, state, layer, query, key, value) -> LayerCache:
        mask = state.key_mask
        lengths = mask.sum(-1)  # [B]
        seen = mask if state.visible is None else state.visible  # [B, q] left-padded: what this layer saw
        key, value = right_aligned(key, mask), right_aligned(value, mask)
        alive = right_aligned(seen[:, None], mask)[:, 0]  # [B, q]
        idx, k, v = gather_alive(key, value, alive)
        queries = right_aligned(query, mask).transpose(1, 2)  # [B, q, H, d]
        rows = recent_rows(queries, key, alive, lengths, self.recent_ratio)  # [B, r, q] by position
        recent = torch.tensor([recent_length(int(n), self.recent_ratio) for n in lengths])
        slots = idx[:, 0, :]  # [B, n] position held by each slot
        by_slot = torch.gather(rows, 2, slots.clamp(min=0)[:, None, :].expand(-1, rows.shape[1], -1))
        # The generation stage's start, per layer: rows [B, r, n] (the recent tokens' attention over the layer's
        # slots, newest last), past [B] (valid slots after the last compression), recent [B] (R_b).
        state.shared[("pyramidinfer", layer)] = {"rows": by_slot * (slots >= 0)[:, None, :], "past": alive.sum(-1),
                                                 "recent": recent}
        scores = weighted_rows(rows, recent, self.distance_weight)
        if recording_scores(state) and layer + 1 < state.num_layers:
            # the ranking that decides what layer + 1 keeps of this layer's context: NaN for the tokens this layer
            # did not see, -inf for the sinks and the recent window (kept whatever their scores)
            pos = torch.arange(scores.shape[1])[None, :]
            candidate = alive & (pos >= self.sinks) & (pos < (lengths - 1 - recent)[:, None])
            ranked = torch.where(candidate, scores, torch.where(alive, float("-inf"), float("nan")))
            record_scores(state, layer + 1, ranked[:, None].expand(-1, key.shape[1], -1))
        alive = next_alive(scores, alive, lengths, layer, state.num_layers, self.recent_ratio, self.decay,
                           self.decay_schedule, self.min_context, self.sinks)
        state.visible = left_aligned(alive, mask)
        return LayerCache.from_selection(idx, k, v)

    def reference_decode(self, state, layer, cache, weights) -> None:
        """Record the new tokens' attention rows; a row holding `update_interval` tokens more than its recent window
        beyond its last compression compresses the segment before the window (its evicted slots are released:
        position -1, zero K/V). weights: [B, H, S, n] this forward's attention."""
        gen = state.shared.get(("pyramidinfer", layer))
        if gen is None:
            return
        b, _, steps, _ = weights.shape
        r = gen["rows"].shape[1]
        rows = torch.cat([gen["rows"], torch.zeros(b, r, steps)], dim=2)
        gen["rows"] = rows = torch.cat([rows, weights.float().mean(dim=1)], dim=1)[:, -r:]  # [B, r, n]
        keep = generation_keep(layer, state.num_layers, self.gen_decay, self.update_interval)
        for row in range(b):
            valid = (cache.positions[row, 0] >= 0).nonzero()[:, 0]  # slots in token order
            recent = int(gen["recent"][row])
            if len(valid) - recent - int(gen["past"][row]) < self.update_interval:
                continue
            evicted = segment_evictions(rows[row, r - 1 - recent :], valid, recent, self.update_interval, keep,
                                        self.distance_weight)
            cache.positions[row, :, evicted] = -1
            cache.keys[row, :, evicted] = 0
            cache.values[row, :, evicted] = 0
            gen["past"][row] = len(valid) - len(evicted) - recent

    # --- graphs --------------------------------------------------------------------------------------------------
    def graph_begin(self, pg) -> None:
        from methods.pyramidinfer_graph import context_counts_graph

        recent, counts = context_counts_graph(pg.g, self, pg.spec.num_layers, pg.lengths)
        pg.shared["pyramidinfer"] = {"recent": recent, "counts": counts, "rows": []}

    def graph_layer(self, pg, layer, q, k4, v4):
        pg.shared["pyramidinfer"]["attended"] = (q, k4)
        return pg.keep_all(k4, v4)  # the tokens this layer computed over, each at its own position

    def graph_between_layers(self, pg, layer, residual, h):
        """The recent rows of the layer (what the generation stage starts from) and, before every layer but the
        last, the survivors: only they go on (hidden states, residual stream, positions)."""
        from methods.pyramidinfer_graph import gather_rows, recent_rows_graph, survivors, weighted_rows_graph

        mine = pg.shared["pyramidinfer"]
        q, k4 = mine["attended"]
        sel = pg.method_nodes(f"pinfer_{layer}_")  # own names: profilers can tell its cost apart
        g = sel.g
        rows = recent_rows_graph(sel, q, k4, pg.lengths, mine["recent"])
        g.op("Identity", rows, outputs=[f"recent_rows.{layer}"])
        mine["rows"].append(helper.make_tensor_value_info(f"recent_rows.{layer}", TensorProto.FLOAT,
                                                          ["batch", "recent_rows", f"kept_len_{layer}"]))
        if layer + 1 < pg.spec.num_layers:
            scores = weighted_rows_graph(g, rows, mine["recent"], self.distance_weight)
            slots, alive = survivors(g, scores, pg.positions, pg.lengths, mine["recent"], mine["counts"][layer + 1],
                                     self.sinks)
            residual, h = gather_rows(g, residual, slots), gather_rows(g, h, slots)
            pg.positions = g.op("GatherElements", pg.positions, slots, axis=1)
            pg.lengths = alive
        pg.g.nodes.extend(g.nodes)
        return residual, h

    def graph_end(self, pg) -> None:
        mine = pg.shared["pyramidinfer"]
        pg.g.op("Identity", mine["recent"], outputs=["recent_lengths"])
        pg.outputs.extend(mine["rows"])
        pg.outputs.append(helper.make_tensor_value_info("recent_lengths", TensorProto.INT64, ["batch"]))

    def graph_decode_layer(self, lay, h, layer, present_key, past_lengths, visible):
        from methods.pyramidinfer_graph import decode_rows

        decode_rows(lay, h, layer, present_key, past_lengths, visible)  # the generation stage's attention rows
        return [helper.make_tensor_value_info(f"attn_rows.{layer}", TensorProto.FLOAT,
                                              ["batch", "new_tokens", f"capacity_{layer}"])]

    def extra_graphs(self):
        from methods.pyramidinfer_graph import build_evict

        return {"evict.onnx": build_evict}  # the generation stage's compression, run every update_interval

    def onnxruntime_stage(self, engine, outputs, cache):
        from methods.pyramidinfer_stage import GenerationStage

        return GenerationStage(engine, outputs, cache)
