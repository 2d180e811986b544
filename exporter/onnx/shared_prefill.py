"""The ONNX side of a shared prefill (methods.shared_prefill, methods.kvzip.KVzipScoring): one prefill of a prompt for
every (method, budget) cell of a sweep's group, then each cell's selection on its own.

* The capture graph (`shared_prefill.onnx`, an extra graph of the engine of the group's `shared_engine_policy`
  built with `shared_prefill=capture`): the prefill graph's body with the capture policy as its method, so the same
  nodes compute the same K/V and logits as every cell's own prefill graph. I/O: the prefill's inputs
  (`reserve_tokens` unused) -> logits [B, V] f32; per layer keys.{i} / values.{i} [B, Hkv, q, d] (right-padded,
  as the attention returns them) and the scores the cells read: the observation group's scores.{kind}.{i}
  [B, H, q] f32 for every kind the cells rank by (FullKV's engine), KVzip's scores.kvzip.{i} [B, Hkv, q] f32 (the
  engine of KVzip at one of the budgets).
* A cell's selection graph (`build_select`, built in memory when the sweep starts): its method's per-layer
  selection, written by the same hooks as in its prefill graph but fed the scores instead of the queries
  (`graph_layer_scored`: `PyramidKVPick`, `ChunkKVPick`, `StreamingLLMSelect` — the selection functions after their
  scoring nodes). I/O: attention_mask [B, q] int64, reserve_tokens [1] int64, and the capture's per-layer outputs
  the method reads -> the prefill graph's per-layer outputs (present.{i}.key / .value with the decode slots,
  kept_indices.{i}, kv_lengths.{i}). The decode graph is the engine's: FullKV's serves the observation group (a
  kv-head cache decodes the same way whatever selected it), KVzip's every KVzip budget (the graphs are equal,
  tested).
"""

from __future__ import annotations

import dataclasses

import onnx
from onnx import TensorProto, helper

from exporter.onnx.layers import GraphConfig, Layers
from exporter.onnx.model import make_model
from exporter.onnx.prefill import PrefillGraph, build_prefill
from exporter.onnx.targets import TARGETS
from methods import KVPolicy
from trt_plugins.onnx_graph import GraphBuilder

SHARED_PREFILL_GRAPH = "shared_prefill.onnx"


def capture_builder(capture: KVPolicy):
    """A graph builder like build_prefill's, (cfg, initializers) -> the prefill with `capture` as its method."""

    def build(cfg: GraphConfig, initializers: list[onnx.TensorProto]) -> onnx.ModelProto:
        return build_prefill(dataclasses.replace(cfg, policy=capture), initializers)

    return build


def build_select(cfg: GraphConfig) -> onnx.ModelProto:
    """The selection graph of `cfg.policy` (a method with a `prefill_group`) from the capture graph's outputs."""
    pol: KVPolicy = cfg.policy
    if pol.prefill_group is None:
        raise ValueError(f"policy '{pol.name}' does not select from a shared prefill")
    s, target = cfg.spec, TARGETS[cfg.target]
    g = GraphBuilder()
    lengths = g.op("ReduceSum", "attention_mask", g.const([1]), keepdims=0)  # [B], as the prefill graph's
    pg = PrefillGraph(Layers(g, cfg, target), lengths, g.op("Max", "reserve_tokens", g.const([0])))
    pg.outputs = []  # no logits: the capture computed them
    pol.graph_begin(pg)
    inputs = [helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "prompt_len"]),
              helper.make_tensor_value_info("reserve_tokens", TensorProto.INT64, [1])]
    layers = []
    for layer in range(s.num_layers):
        k4, v4 = f"keys.{layer}", f"values.{layer}"
        cache = ["batch", s.num_kv_heads, "prompt_len", s.head_dim]
        inputs += [helper.make_tensor_value_info(k4, cfg.onnx_dtype, cache),
                   helper.make_tensor_value_info(v4, cfg.onnx_dtype, cache)]
        scores = pol.shared_scores_input(layer, s)
        if scores is not None:
            inputs.append(helper.make_tensor_value_info(scores[0], TensorProto.FLOAT,
                                                        ["batch", scores[1], "prompt_len"]))
        layers.append((None if scores is None else scores[0], k4, v4))
    pol.graph_select_shared(pg, layers)
    return make_model(g, cfg, "pkv_select", inputs, pg.outputs, [], pol.graph_functions_scored(s, target))
