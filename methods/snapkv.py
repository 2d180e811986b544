"""SnapKV (Li et al., 2024): the keys the last `window` prompt queries attend to most, pooled along keys, C per
layer; the op is `PyramidKVSelect` (trt_plugins.pyramidkv_select: the specification; its ONNX function, Triton
kernel and TensorRT plugin equal it)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from methods import backends
from methods.budgeted import BudgetedPolicy
from methods.options import option, positive_odd
from trt_plugins.onnx_graph import CUSTOM_DOMAIN
from trt_plugins.pyramidkv_select import (
    GRANULARITIES,
    pyramidkv_select,
    ranking_scores,
    select_from_scores,
    selection_scores,
)

POOLINGS = ("max", "avg")


@dataclass(frozen=True)
class SnapKVPolicy(BudgetedPolicy):
    """SnapKV: keys the last `window` queries attend to most, pooled along keys, C per layer."""

    name: ClassVar[str] = "snapkv"
    observe: ClassVar[str] = "window"  # which prompt queries score the keys (trt_plugins.pyramidkv_select)
    kernel: int = option(7, "pooling width along keys (odd)", check=positive_odd)
    pooling: str = option("max", "score pooling", choices=POOLINGS)
    granularity: str = option("kv-head", "select per KV head (mean over its query group; the cache holds Hkv "
                                         "heads) or per query head (paper-faithful; the cache holds H heads)",
                              choices=GRANULARITIES)

    @property
    def cache_heads_are_query_heads(self) -> bool:
        return self.granularity == "query-head"

    def why_not(self, backend: str) -> str | None:
        if backend == backends.TRTLLM and self.cache_heads_are_query_heads:
            return "TensorRT-LLM's KV cache holds KV heads: --granularity query-head cannot run there"
        return super().why_not(backend)

    def pooling_op(self) -> str:
        return self.pooling

    def score_kind(self) -> tuple[str, int]:
        return (self.observe, self.window if self.observe == "window" else 0)

    def select(self, queries, keys, values, lengths, selected, layer=0, shared=None):
        return pyramidkv_select(queries, keys, values, lengths, selected, self.window, self.kernel,
                                self.pooling_op(), self.granularity, self.observe)

    def select_scored(self, scores, keys, values, lengths, selected, layer=0, shared=None):
        return select_from_scores(scores, keys, values, lengths, selected, self.window, self.kernel,
                                  self.pooling_op(), self.granularity)

    def selection_scores(self, queries, keys, lengths, layer, shared):
        return selection_scores(queries, keys, lengths, self.window, self.kernel, self.pooling_op(), self.granularity,
                                self.observe)

    def selection_scores_from(self, scores, keys, lengths, layer, shared):
        return ranking_scores(scores, keys.shape[1], lengths, self.window, self.kernel, self.pooling_op(),
                              self.granularity)

    def graph_select(self, lay, layer, queries, k4, v4, lengths, selected, shared):
        s, attrs = lay.s, lay.target.select_attributes()
        if attrs:  # the tensorrt target's node names its plugin and carries what the plugin needs
            attrs |= {"num_kv_heads": s.num_kv_heads, "head_dim": s.head_dim,
                      "max_selected": lay.cfg.max_selected(layer), "num_heads": s.num_heads}
        q4 = lay.g.reshape(queries, lay.g.const([0, 0, s.num_heads, s.head_dim]))  # [B, q, H, d]: a view, no copy
        return lay.g.op("PyramidKVSelect", q4, k4, v4, lengths, selected, outputs=4 if attrs else 3,
                        domain=CUSTOM_DOMAIN, window=self.window, kernel=self.kernel, pooling=self.pooling_op(),
                        granularity=self.granularity, observe=self.observe, **attrs)[:3]

    def graph_select_scored(self, lay, layer, scores, k4, v4, lengths, selected, shared):
        return lay.g.op("PyramidKVPick", scores, k4, v4, lengths, selected, outputs=3, domain=CUSTOM_DOMAIN,
                        window=self.window, kernel=self.kernel, pooling=self.pooling_op(),
                        granularity=self.granularity)

    def graph_functions_scored(self, spec, target):
        from trt_plugins.onnx_select import pyramidkv_pick_function

        return [pyramidkv_pick_function(self.window, self.kernel, self.pooling_op(), self.granularity,
                                        spec.num_heads, spec.num_kv_heads, spec.head_dim)]

    def graph_functions(self, spec, target):
        from trt_plugins.onnx_select import pyramidkv_select_function

        scores = bool(target.select_attributes())  # the plugin's 4th output: the function has it too
        return [pyramidkv_select_function(self.window, self.kernel, self.pooling_op(), self.granularity,
                                          spec.num_heads, spec.num_kv_heads, spec.head_dim, self.observe, scores)]
