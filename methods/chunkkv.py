"""ChunkKV (Liu et al., 2025): the prompt cut into chunks of `chunk_size` tokens from position 0 (kvpress's grid),
ranked by the observation window's summed attention and kept whole, the window's chunks always; layers in groups
of `reuse` rank the chunks once, at the group's first layer (index reuse). Specification:
trt_plugins.chunkkv_select; ONNX: the `ChunkKVSelect` / `ChunkKVGather` functions."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from onnx import TensorProto, helper

from methods import backends
from methods.budgeted import BudgetedPolicy
from methods.budgets import pyramid_selected
from methods.options import option, positive, positive_odd
from methods.pyramidkv import beta_option, schedule_option
from methods.snapkv import POOLINGS
from methods.streamingllm import TRTLLM_HOOK
from trt_plugins.chunkkv_select import chunkkv_from_scores, chunkkv_select, chunkkv_select_scored
from trt_plugins.onnx_graph import CUSTOM_DOMAIN

BUDGET_SCHEDULES = ("uniform", "pyramid")


@dataclass(frozen=True)
class ChunkKVPolicy(BudgetedPolicy):
    """ChunkKV: whole chunks ranked by the observation window (optionally pooled: `kernel`, `pooling`), the
    window's chunks always; index reuse over groups of `reuse` layers; budgets uniform (the paper) or PyramidKV's
    pyramid (`budget_schedule`)."""

    name: ClassVar[str] = "chunkkv"
    runs_on: ClassVar[frozenset[str]] = backends.ALL - {backends.TRTLLM}
    refusals: ClassVar[dict[str, str]] = {backends.TRTLLM: TRTLLM_HOOK}
    plan_is_upper_bound: ClassVar[bool] = True
    chunk_size: int = option(10, "prompt tokens per chunk, cut from position 0 over the whole prompt",
                             check=positive)
    # no pooling by default: the paper's Algorithm 1 (kvpress's SnapKVPress scorer: avg pooling, width 5)
    kernel: int = option(1, "pooling width along keys (odd)", check=positive_odd)
    pooling: str = option("avg", "score pooling", choices=POOLINGS)
    reuse: int = option(1, "layers per group sharing the group's first layer's chunk ranking (1 = no reuse)",
                        check=positive)
    budget_schedule: str = option("uniform", "the same budget for every layer (the paper), or PyramidKV's pyramid",
                                  choices=BUDGET_SCHEDULES)
    beta: int = beta_option()
    schedule: str = schedule_option()

    def layer_selected(self, num_layers: int, prompt_len: int) -> list[int] | None:
        if self.budget_schedule == "pyramid":
            return pyramid_selected(num_layers, self.kv_budget, self.window, prompt_len, self.beta, self.schedule)
        return super().layer_selected(num_layers, prompt_len)

    def kept_prefix(self, selected: int) -> int:
        """At most `selected` besides the window: whole chunks, the window's chunks included (fewer when the
        chunks do not fill the budget exactly)."""
        return selected

    def scores_from(self, layer: int) -> int:
        """The layer whose chunk ranking `layer` uses: the first of its reuse group."""
        return layer - layer % self.reuse

    def score_kind(self) -> tuple[str, int]:
        return ("window", self.window)

    def select(self, queries, keys, values, lengths, selected, layer=0, shared=None):
        source = self.scores_from(layer)
        if shared is not None and source != layer:
            return chunkkv_from_scores(shared[("chunkkv", source)], keys, values, lengths, selected, self.window,
                                       self.chunk_size)
        idx, k, v, scores = chunkkv_select(queries, keys, values, lengths, selected, self.window, self.chunk_size,
                                           self.kernel, self.pooling)
        if shared is not None:
            shared[("chunkkv", layer)] = scores
        return idx, k, v

    def select_scored(self, scores, keys, values, lengths, selected, layer=0, shared=None):
        source = self.scores_from(layer)
        if shared is not None and source != layer:
            return chunkkv_from_scores(shared[("chunkkv", source)], keys, values, lengths, selected, self.window,
                                       self.chunk_size)
        idx, k, v, chunks = chunkkv_select_scored(scores, keys, values, lengths, selected, self.window,
                                                  self.chunk_size, self.kernel, self.pooling)
        if shared is not None:
            shared[("chunkkv", layer)] = chunks
        return idx, k, v

    def selection_scores(self, queries, keys, lengths, layer, shared):
        """Each token scores its chunk's score (+inf: the window's chunks); every KV head shares them."""
        chunks = shared[("chunkkv", self.scores_from(layer))]  # [B, C]
        q = keys.shape[2]
        return chunks.repeat_interleave(self.chunk_size, dim=1)[:, None, :q].expand(-1, keys.shape[1], -1)

    def graph_layer_with(self, pg, layer, k4, v4, select):
        leader = self.scores_from(layer) == layer
        # A group leader also hands its chunk scores [B, C] to the group (zeros when nothing is compressed).
        extra = (lambda lay: [_no_chunk_scores(lay.g, k4, self.chunk_size)]) if leader else None
        kept, kk, vv, *scores = pg.select_when_long(layer, k4, v4, select, extra)
        if scores:
            pg.shared[("chunkkv", layer)] = scores[0]
        return kept, kk, vv

    def graph_select(self, lay, layer, queries, k4, v4, lengths, selected, shared):
        g, s = lay.g, lay.s
        source = self.scores_from(layer)
        attrs = lay.target.select_attributes()
        if attrs:  # the tensorrt target: the node becomes the ChunkKV kernel chain (trt_plugins.trt_chain)
            attrs |= {"num_kv_heads": s.num_kv_heads, "head_dim": s.head_dim,
                      "max_selected": lay.cfg.max_selected(layer)}
        if source != layer:
            return g.op("ChunkKVGather", shared[("chunkkv", source)], k4, v4, lengths, selected, outputs=3,
                        domain=CUSTOM_DOMAIN, window=self.window, chunk_size=self.chunk_size, **attrs)
        q4 = g.reshape(queries, g.const([0, 0, s.num_heads, s.head_dim]))
        if attrs:
            attrs["num_heads"] = s.num_heads
        return g.op("ChunkKVSelect", q4, k4, v4, lengths, selected, outputs=4, domain=CUSTOM_DOMAIN,
                    window=self.window, chunk_size=self.chunk_size, kernel=self.kernel, pooling=self.pooling,
                    **attrs)

    def graph_select_scored(self, lay, layer, scores, k4, v4, lengths, selected, shared):
        source = self.scores_from(layer)
        if source != layer:
            return self.graph_select(lay, layer, None, k4, v4, lengths, selected, shared)  # ChunkKVGather
        return lay.g.op("ChunkKVPick", scores, k4, v4, lengths, selected, outputs=4, domain=CUSTOM_DOMAIN,
                        window=self.window, chunk_size=self.chunk_size, kernel=self.kernel, pooling=self.pooling)

    def graph_functions(self, spec, target):
        return self._functions(spec, "select")

    def graph_functions_scored(self, spec, target):
        return self._functions(spec, "pick")

    def _functions(self, spec, first: str) -> list:
        from trt_plugins.onnx_select import chunkkv_gather_function, chunkkv_pick_function, chunkkv_select_function

        leader = chunkkv_select_function if first == "select" else chunkkv_pick_function
        out = [leader(self.window, self.chunk_size, spec.num_heads, spec.num_kv_heads, spec.head_dim, self.kernel,
                      self.pooling)]
        if self.reuse > 1:
            out.append(chunkkv_gather_function(self.window, self.chunk_size, spec.num_kv_heads, spec.head_dim))
        return out


def _no_chunk_scores(g, k4: str, chunk_size: int) -> str:
    """The keep-all branch's stand-in for a group leader's chunk scores: zeros [B, ceil(q / c)]."""
    n = g.op("Div", g.op("Add", g.dim(k4, 2), g.const([chunk_size - 1])), g.const([chunk_size]))
    return g.op("ConstantOfShape", g.concat(g.dim(k4, 0), n),
                value=helper.make_tensor("zero", TensorProto.FLOAT, [1], [0.0]))
