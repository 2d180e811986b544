"""Methods with a KV budget C and an observation window w that select layer by layer, right after each layer's
prefill attention: the layer keeps `selected_l` prefix tokens by the method's own scores, plus the last w.

A subclass states its selection twice, in the same op semantics (trt_plugins.pyramidkv_select's layout: right-padded
rows, compact ascending picks then the window, -1 after): `select` for the reference (PyTorch) and `graph_select`
for the ONNX graph (its nodes). Budgets (`layer_selected`) are uniform unless overridden.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

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
    window: int = option(8, "observation window w: the last prompt tokens, always kept", check=positive)

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

    def select(self, queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, lengths: torch.Tensor,
               selected: int | torch.Tensor, layer: int = 0, shared: dict | None = None
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Right-padded queries [B, q, H, d], keys/values [B, Hkv, q, d], lengths [B] -> indices, K, V in the op's
        semantics (compact rows, -1 for unused slots). `shared` carries what one layer leaves for later layers of
        the same prefill (ChunkKV's index reuse)."""
        raise NotImplementedError(f"policy '{self.name}' does not select")

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

    def graph_layer(self, pg: Any, layer: int, q: str, k4: str, v4: str) -> tuple[str, str, str]:
        return pg.select_when_long(layer, k4, v4, lambda lay, selected: self.graph_select(
            lay, layer, q, k4, v4, pg.lengths, selected, pg.shared))
