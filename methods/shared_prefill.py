"""One prefill, many selections: what a prompt's prefill must record so that every (method, budget) cell of a sweep
that selects after the full prefill (StreamingLLM, H2O, SnapKV, PyramidKV, ChunkKV: `KVPolicy.shares_prefill`) is
served by it, and only each cell's selection and decode are its own.

The prefill attention never depends on the method (it always attends to the whole prompt), and these methods read
nothing of it but each layer's K/V and the observation scores of their `score_kind`: the attention mass of the last
w prompt queries (SnapKV, PyramidKV, ChunkKV) or of every prompt query (H2O), [B, H, q] float32 per layer; nothing
for StreamingLLM. `SharedPrefillCapture` is the "method" of that one prefill: in the reference it records them
(`reference_layer`), in an ONNX prefill graph it makes them outputs (`graph_layer`: keys.{i}, values.{i},
scores.{kind}.{i}). A cell then selects with `reference_layer_scored` / `graph_layer_scored`, which run the very
code its own prefill runs after computing the same scores from the same queries, so it keeps what it keeps alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from onnx import TensorProto, helper

from methods.base import KVPolicy
from methods.cache import right_aligned
from trt_plugins.onnx_select import observation_scores_nodes
from trt_plugins.pyramidkv_select import observation_scores_for

ScoreKind = tuple[str, int]  # ("window", w) or ("all", 0): which prompt queries observe


def kind_name(kind: ScoreKind) -> str:
    """The kind in graph output names: scores.window8.{i}, scores.all0.{i}."""
    return f"{kind[0]}{kind[1]}"


def score_kinds(policies: list[KVPolicy]) -> tuple[ScoreKind, ...]:
    """The distinct scores `policies` (all sharing the prefill) rank by, in a stable order."""
    kinds = {p.score_kind() for p in policies}
    return tuple(sorted(k for k in kinds if k is not None))


@dataclass
class CapturedLayer:
    """What one layer's prefill leaves for the cells: K/V [B, Hkv, q, d] post-RoPE, left-padded as the model ran
    them, and the observation scores by kind [B, H, q] float32 (from the right-aligned queries, as `select`)."""

    keys: torch.Tensor
    values: torch.Tensor
    scores: dict[ScoreKind, torch.Tensor]


@dataclass(frozen=True)
class SharedPrefillCapture(KVPolicy):
    """The prefill of a shared-prefill sweep: keeps every token, records K/V and the scores of `kinds`."""

    name: ClassVar[str] = "shared-prefill"  # not a registered method: no engine is built with it
    kinds: tuple = ()

    @property
    def prefill_group(self) -> str:
        return "observation"  # the group it serves

    def reference_layer(self, state: Any, layer: int, query: torch.Tensor, key: torch.Tensor,
                        value: torch.Tensor) -> CapturedLayer:
        """query [B, H, q, d], key / value [B, Hkv, q, d] left-padded (state.key_mask [B, q])."""
        mask = state.key_mask
        queries = right_aligned(query, mask).transpose(1, 2)  # [B, q, H, d], as BudgetedPolicy.reference_layer
        keys, lengths = right_aligned(key, mask), mask.sum(-1)
        scores = {kind: observation_scores_for(queries, keys, lengths, kind[1], kind[0]) for kind in self.kinds}
        return CapturedLayer(key, value, scores)

    def graph_layer(self, pg: Any, layer: int, q: str, k4: str, v4: str) -> None:
        """Outputs instead of a cache: keys.{i} / values.{i} [B, Hkv, q, d] and scores.{kind}.{i} [B, H, q] f32,
        computed by the nodes the selection functions start with (methods.budgeted: `graph_layer_scored`)."""
        g, s = pg.g, pg.spec
        output_cache(pg, layer, k4, v4)
        if not self.kinds:
            return None
        lay = pg.method_nodes(f"shared{layer}_")  # its own node names: profilers count them as selection time
        q4 = lay.g.reshape(q, lay.g.const([0, 0, s.num_heads, s.head_dim]))  # [B, q, H, d], as graph_select
        for kind in self.kinds:
            scores = observation_scores_nodes(lay.g, q4, k4, pg.lengths, kind[1], kind[0], s.num_heads,
                                              s.num_kv_heads, s.head_dim)
            name = f"scores.{kind_name(kind)}.{layer}"
            lay.g.op("Identity", scores, outputs=[name])
            pg.outputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, ["batch", s.num_heads,
                                                                                        "prompt_len"]))
        g.nodes.extend(lay.g.nodes)
        return None


def output_cache(pg: Any, layer: int, k4: str, v4: str) -> None:
    """A capture graph's outputs keys.{layer} / values.{layer}: the layer's K/V [B, Hkv, q, d] as given."""
    cache = ["batch", pg.spec.num_kv_heads, "prompt_len", pg.spec.head_dim]
    for name, value in ((f"keys.{layer}", k4), (f"values.{layer}", v4)):
        pg.g.op("Identity", value, outputs=[name])
        pg.outputs.append(helper.make_tensor_value_info(name, pg.cfg.onnx_dtype, cache))
