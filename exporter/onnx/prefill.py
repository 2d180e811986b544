"""The prefill graph: the whole prompt -> last-token logits + every layer's compressed cache, ready for decode.

I/O (B = batch, q = padded prompt length, rows right-padded; Hc = cache heads: Hkv, or H for query-head):
  in:  input_ids, attention_mask, position_ids [B, q] int64 (real tokens first in every row);
       reserve_tokens [1] int64: decode slots to allocate behind every layer's cache
  out: logits [B, V] f32 at each row's last real token; per layer i:
       present.{i}.key / .value [B, Hc, n_i + reserve, d]: the kept tokens of every row first (compact), zeros
           after them: the buffer decode updates in place;
       kept_indices.{i} [B, Hc, n_i] int64: prompt position of each kept token (0 = first), -1 = unused slot;
       kv_lengths.{i} [B] int64: valid cached tokens per row;
       and whatever outputs of its own the method adds (methods.base: the graph hooks).
Attention is the target's (no [q, q] tensor on either target's long-context path). The method decides each layer's
cache through its hooks (`graph_layer` after a layer's attention, `graph_between_layers` after the whole layer,
`graph_end` after the decoder); a per-layer selection sits in an `If` that keeps everything when every prompt is
shorter than the budget (`PrefillGraph.select_when_long`).
"""

from __future__ import annotations

from collections.abc import Callable

import onnx
from onnx import TensorProto, helper

from exporter.onnx.budget_table import selected_counts
from exporter.onnx.layers import GraphConfig, Layers
from exporter.onnx.model import make_model
from exporter.onnx.targets import TARGETS
from trt_plugins.onnx_graph import GraphBuilder

# Names of the nodes a method adds to the prefill's top level (`PrefillGraph.method_nodes`): profilers (and
# scripts/bench_methods.py) count them, with the `If` nodes of per-layer selections, as selection time.
METHOD_NODES = "sel_"


class PrefillGraph:
    """What the prefill graph writer offers a method's graph hooks (tensor names are ONNX value names).

    g / lay / cfg / spec / target: the builder, the transformer body, the build's configuration;
    lengths [B] int64: tokens per row the current layer computes over (the real prompt lengths until a method drops
        tokens between layers); positions [B, n] int64: their absolute positions ("position_ids" until then);
    shared: a method's scratch for this graph (what one layer leaves for later ones); outputs: graph outputs."""

    def __init__(self, lay: Layers, lengths: str, reserve: str):
        self.lay, self.g, self.cfg, self.spec, self.target = lay, lay.g, lay.cfg, lay.s, lay.target
        self.prompt_lengths = self.lengths = lengths
        self.positions = "position_ids"
        self.reserve = reserve
        self.shared: dict = {}
        self.outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", self.spec.vocab_size])]
        self._rope: dict[str, tuple[str, str]] = {}
        self._budgets: list[str] | None = None

    def rope(self) -> tuple[str, str]:
        """cos / sin of the current positions (computed once per positions tensor)."""
        if self.positions not in self._rope:
            self._rope[self.positions] = self.lay.rope_tables(self.positions)
        return self._rope[self.positions]

    def moved_positions(self) -> str | None:
        """The current positions when a method moved rows (they are no longer 0..n-1), else None."""
        return None if self.positions == "position_ids" else self.positions

    def sub(self, prefix: str) -> Layers:
        """The transformer body on a fresh builder whose node names start with `prefix` (merge its nodes into g)."""
        return self.lay.on(GraphBuilder(self.g.prefix + prefix))

    def method_nodes(self, name: str) -> Layers:
        """`sub` for the nodes a method adds to the graph's top level: named METHOD_NODES + name + ..."""
        return self.sub(METHOD_NODES + name)

    def budgets(self) -> list[str]:
        """Per layer, a [B] int64 tensor: each prompt's own selected count, from its real length."""
        if self._budgets is None:
            self._budgets = selected_counts(self.g, self.cfg.policy, self.spec.num_layers, self.prompt_lengths)
        return self._budgets

    def keep_all(self, k4: str, v4: str, lay: Layers | None = None) -> tuple[str, str, str]:
        """(kept, K, V) holding every token of the current layer, in place (rows are compact): kept [B, Hc, n] is
        each slot's position (-1 after the row's length), K/V [B, Hc, n, d] zero there. k4 / v4 [B, Hkv, n, d]."""
        lay = lay or self.lay
        g, s, hc = lay.g, self.spec, self.cfg.cache_heads
        b, n = g.dim(k4, 0), g.dim(k4, 2)
        slots = g.unsqueeze(g.op("Range", g.const(0), g.scalar(n), g.const(1)), [0])  # [1, n]
        real = g.op("Less", slots, g.unsqueeze(self.lengths, [1]))  # [B, n]
        idx = g.op("Where", real, self.moved_positions() or slots, g.const(-1))
        idx = g.op("Expand", g.unsqueeze(idx, [1]), g.concat(b, g.const([hc]), n))  # [B, Hc, n]
        if hc != s.num_kv_heads:  # query-head caches: every query head reads its KV head
            group = hc // s.num_kv_heads
            shape = g.concat(b, g.const([s.num_kv_heads, group]), n, g.const([s.head_dim]))
            k4 = g.reshape(g.op("Expand", g.unsqueeze(k4, [2]), shape), g.const([0, hc, -1, s.head_dim]))
            v4 = g.reshape(g.op("Expand", g.unsqueeze(v4, [2]), shape), g.const([0, hc, -1, s.head_dim]))
        used = g.unsqueeze(g.unsqueeze(real, [1]), [3])  # [B, 1, n, 1]
        zero = g.const(0.0, self.cfg.np_dtype)
        return idx, g.op("Where", used, k4, zero), g.op("Where", used, v4, zero)

    def select_when_long(self, layer: int, k4: str, v4: str, select: Callable[[Layers, str], list[str]],
                         keep_all_extra: Callable[[Layers], list[str]] | None = None) -> list[str]:
        """An `If`: everything kept when every prompt is shorter than the budget, else `select(lay, selected)` (its
        nodes on `lay`'s own builder; selected [B] this layer's budgets) -> [kept, K, V, *extra]. A select with
        extra outputs needs `keep_all_extra` to give the other branch the same ones."""
        keep = self.sub(f"keepall{layer}_")
        chosen = self.sub(f"select{layer}_")
        kept_all = list(self.keep_all(k4, v4, keep))
        picked = list(select(chosen, self.budgets()[layer]))
        if keep_all_extra is not None:
            kept_all += keep_all_extra(keep)
        then = _branch(keep.g, kept_all, self.g.fresh("keep_all"), self.cfg.onnx_dtype)
        other = _branch(chosen.g, picked, self.g.fresh("select"), self.cfg.onnx_dtype)
        g = self.g
        short = g.op("Less", g.op("ReduceMax", self.prompt_lengths, keepdims=1), g.const([self.cfg.policy.kv_budget]))
        out = g.op("If", g.scalar(short), outputs=len(picked), then_branch=then, else_branch=other)
        return out if isinstance(out, list) else [out]

    def emit(self, layer: int, kept: str, kk: str, vv: str) -> None:
        """The layer's outputs: kept indices, the cache padded with the decode slots, valid slots per row."""
        g, s, hc = self.g, self.spec, self.cfg.cache_heads
        g.op("Identity", kept, outputs=[f"kept_indices.{layer}"])
        pads = g.concat(g.const([0, 0, 0, 0, 0, 0]), self.reserve, g.const([0]))
        g.op("Pad", kk, pads, outputs=[f"present.{layer}.key"])
        g.op("Pad", vv, pads, outputs=[f"present.{layer}.value"])
        # A row's longest head: the slot its next token goes to (heads may hold different counts: KVzip).
        valid = g.op("ReduceSum", g.op("Cast", g.op("GreaterOrEqual", kept, g.const(0)), to=TensorProto.INT64),
                     g.const([2]), keepdims=0)  # [B, Hc]
        g.op("ReduceMax", valid, g.const([1]), keepdims=0, outputs=[f"kv_lengths.{layer}"])
        cache = ["batch", hc, f"present_len_{layer}", s.head_dim]
        self.outputs.extend([helper.make_tensor_value_info(f"present.{layer}.key", self.cfg.onnx_dtype, cache),
                             helper.make_tensor_value_info(f"present.{layer}.value", self.cfg.onnx_dtype, cache),
                             helper.make_tensor_value_info(f"kept_indices.{layer}", TensorProto.INT64,
                                                           ["batch", hc, f"kept_len_{layer}"]),
                             helper.make_tensor_value_info(f"kv_lengths.{layer}", TensorProto.INT64, ["batch"])])


def _branch(builder: GraphBuilder, outputs: list[str], name: str, dtype: int) -> onnx.GraphProto:
    # A branch output must be produced inside the branch (not an outer-scope value): wrap in Identity.
    outs = [builder.op("Identity", o) for o in outputs]
    types = (TensorProto.INT64, dtype, dtype, TensorProto.FLOAT)[: len(outs)]
    infos = [helper.make_tensor_value_info(o, t, None) for o, t in zip(outs, types, strict=True)]
    return helper.make_graph(builder.nodes, name, [], infos)


def build_prefill(cfg: GraphConfig, initializers: list[onnx.TensorProto]) -> onnx.ModelProto:
    pol = cfg.policy
    target = TARGETS[cfg.target]
    g = GraphBuilder()
    lay = Layers(g, cfg, target)
    x = g.op("Gather", "model.embed_tokens.weight", "input_ids", axis=0)  # [B, q, hidden]
    lengths = g.op("ReduceSum", "attention_mask", g.const([1]), keepdims=0)  # [B] real prompt lengths
    pg = PrefillGraph(lay, lengths, g.op("Max", "reserve_tokens", g.const([0])))
    pol.graph_begin(pg)

    def attend(layer: int, h: str) -> str:
        cos, sin = pg.rope()
        q, k, v = lay.qkv(h, layer, cos, sin)  # RoPE here: the selection needs the rotated queries too
        moved = pg.moved_positions()  # a sliding window by the tokens' own positions once rows were gathered
        out, k4, v4 = target.prefill_attention(lay, q, k, v, pg.lengths, *([moved] if moved else []))
        cache = pol.graph_layer(pg, layer, q, k4, v4)  # K/V: [B, Hkv, n, d] post-RoPE
        if cache is not None:
            pg.emit(layer, *cache)
        return out

    h = lay.decoder(x, attend, lambda layer, residual, h: pol.graph_between_layers(pg, layer, residual, h))
    lay.logits(h, g.op("Sub", pg.lengths, g.const(1)))
    pol.graph_end(pg)
    inputs = [helper.make_tensor_value_info(n, TensorProto.INT64, ["batch", "prompt_len"])
              for n in ("input_ids", "attention_mask", "position_ids")]
    inputs.append(helper.make_tensor_value_info("reserve_tokens", TensorProto.INT64, [1]))
    return make_model(g, cfg, "pkv_prefill", inputs, pg.outputs, initializers,
                      pol.graph_functions(cfg.spec, target) if pol.compresses else [])
