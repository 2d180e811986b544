"""Methods with a KV budget C and an observation window w that select layer by layer, right after each layer's
prefill attention: the layer keeps `selected_l` prefix tokens by the method's own scores, plus the last w.

A subclass states its selection twice, in the same op semantics (trt_plugins.pyramidkv_select's layout: right-padded
rows, compact ascending picks then the window, -1 after): `select` for the reference (PyTorch) and `graph_select`
for the ONNX graph (its nodes). Budgets (`layer_selected`) are uniform unless overridden.

A selection that ranks by observation scores alone (every one here) states it once more, from those scores instead
of the queries: `score_kind` names the scores (trt_plugins.pyramidkv_select.observation_scores_for), `select_scored`
and `graph_select_scored` pick from them. Then one prefill serves every (method, budget) of a sweep
(`shares_prefill`, methods.shared_prefill): `select` is the scores followed by `select_scored`, so a cell selects
exactly what it selects alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from methods.base import KVPolicy, keep_all, record_scores, recording_scores
from methods.budgets import uniform_selected
from methods.cache import LayerCache, right_aligned
from methods.options import option, positive
from pkv_core.errors import UserInputError


@dataclass(frozen=True)
class BudgetedPolicy(KVPolicy):
    kv_budget: int = option(128, "average per-layer cache length C including the window (the PyramidKV paper's "
                                 "KV size)", check=positive)
    window: int = option(32, "observation window w: the last prompt tokens, always kept (the question of a chat "
                                "prompt and its template tail: docs/study.md)", check=positive)

    def validate(self) -> None:
        if self.kv_budget <= self.window:
            raise UserInputError(
                f"--kv-budget ({self.kv_budget}) must exceed --window ({self.window}): the budget includes the window"
            )

    @property
    def compresses(self) -> bool:
        return True

    def layer_selected(self, num_layers: int, prompt_len: int) -> list[int] | None:
        return uniform_selected(num_layers, self.kv_budget, self.window, prompt_len)

    def batch_selected(self, num_layers: int, lengths: list[int]) -> torch.Tensor | None:
        """[L, B] int64: every prompt's own budget per layer (its real length decides its regime), so a prompt
        keeps the same tokens batched as alone. None when every prompt of the batch is too short."""
        if not self.compresses_prompt(num_layers, max(lengths)):
            return None
        rows = []
        for n in lengths:
            sel = self.layer_selected(num_layers, n)
            rows.append(sel if sel is not None else [max(n - self.window, 0)] * num_layers)
        return torch.tensor(rows, dtype=torch.long).T.contiguous()

    def largest_selected(self, num_layers: int, max_input_len: int) -> list[int] | None:
        """The largest of `batch_selected`'s budgets per layer over every prompt length 1..max_input_len: each
        compressed prompt's own budget, and max(q - w, 0) for a shorter one batched with it. Not the budget at
        max_input_len: PyramidKV's deep layers keep C - w of a prompt in its uniform regime (C <= q < 2(C - w))
        and fewer of a long one (C = 128, w = 8, 32 layers: layer 31 keeps 120 at q = 200, 17 at q = 8000). A
        loop over every length, exact for any budget rule (under a second at 128k tokens and 80 layers)."""
        best = np.zeros(num_layers, np.int64)
        compressed = False
        for q in range(1, max_input_len + 1):
            selected = self.layer_selected(num_layers, q)
            if selected is None:  # kept whole alone; batched with a compressed prompt it is asked for q - w
                np.maximum(best, max(q - self.window, 0), out=best)
            else:
                compressed = True
                np.maximum(best, selected, out=best)
        return best.tolist() if compressed else None

    def select(self, queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, lengths: torch.Tensor,
               selected: int | torch.Tensor, layer: int = 0, shared: dict | None = None
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Right-padded queries [B, q, H, d], keys/values [B, Hkv, q, d], lengths [B] -> indices, K, V in the op's
        semantics (compact rows, -1 for unused slots). `shared` carries what one layer leaves for later layers of
        the same prefill (ChunkKV's index reuse)."""
        raise NotImplementedError(f"policy '{self.name}' does not select")

    def score_kind(self) -> tuple[str, int] | None:
        """The observation scores the selection ranks by ([B, H, q] float32 per layer, `observation_scores_for`):
        ("window", w) for the last w prompt queries, ("all", 0) for every one, None for none (positions only)."""
        return None

    @property
    def shares_prefill(self) -> bool:
        """Whether one prefill's K/V and scores of `score_kind` serve this selection (`select_scored` exists). A
        query-head cache decodes with another graph than FullKV's, so it runs alone."""
        return type(self).select_scored is not BudgetedPolicy.select_scored and not self.cache_heads_are_query_heads

    def select_scored(self, scores: torch.Tensor | None, keys: torch.Tensor, values: torch.Tensor,
                      lengths: torch.Tensor, selected: int | torch.Tensor, layer: int = 0, shared: dict | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`select` from the observation scores of `score_kind` ([B, H, q] float32, None without a kind) instead of
        the queries; the same results."""
        raise NotImplementedError(f"policy '{self.name}' does not select from shared scores")

    def graph_select(self, lay: Any, layer: int, queries: str, k4: str, v4: str, lengths: str, selected: str,
                     shared: dict) -> list[str]:
        """The selection's nodes into `lay.g`: queries [B, q, H*d] rotated, k4 / v4 [B, Hkv, q, d], lengths /
        selected [B] -> [kept [B, Hc, n], K, V [B, Hc, n, d], *what later layers read (kept in `shared`)]."""
        raise NotImplementedError(f"policy '{self.name}' has no graph selection")

    def reference_layer(self, state: Any, layer: int, query: torch.Tensor, key: torch.Tensor,
                        value: torch.Tensor) -> LayerCache:
        if state.selected is None:  # every prompt of the batch is too short
            return keep_all(state, query, key, value, self.cache_heads_are_query_heads)
        # The op works on right-padded rows (as fused attention and the ONNX engine do): shift each row first.
        mask = state.key_mask
        queries = right_aligned(query, mask).transpose(1, 2)  # [B, q, H, d]
        keys, lengths = right_aligned(key, mask), mask.sum(-1)
        idx, k, v = self.select(queries, keys, right_aligned(value, mask), lengths, state.selected[layer], layer,
                                state.shared)
        if recording_scores(state):
            scores = self.selection_scores(queries, keys, lengths, layer, state.shared)
            if scores is not None:
                record_scores(state, layer, scores)
        return LayerCache.from_selection(idx, k, v)

    def selection_scores(self, queries: torch.Tensor, keys: torch.Tensor, lengths: torch.Tensor, layer: int,
                         shared: dict) -> torch.Tensor | None:
        """What `select` ranked the prefix by, for `inspect` (arguments as `select`'s, after it ran): [B, Hc, q]
        float32, or None for a method without scores (StreamingLLM's are positions)."""
        return None

    def reference_layer_scored(self, state: Any, layer: int, key: torch.Tensor, value: torch.Tensor,
                               scores: dict) -> LayerCache:
        """`reference_layer` from a shared prefill: the layer's key / value [B, Hkv, q, d] (left-padded, as the model
        ran them) and its observation scores by kind ([B, H, q], computed from the right-aligned queries)."""
        if state.selected is None:  # every prompt of the batch is too short
            return keep_all(state, None, key, value)
        mask = state.key_mask
        observed, keys, lengths = scores.get(self.score_kind()), right_aligned(key, mask), mask.sum(-1)
        idx, k, v = self.select_scored(observed, keys, right_aligned(value, mask), lengths, state.selected[layer],
                                       layer, state.shared)
        if recording_scores(state):
            ranked = self.selection_scores_from(observed, keys, lengths, layer, state.shared)
            if ranked is not None:
                record_scores(state, layer, ranked)
        return LayerCache.from_selection(idx, k, v)

    def selection_scores_from(self, scores: torch.Tensor | None, keys: torch.Tensor, lengths: torch.Tensor,
                              layer: int, shared: dict) -> torch.Tensor | None:
        """`selection_scores` from the observation scores of `score_kind` instead of the queries (a shared
        prefill's); a method whose `selection_scores` reads no queries need not override it."""
        return self.selection_scores(None, keys, lengths, layer, shared)

    def graph_layer(self, pg: Any, layer: int, q: str, k4: str, v4: str) -> tuple[str, str, str]:
        return self.graph_layer_with(pg, layer, k4, v4, lambda lay, selected: self.graph_select(
            lay, layer, q, k4, v4, pg.lengths, selected, pg.shared))

    def graph_layer_scored(self, pg: Any, layer: int, scores: str | None, k4: str, v4: str) -> tuple[str, str, str]:
        """`graph_layer` in a shared prefill's selection graph: scores [B, H, q] of `score_kind` (None without)."""
        return self.graph_layer_with(pg, layer, k4, v4, lambda lay, selected: self.graph_select_scored(
            lay, layer, scores, k4, v4, pg.lengths, selected, pg.shared))

    def graph_layer_with(self, pg: Any, layer: int, k4: str, v4: str, select) -> tuple[str, str, str]:
        """The layer's cache: `select(lay, selected)` in the branch that compresses (pg.select_when_long)."""
        return tuple(pg.select_when_long(layer, k4, v4, select))

    def graph_select_scored(self, lay: Any, layer: int, scores: str | None, k4: str, v4: str, lengths: str,
                            selected: str, shared: dict) -> list[str]:
        """`graph_select` from observation scores [B, H, q] f32 of `score_kind` instead of the queries."""
        raise NotImplementedError(f"policy '{self.name}' has no graph selection from shared scores")

    def graph_functions_scored(self, spec: Any, target: Any) -> list:
        """The functions `graph_select_scored`'s nodes call."""
        return self.graph_functions(spec, target)

    # --- the observation group of a shared prefill (methods.shared_prefill) ----------------------------------------
    def shared_capture(self, policies: list[KVPolicy]) -> KVPolicy:
        from methods.shared_prefill import SharedPrefillCapture, score_kinds

        return SharedPrefillCapture(score_kinds(policies))

    def shared_engine_policy(self) -> KVPolicy:
        from methods.full import FullKVPolicy

        return FullKVPolicy()  # a kv-head cache decodes the same way whatever selected it

    def shared_scores_input(self, layer: int, spec: Any) -> tuple[str, int] | None:
        from methods.shared_prefill import kind_name

        kind = self.score_kind()
        return None if kind is None else (f"scores.{kind_name(kind)}.{layer}", spec.num_heads)

    def reference_select_shared(self, state: Any, captured: list) -> None:
        for layer, c in enumerate(captured):  # in layer order: ChunkKV's reuse reads earlier layers
            state.layers[layer] = self.reference_layer_scored(state, layer, c.keys, c.values, c.scores)

    def graph_select_shared(self, pg: Any, layers: list[tuple[str | None, str, str]]) -> None:
        for layer, (scores, k4, v4) in enumerate(layers):
            pg.emit(layer, *self.graph_layer_scored(pg, layer, scores, k4, v4))
