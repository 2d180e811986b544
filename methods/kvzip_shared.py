"""One prefill for every budget of KVzip in a sweep: its reconstruction scores do not depend on the budget C (only
the one top-k over every layer and head does), so a sample's prefill and scoring pass run once for all of KVzip's
cells with the same sinks, score_chunk and postfix (`KVzipPolicy.prefill_group`), and each cell only selects at its
budget and decodes.

`KVzipScoring` is the "method" of that prefill: KVzip up to its scores. In the reference it leaves per layer the
whole cache and its scores (`KVzipCaptured`); in an ONNX prefill graph it outputs them (keys.{i}, values.{i}
[B, Hkv, q, d], scores.kvzip.{i} [B, Hkv, q] f32) instead of selecting. A cell then runs KVzip's own selection on
them (`reference_select_shared`, `graph_select_shared`), the code its own prefill runs after the same scoring, so it
keeps what it keeps alone (tests/engines/test_kvzip_shared.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from onnx import TensorProto, helper

from methods.cache import LayerCache
from methods.kvzip import KVzipPolicy


@dataclass
class KVzipCaptured:
    """One layer after the shared prefill: the whole cache (right-padded, as KVzip's prefill keeps it) and its
    reconstruction scores [B, Hkv, q] f32 (None when no cell compresses the prompt: the pass is skipped)."""

    cache: LayerCache
    scores: torch.Tensor | None


@dataclass(frozen=True)
class KVzipScoring(KVzipPolicy):
    """KVzip's prefill and scoring pass without the selection. `score`: whether some cell compresses the prompt."""

    name: ClassVar[str] = "kvzip-scoring"  # not a registered method: no engine is built with it
    score: bool = True

    def reference_after_prefill(self, run: Any) -> bool:
        state = run.state
        scores = self.reference_scores(run) if self.score else [None] * len(state.layers)
        for i, layer_scores in enumerate(scores):
            state.layers[i] = KVzipCaptured(state.layers[i], layer_scores)
        return False

    def graph_end(self, pg: Any) -> None:
        """Outputs instead of a selection: every layer's whole cache and its scores (always scored: the graph does
        not know the cells' budgets)."""
        from methods.kvzip_graph import reconstruction_scores

        g, s = pg.g, pg.spec
        whole = pg.shared["kvzip_whole"]
        lay = pg.method_nodes("kvzip_")
        scores = reconstruction_scores(lay, self, whole, pg.lengths)
        g.nodes.extend(lay.g.nodes)
        cache = ["batch", s.num_kv_heads, "prompt_len", s.head_dim]
        for layer, ((kk, vv), layer_scores) in enumerate(zip(whole, scores, strict=True)):
            g.op("Identity", kk, outputs=[f"keys.{layer}"])
            g.op("Identity", vv, outputs=[f"values.{layer}"])
            g.op("Identity", layer_scores, outputs=[f"scores.kvzip.{layer}"])
            pg.outputs.extend([
                helper.make_tensor_value_info(f"keys.{layer}", pg.cfg.onnx_dtype, cache),
                helper.make_tensor_value_info(f"values.{layer}", pg.cfg.onnx_dtype, cache),
                helper.make_tensor_value_info(f"scores.kvzip.{layer}", TensorProto.FLOAT,
                                              ["batch", s.num_kv_heads, "prompt_len"])])
