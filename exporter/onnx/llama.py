"""LLaMA / Mistral as two ONNX graphs: prefill (+ per-layer selection) and one decode step.

Both graphs read the same external weights. Every layer's cache length is its own symbolic dimension
(`present_len_{i}`, `past_len_{i}`), so shape inference never ties layers together. Numerics follow
transformers' eager path: RMSNorm in float32, softmax in float32, RoPE from the model's own inv_freq.

I/O (B = batch, Hc = cache heads: Hkv, or H for query-head granularity):
  prefill  in:  input_ids, attention_mask, position_ids              [B, q] int64
           out: logits [B, V] f32 (last position); per layer i: present.{i}.key / .value [B, Hc, n_i, d],
                present.{i}.positions [B, Hc, n_i] int64 (absolute position, -1 = padding slot),
                kept_indices.{i} [B, Hc, n_i] int64 (padded prompt index of each cached token)
  decode   in:  input_ids, position_ids [B, 1] int64; past_key_values.{i}.key / .value / .positions
           out: logits [B, V] f32; present.{i}.key / .value / .positions (past + this token)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper

from exporter.onnx.budget import selected_counts
from exporter.policies import KVPolicy
from exporter.specs import ModelSpec
from trt_plugins.onnx_graph import CUSTOM_DOMAIN, IR_VERSION, OPSET, GraphBuilder
from trt_plugins.onnx_select import pyramidkv_select_function, streaming_select_function

INT_MAX = 2**62


@dataclass
class GraphConfig:
    spec: ModelSpec
    policy: KVPolicy
    np_dtype: np.dtype  # float32 | float16
    inv_freq: np.ndarray  # [d/2] float32, from the model's rotary embedding
    attention_scaling: float  # RoPE cos/sin factor (1.0 except for some scaled RoPE types)

    @property
    def onnx_dtype(self) -> int:
        return TensorProto.FLOAT16 if self.np_dtype == np.float16 else TensorProto.FLOAT

    @property
    def cache_heads(self) -> int:
        return self.spec.num_heads if self.policy.cache_heads_are_query_heads else self.spec.num_kv_heads


class _Layers:
    """The transformer body shared by both graphs."""

    def __init__(self, g: GraphBuilder, cfg: GraphConfig):
        self.g, self.cfg, self.s = g, cfg, cfg.spec

    def c(self, value) -> str:  # a constant in the model dtype
        return self.g.const(value, self.cfg.np_dtype)

    def rms_norm(self, x: str, weight: str) -> str:
        g = self.g
        xf = g.op("Cast", x, to=TensorProto.FLOAT)
        var = g.op("ReduceMean", g.op("Mul", xf, xf), g.const([-1]), keepdims=1)
        y = g.op("Div", xf, g.op("Sqrt", g.op("Add", var, g.const(self.s.rms_norm_eps, np.float32))))
        return g.op("Mul", weight, g.op("Cast", y, to=self.cfg.onnx_dtype))

    def rope_tables(self, position_ids: str) -> tuple[str, str]:
        """position_ids [B, s] -> cos, sin [B, 1, s, d] in the model dtype."""
        g = self.g
        freqs = g.op("Mul", g.unsqueeze(g.op("Cast", position_ids, to=TensorProto.FLOAT), [-1]),
                     g.const(self.cfg.inv_freq, np.float32))  # [B, s, d/2]
        emb = g.op("Concat", freqs, freqs, axis=-1)
        scale = g.const(self.cfg.attention_scaling, np.float32)
        cos = g.op("Cast", g.op("Mul", g.op("Cos", emb), scale), to=self.cfg.onnx_dtype)
        sin = g.op("Cast", g.op("Mul", g.op("Sin", emb), scale), to=self.cfg.onnx_dtype)
        return g.unsqueeze(cos, [1]), g.unsqueeze(sin, [1])

    def rotate(self, x: str, cos: str, sin: str) -> str:
        g, half = self.g, self.s.head_dim // 2
        x1 = g.slice(x, g.const([0]), g.const([half]), axis=3)
        x2 = g.slice(x, g.const([half]), g.const([INT_MAX]), axis=3)
        rotated = g.op("Concat", g.op("Neg", x2), x1, axis=-1)
        return g.op("Add", g.op("Mul", x, cos), g.op("Mul", rotated, sin))

    def heads(self, x: str, weight: str, n: int) -> str:
        """[B, s, hidden] @ W -> [B, n, s, d]."""
        g = self.g
        y = g.reshape(g.op("MatMul", x, weight), g.const([0, 0, n, self.s.head_dim]))
        return g.op("Transpose", y, perm=[0, 2, 1, 3])

    def expand_heads(self, x: str, to: int) -> str:
        """[B, Hkv, n, d] -> [B, to, n, d] (query head h reads KV head h // group)."""
        g, hkv = self.g, self.s.num_kv_heads
        if to == hkv:
            return x
        shape = g.concat(g.dim(x, 0), g.const([hkv, to // hkv]), g.dim(x, 2), g.const([self.s.head_dim]))
        return g.reshape(g.op("Expand", g.unsqueeze(x, [2]), shape), g.const([0, to, -1, self.s.head_dim]))

    def attention(self, q: str, k: str, v: str, additive_mask: str) -> str:
        """q [B, H, s, d], k/v [B, Hc, n, d], additive_mask broadcastable to [B, Hc, group * s, n] -> [B, s, H*d].

        The query heads of one cache head are stacked along rows, so K/V are never expanded in memory.
        """
        g, s = self.g, self.s
        hc = self.cfg.cache_heads
        qg = g.reshape(q, g.const([0, hc, -1, s.head_dim]))  # [B, Hc, group * s, d]
        scores = g.op("Mul", g.op("MatMul", qg, g.op("Transpose", k, perm=[0, 1, 3, 2])), self.c(s.head_dim**-0.5))
        scores = g.op("Add", scores, additive_mask)
        probs = g.op("Cast", g.op("Softmax", g.op("Cast", scores, to=TensorProto.FLOAT), axis=-1),
                     to=self.cfg.onnx_dtype)
        out = g.reshape(g.op("MatMul", probs, v), g.const([0, s.num_heads, -1, s.head_dim]))  # [B, H, s, d]
        return g.reshape(g.op("Transpose", out, perm=[0, 2, 1, 3]), g.const([0, 0, s.num_heads * s.head_dim]))

    def additive(self, ok: str) -> str:
        return self.g.op("Where", ok, self.c(0.0), self.c(float(np.finfo(self.cfg.np_dtype).min)))

    def mlp(self, x: str, p: str) -> str:
        g = self.g
        gate = g.op("MatMul", x, f"{p}mlp.gate_proj.weight.T")
        act = g.op("Mul", gate, g.op("Sigmoid", gate))  # SiLU
        return g.op("MatMul", g.op("Mul", act, g.op("MatMul", x, f"{p}mlp.up_proj.weight.T")),
                    f"{p}mlp.down_proj.weight.T")

    def block(self, x: str, layer: int, cos: str, sin: str, attend) -> str:
        """One decoder layer; `attend(layer, q, k, v) -> [B, s, H*d]` does the cache-specific part."""
        g, s, p = self.g, self.s, f"model.layers.{layer}."
        h = self.rms_norm(x, f"{p}input_layernorm.weight")
        q = self.rotate(self.heads(h, f"{p}self_attn.q_proj.weight.T", s.num_heads), cos, sin)
        k = self.rotate(self.heads(h, f"{p}self_attn.k_proj.weight.T", s.num_kv_heads), cos, sin)
        v = self.heads(h, f"{p}self_attn.v_proj.weight.T", s.num_kv_heads)
        x = g.op("Add", x, g.op("MatMul", attend(layer, q, k, v), f"{p}self_attn.o_proj.weight.T"))
        h = self.rms_norm(x, f"{p}post_attention_layernorm.weight")
        return g.op("Add", x, self.mlp(h, p))

    def logits(self, x: str) -> str:
        """Last position only: [B, s, hidden] -> logits [B, V] float32."""
        g = self.g
        last = g.slice(x, g.const([-1]), g.const([INT_MAX]), axis=1)
        h = self.rms_norm(last, "model.norm.weight")
        out = g.op("MatMul", h, "lm_head.weight.T")
        return g.op("Cast", g.reshape(out, g.const([0, self.s.vocab_size])), to=TensorProto.FLOAT,
                    outputs=["logits"])


def _select(g: GraphBuilder, cfg: GraphConfig, q_rot, k, v, key_mask, selected, lengths, cache_heads: int):
    """Outputs (kept [B, Hc, n], K, V [B, Hc, n, d]) for one layer; an If keeps everything when every prompt
    is shorter than C (selected: [B] per-prompt budgets, lengths: [B] real prompt lengths)."""
    _s, pol = cfg.spec, cfg.policy
    b, q = g.dim(k, 0), g.dim(k, 2)
    keep_all = GraphBuilder(g.prefix + "keepall_")
    idx = keep_all.op("Range", keep_all.const(0), keep_all.scalar(q), keep_all.const(1))
    idx = keep_all.op("Expand", keep_all.unsqueeze(idx, [0, 1]), keep_all.concat(b, keep_all.const([cache_heads]), q))
    lay = _Layers(keep_all, cfg)
    kk, vv = lay.expand_heads(k, cache_heads), lay.expand_heads(v, cache_heads)
    select = GraphBuilder(g.prefix + "select_")
    if pol.name == "streamingllm":
        outs = select.op("StreamingLLMSelect", k, v, key_mask, selected, outputs=3, domain=CUSTOM_DOMAIN,
                         window=pol.window, sinks=pol.sinks)
    else:
        n_obs = INT_MAX if pol.name == "h2o" else pol.window
        obs = select.slice(q_rot, select.const([-n_obs]), select.const([INT_MAX]), axis=2)
        outs = select.op("PyramidKVSelect", obs, k, v, key_mask, selected, outputs=3, domain=CUSTOM_DOMAIN,
                         window=pol.window, kernel=pol.kernel, pooling=pol.pooling_op(), granularity=pol.granularity)
    dt = cfg.onnx_dtype

    def branch(builder: GraphBuilder, outputs, name):
        # A branch output must be produced inside the branch (not an outer-scope value): wrap in Identity.
        outs = [builder.op("Identity", o) for o in outputs]
        vis = [helper.make_tensor_value_info(o, t, None)
               for o, t in zip(outs, (TensorProto.INT64, dt, dt), strict=True)]
        return helper.make_graph(builder.nodes, name, [], vis)

    no_compression = g.op("Less", g.op("ReduceMax", lengths, keepdims=1), g.const([pol.kv_budget]))
    return g.op("If", g.scalar(no_compression), outputs=3,
                then_branch=branch(keep_all, [idx, kk, vv], g.fresh("keep_all")),
                else_branch=branch(select, outs, g.fresh("select")))


def build_prefill(cfg: GraphConfig, initializers: list[onnx.TensorProto]) -> onnx.ModelProto:
    s, pol = cfg.spec, cfg.policy
    g = GraphBuilder()
    lay = _Layers(g, cfg)
    hc = cfg.cache_heads
    x = g.op("Gather", "model.embed_tokens.weight", "input_ids", axis=0)  # [B, q, hidden]
    cos, sin = lay.rope_tables("position_ids")
    q_len = g.dim("input_ids", 1)
    key_mask = g.op("Cast", "attention_mask", to=TensorProto.BOOL)  # [B, q]
    qs = g.scalar(q_len)
    rows = g.unsqueeze(g.op("Range", g.const(0), qs, g.const(1)), [1])  # [q, 1]
    cols = g.unsqueeze(g.op("Range", g.const(0), qs, g.const(1)), [0])  # [1, q]
    ok = g.op("And", g.op("LessOrEqual", cols, rows), g.unsqueeze(key_mask, [1, 2]))  # [B, 1, q, q]
    if s.sliding_window:
        ok = g.op("And", ok, g.op("Less", g.op("Sub", rows, cols), g.const(s.sliding_window)))
    mask = lay.additive(ok)
    lengths = g.op("ReduceSum", "attention_mask", g.const([1]), keepdims=0)  # [B] real prompt lengths
    budgets = selected_counts(g, pol, s.num_layers, lengths) if pol.compresses else None
    b = g.dim("input_ids", 0)
    mask_h = g.op("Expand", g.unsqueeze(key_mask, [1]), g.concat(b, g.const([hc]), q_len))  # [B, Hc, q]
    pos_h = g.op("Expand", g.unsqueeze("position_ids", [1]), g.concat(b, g.const([hc]), q_len))
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", s.vocab_size])]

    def attend(layer, q, k, v):
        out = lay.attention(q, lay.expand_heads(k, hc), lay.expand_heads(v, hc), _group_rows(g, mask, cfg))
        if budgets is None:
            kept = g.op("Expand", g.unsqueeze(g.op("Range", g.const(0), qs, g.const(1)), [0, 1]),
                        g.concat(b, g.const([hc]), q_len))
            kk, vv = lay.expand_heads(k, hc), lay.expand_heads(v, hc)
        else:
            kept, kk, vv = _select(g, cfg, q, k, v, key_mask, budgets[layer], lengths, hc)
        names = _cache_names("present", layer)
        g.op("Identity", kk, outputs=[names[0]])
        g.op("Identity", vv, outputs=[names[1]])
        g.op("Identity", kept, outputs=[f"kept_indices.{layer}"])
        safe = g.op("Max", kept, g.const(0))  # -1 = a slot this prompt's smaller budget leaves unused
        real = g.op("And", g.op("GatherElements", mask_h, safe, axis=2), g.op("GreaterOrEqual", kept, g.const(0)))
        g.op("Where", real, g.op("GatherElements", pos_h, safe, axis=2), g.const(-1), outputs=[names[2]])
        outputs.extend(_cache_infos(names, cfg, f"present_len_{layer}"))
        outputs.append(helper.make_tensor_value_info(f"kept_indices.{layer}", TensorProto.INT64,
                                                     ["batch", hc, f"present_len_{layer}"]))
        return out

    for layer in range(s.num_layers):
        x = lay.block(x, layer, cos, sin, attend)
    lay.logits(x)
    inputs = [helper.make_tensor_value_info(n, TensorProto.INT64, ["batch", "prompt_len"])
              for n in ("input_ids", "attention_mask", "position_ids")]
    return _model(g, cfg, "pkv_prefill", inputs, outputs, initializers)


def _group_rows(g: GraphBuilder, mask: str, cfg: GraphConfig) -> str:
    """A [B, 1, s, n] mask for attention laid out as [B, Hc, group * s, n]: tile it over the group rows."""
    group = cfg.spec.num_heads // cfg.cache_heads
    return mask if group == 1 else g.op("Tile", mask, g.const([1, 1, group, 1]))


def build_decode(cfg: GraphConfig, initializers: list[onnx.TensorProto]) -> onnx.ModelProto:
    s = cfg.spec
    g = GraphBuilder()
    lay = _Layers(g, cfg)
    hc = cfg.cache_heads
    x = g.op("Gather", "model.embed_tokens.weight", "input_ids", axis=0)  # [B, 1, hidden]
    cos, sin = lay.rope_tables("position_ids")
    step_pos = g.unsqueeze("position_ids", [1])  # [B, 1, 1]
    inputs = [helper.make_tensor_value_info(n, TensorProto.INT64, ["batch", 1]) for n in ("input_ids", "position_ids")]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", s.vocab_size])]

    def attend(layer, q, k, v):
        past = _cache_names("past_key_values", layer)
        present = _cache_names("present", layer)
        inputs.extend(_cache_infos(past, cfg, f"past_len_{layer}"))
        keys = g.op("Concat", past[0], lay.expand_heads(k, hc), axis=2, outputs=[present[0]])
        values = g.op("Concat", past[1], lay.expand_heads(v, hc), axis=2, outputs=[present[1]])
        step = g.op("Expand", step_pos, g.concat(g.dim("input_ids", 0), g.const([hc, 1])))  # [B, Hc, 1]
        positions = g.op("Concat", past[2], step, axis=2, outputs=[present[2]])  # [B, Hc, n + 1]
        ok = g.op("GreaterOrEqual", positions, g.const(0))
        if s.sliding_window:
            ok = g.op("And", ok, g.op("Less", g.op("Sub", step, positions), g.const(s.sliding_window)))
        outputs.extend(_cache_infos(present, cfg, f"present_len_{layer}"))
        return lay.attention(q, keys, values, g.unsqueeze(lay.additive(ok), [2]))  # mask [B, Hc, 1, n + 1]

    for layer in range(s.num_layers):
        x = lay.block(x, layer, cos, sin, attend)
    lay.logits(x)
    return _model(g, cfg, "pkv_decode", inputs, outputs, initializers)


def _cache_names(prefix: str, layer: int) -> list[str]:
    return [f"{prefix}.{layer}.key", f"{prefix}.{layer}.value", f"{prefix}.{layer}.positions"]


def _cache_infos(names: list[str], cfg: GraphConfig, length: str) -> list[onnx.ValueInfoProto]:
    hc, d = cfg.cache_heads, cfg.spec.head_dim
    return [helper.make_tensor_value_info(names[0], cfg.onnx_dtype, ["batch", hc, length, d]),
            helper.make_tensor_value_info(names[1], cfg.onnx_dtype, ["batch", hc, length, d]),
            helper.make_tensor_value_info(names[2], TensorProto.INT64, ["batch", hc, length])]


def _model(g: GraphBuilder, cfg: GraphConfig, name: str, inputs, outputs, initializers) -> onnx.ModelProto:
    s, pol = cfg.spec, cfg.policy
    functions = []
    if pol.compresses and name == "pkv_prefill":
        if pol.name == "streamingllm":
            functions.append(streaming_select_function(pol.window, pol.sinks, s.num_kv_heads, s.head_dim))
        else:
            functions.append(pyramidkv_select_function(pol.window, pol.kernel, pol.pooling_op(), pol.granularity,
                                                       s.num_heads, s.num_kv_heads, s.head_dim))
    graph = helper.make_graph(g.nodes, name, inputs, outputs, initializer=initializers)
    opsets = [helper.make_opsetid("", OPSET), helper.make_opsetid(CUSTOM_DOMAIN, 1)]
    return helper.make_model(graph, opset_imports=opsets, ir_version=IR_VERSION, functions=functions,
                             producer_name="pkv-export")
