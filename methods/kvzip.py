"""KVzip (Kim et al., 2025): query-agnostic. After the prefill the model reconstructs the context (teacher-forced,
in chunks of `score_chunk` tokens); each cached pair scores the most attention it receives; the top pairs over
every layer and head are kept at once (per-head lengths), C per head on average, the first `sinks` tokens always.
No observation window: nothing about the question is known. Specification: trt_plugins.kvzip_select; the graph:
methods.kvzip_graph."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from methods import backends
from methods.base import KVPolicy, record_scores, recording_scores
from methods.budgets import uniform_selected
from methods.cache import LayerCache, right_aligned
from methods.options import non_negative, option, positive
from pkv_core.errors import UserInputError
from trt_plugins.kvzip_select import (
    FIRST_PROMPT,
    LATER_PROMPT,
    chunk_count,
    chunk_inputs,
    chunk_scores,
    chunk_span,
    kvzip_select,
    reconstruction_attention,
)


@dataclass(frozen=True)
class KVzipPolicy(KVPolicy):
    """KVzip: the pairs the model attends to most while repeating the context, one top-k over every layer and head
    after the prefill."""

    name: ClassVar[str] = "kvzip"
    runs_on: ClassVar[frozenset[str]] = frozenset({backends.ONNXRUNTIME})
    chunked_prefill: ClassVar[bool] = False  # scored by a reconstruction pass over the whole context
    refusals: ClassVar[dict[str, str]] = {
        backends.SLOTS: "its one top-k over every layer and head decides each layer's length from the data, so no "
                        "per-layer slot size is known before admission",
    }
    per_head_lengths: ClassVar[bool] = True
    kv_budget: int = option(128, "mean cache length per KV head over all layers (no window; the paper's ratio r "
                                 "is C / q)", check=positive)
    sinks: int = option(4, "the first tokens, always kept; they play KVzip's system prompt (attended in every "
                           "chunk's score, never scored)", check=non_negative)
    score_chunk: int = option(2000, "context tokens (after the sinks) reconstructed per chunk of the scoring pass "
                                    "(the official code's 2000)", check=positive)
    postfix: int = option(8, "tokens of the previous chunk repeated in a later chunk's prompt", check=non_negative)

    def validate(self) -> None:
        if self.sinks > self.kv_budget:
            raise UserInputError(f"--sinks must be in [0, kv_budget] (got {self.sinks})")

    @property
    def compresses(self) -> bool:
        return True

    def layer_selected(self, num_layers: int, prompt_len: int) -> list[int] | None:
        """The mean per layer (C); the engine spreads the same total unevenly over layers and heads."""
        return uniform_selected(num_layers, self.kv_budget, 0, prompt_len)

    def always_kept(self, prompt_len: int) -> tuple[int, int]:
        return min(self.sinks, prompt_len), 0

    def regime(self, selected: list[int] | None) -> str:
        if selected is None:
            return super().regime(selected)
        return "global (per-head lengths; the mean per layer shown)"

    # --- reference: the prefill keeps everything; then the reconstruction pass and the one top-k ----------------
    def reference_after_prefill(self, run) -> bool:
        """Reconstruct the context chunk by chunk to score every cached pair, then keep the top pairs over all
        layers and heads. run.input_ids, run.mask: [B, q], left-padded as the prefill took them."""
        if not self.compresses_prompt(run.state.num_layers, int(run.mask.sum(-1).max())):
            return False
        self.reference_select(run.state, self.reference_scores(run))
        return True

    def reference_scores(self, run) -> list[torch.Tensor]:
        """The scoring pass over the caches the prefill kept whole: per layer [B, Hkv, q] f32 (right-aligned; the
        budget plays no part, so one pass serves every budget: `KVzipScoring`)."""
        state, lengths = run.state, run.mask.sum(-1)
        context = right_aligned(run.input_ids[:, None], run.mask.bool())[:, 0]  # [B, q] right-padded
        first, later = (run.tokenizer(p, add_special_tokens=False)["input_ids"] for p in (FIRST_PROMPT, LATER_PROMPT))
        rec = state.shared["kvzip"] = {"lengths": lengths, "scores": {}}
        state.attention = self._reconstruction_attention
        q = context.shape[1]
        for i in range(chunk_count(q, self.score_chunk, self.sinks)):
            ids, positions, part = chunk_inputs(context, lengths, i, self.score_chunk, self.postfix, first, later,
                                                run.pad_id, self.sinks)
            rec.update(positions=positions, taking_part=part, span=chunk_span(i, q, self.score_chunk, self.sinks))
            run.forward(ids, positions)
        state.attention = None
        del state.shared["kvzip"]
        return [rec["scores"][i] for i in range(len(state.layers))]

    def reference_select(self, state, scores: list[torch.Tensor]) -> None:
        """The one top-k at this budget: every layer's whole cache (state.layers) -> the kept pairs.
        scores: `reference_scores`."""
        layers, lengths = range(len(state.layers)), state.key_mask.sum(-1)
        picked = kvzip_select(scores, [state.layers[i].keys for i in layers], [state.layers[i].values for i in layers],
                              lengths, self.kv_budget, self.sinks)
        for i, (idx, k, v) in enumerate(picked):
            state.layers[i] = LayerCache.from_selection(idx, k, v)
        if recording_scores(state):  # the sinks are never scored (always kept)
            sinks = torch.arange(min(self.sinks, scores[0].shape[-1]))
            for i in layers:
                record_scores(state, i, scores[i].index_fill(2, sinks, float("nan")))

    def _reconstruction_attention(self, state, layer: int, query, key, value, sliding_window):
        """The scoring forward's attention: the chunk attends to the layer's whole context cache and to itself, and
        the official score's softmax (sinks, the slice this chunk repeats, itself) scores that slice. The chunk's
        own K/V are not kept. query [B, H, s, d], key / value [B, Hkv, s, d] -> ([B, s, H, d], None)."""
        cache, rec = state.layers[layer], state.shared["kvzip"]
        out = reconstruction_attention(query, key, value, cache.keys, cache.values, rec["lengths"], rec["positions"],
                                       rec["taking_part"], sliding_window)
        scores = chunk_scores(query, key, cache.keys, rec["lengths"], rec["taking_part"], *rec["span"], self.sinks)
        best = rec["scores"].get(layer)
        rec["scores"][layer] = scores if best is None else best.maximum(scores)  # disjoint slices
        return out, None

    # --- graph: keep every layer whole, then the same after the decoder ------------------------------------------
    def graph_layer(self, pg, layer, q, k4, v4):
        _, kk, vv = pg.keep_all(k4, v4)
        pg.shared.setdefault("kvzip_whole", []).append((kk, vv))
        return None  # emitted after the selection over every layer (graph_end)

    def graph_end(self, pg) -> None:
        from methods.kvzip_graph import reconstruction_scores

        whole = pg.shared["kvzip_whole"]
        lay = pg.method_nodes("kvzip_")  # its own node names: profilers can tell its cost apart
        self.graph_select(pg, lay, reconstruction_scores(lay, self, whole, pg.lengths), whole)

    def graph_select(self, pg, lay, scores: list[str], whole: list[tuple[str, str]]) -> None:
        """The one top-k at this budget into `lay`, then every layer's outputs: scores [B, Hkv, q] f32 and the whole
        caches K/V [B, Hkv, q, d] per layer."""
        from methods.kvzip_graph import global_select

        picked = global_select(lay, self, scores, whole, pg.lengths)
        pg.g.nodes.extend(lay.g.nodes)
        for layer, (kept, kk, vv) in enumerate(picked):
            pg.emit(layer, kept, kk, vv)

    # --- a sweep's shared prefill: one scoring pass serves every budget (`KVzipScoring`) ---------------------------
    @property
    def prefill_group(self) -> str:
        return f"kvzip-s{self.sinks}-c{self.score_chunk}-p{self.postfix}"  # every option but the budget

    def shared_capture(self, policies: list[KVPolicy]) -> KVPolicy:
        return KVzipScoring(kv_budget=self.kv_budget, sinks=self.sinks, score_chunk=self.score_chunk,
                            postfix=self.postfix, score=bool(policies))

    def shared_engine_policy(self) -> KVPolicy:
        return self  # its decode graph (per-head lengths) does not depend on the budget

    def shared_scores_input(self, layer: int, spec) -> tuple[str, int]:
        return f"scores.kvzip.{layer}", spec.num_kv_heads

    def reference_select_shared(self, state, captured: list) -> None:
        """captured: per layer (the whole cache, its scores or None: `KVzipCaptured`)."""
        for i, c in enumerate(captured):
            state.layers[i] = dataclasses.replace(c.cache)  # the decode appends to the cell's own object
        if self.compresses_prompt(len(captured), int(state.key_mask.sum(-1).max())):
            self.reference_select(state, [c.scores for c in captured])

    def graph_select_shared(self, pg, layers: list[tuple[str | None, str, str]]) -> None:
        self.graph_select(pg, pg.method_nodes("kvzip_"), [s for s, _, _ in layers], [(k, v) for _, k, v in layers])

# --- One prefill for every budget of KVzip in a sweep ----------------------------------------------------------------
# Its reconstruction scores do not depend on the budget C (only the one top-k over every layer and head does), so a
# sample's prefill and scoring pass run once for all of KVzip's cells with the same sinks, score_chunk and postfix
# (`KVzipPolicy.prefill_group`), and each cell only selects at its budget and decodes. `KVzipScoring` is the "method"
# of that prefill: KVzip up to its scores. In the reference it leaves per layer the whole cache and its scores
# (`KVzipCaptured`); in an ONNX prefill graph it outputs them (keys.{i}, values.{i} [B, Hkv, q, d], scores.kvzip.{i}
# [B, Hkv, q] f32) instead of selecting. A cell then runs KVzip's own selection on them (`reference_select_shared`,
# `graph_select_shared`), the code its own prefill runs after the same scoring, so it keeps what it keeps alone
# (tests/engines/test_kvzip_shared.py).


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
        from onnx import TensorProto, helper

        from methods.kvzip_graph import reconstruction_scores
        from methods.shared_prefill import output_cache

        whole = pg.shared["kvzip_whole"]
        lay = pg.method_nodes("kvzip_")
        scores = reconstruction_scores(lay, self, whole, pg.lengths)
        pg.g.nodes.extend(lay.g.nodes)
        for layer, ((kk, vv), layer_scores) in enumerate(zip(whole, scores, strict=True)):
            output_cache(pg, layer, kk, vv)
            name, heads = self.shared_scores_input(layer, pg.spec)
            pg.g.op("Identity", layer_scores, outputs=[name])
            pg.outputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, ["batch", heads, "prompt_len"]))
