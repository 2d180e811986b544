"""The transformer body shared by the prefill and decode graphs of every target.

Numerics follow transformers' eager path: RMSNorm in float32, RoPE from the model's own inv_freq applied
outside the attention op (so the selection sees post-RoPE queries and keys), softmax in float32. Tensors are
kept in the projection's layout, [B, s, heads * d] (BSNH), the layout fused attention kernels take.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property

import numpy as np
from onnx import TensorProto

from exporter.quantize import WeightQuant
from exporter.specs import ModelSpec
from methods import KVPolicy
from trt_plugins.onnx_graph import GraphBuilder

INT_MAX = 2**62


@dataclass
class GraphConfig:
    spec: ModelSpec
    policy: KVPolicy
    np_dtype: np.dtype  # float32 | float16
    inv_freq: np.ndarray  # [d/2] float32, from the model's rotary embedding
    attention_scaling: float  # RoPE cos/sin factor (1.0 except for some scaled RoPE types)
    target: str = "onnxruntime"
    max_input_len: int | None = None  # sizes the TensorRT plugins' static output widths (max_selected)
    tokenizer: Callable | None = None  # loads the model's tokenizer, for a method whose graph holds token ids (KVzip)
    weights: WeightQuant | None = None  # weight-only quantization of the decoder's linear layers (`--weights`)

    @cached_property
    def largest_selected(self) -> list[int] | None:
        """Per layer, the largest budget any batch of prompts the engine accepts asks of it (every length up to
        its max input length, not just that one: `KVPolicy.largest_selected`); None when none is compressed."""
        return self.policy.largest_selected(self.spec.num_layers, self.max_input_len or
                                            self.spec.max_position_embeddings)

    def max_selected(self, layer: int) -> int:
        """Layer `layer`'s `largest_selected`: the TensorRT plugins' static output width, less the window."""
        largest = self.largest_selected
        return 0 if largest is None else largest[layer]

    @property
    def onnx_dtype(self) -> int:
        return TensorProto.FLOAT16 if self.np_dtype == np.float16 else TensorProto.FLOAT

    @property
    def cache_heads(self) -> int:
        return self.spec.num_heads if self.policy.cache_heads_are_query_heads else self.spec.num_kv_heads


class Layers:
    """Builds the shared pieces into `g`; `target` supplies the attention and normalisation ops."""

    def __init__(self, g: GraphBuilder, cfg: GraphConfig, target):
        self.g, self.cfg, self.s, self.target = g, cfg, cfg.spec, target

    def on(self, g: GraphBuilder) -> Layers:
        """The same body writing into another builder (a subgraph, or nodes named apart)."""
        return Layers(g, self.cfg, self.target)

    def rms_norm(self, x: str, weight: str) -> str:
        """transformers' LlamaRMSNorm with plain ops: x.float() * rsqrt(mean(x^2) + eps), back to dtype, * w."""
        g = self.g
        xf = g.op("Cast", x, to=TensorProto.FLOAT)
        var = g.op("ReduceMean", g.op("Mul", xf, xf), g.const([-1]), keepdims=1)
        y = g.op("Div", xf, g.op("Sqrt", g.op("Add", var, g.const(self.s.rms_norm_eps, np.float32))))
        return g.op("Mul", weight, g.op("Cast", y, to=self.cfg.onnx_dtype))

    def rope_tables(self, position_ids: str) -> tuple[str, str]:
        """position_ids [B, s] -> cos, sin [B, s, 1, d] in the model dtype (broadcast over heads, BSNH)."""
        g = self.g
        freqs = g.op("Mul", g.unsqueeze(g.op("Cast", position_ids, to=TensorProto.FLOAT), [-1]),
                     g.const(self.cfg.inv_freq, np.float32))  # [B, s, d/2]
        emb = g.op("Concat", freqs, freqs, axis=-1)
        scale = g.const(self.cfg.attention_scaling, np.float32)
        cos = g.op("Cast", g.op("Mul", g.op("Cos", emb), scale), to=self.cfg.onnx_dtype)
        sin = g.op("Cast", g.op("Mul", g.op("Sin", emb), scale), to=self.cfg.onnx_dtype)
        return g.unsqueeze(cos, [2]), g.unsqueeze(sin, [2])

    def rotate(self, x: str, heads: int, cos: str, sin: str) -> str:
        """[B, s, heads * d] -> the same, rotated (transformers' rotate_half convention)."""
        g, d = self.g, self.s.head_dim
        x4 = g.reshape(x, g.const([0, 0, heads, d]))
        x1 = g.slice(x4, g.const([0]), g.const([d // 2]), axis=3)
        x2 = g.slice(x4, g.const([d // 2]), g.const([INT_MAX]), axis=3)
        rotated = g.op("Concat", g.op("Neg", x2), x1, axis=-1)
        out = g.op("Add", g.op("Mul", x4, cos), g.op("Mul", rotated, sin))
        return g.reshape(out, g.const([0, 0, heads * d]))

    def qkv_packed(self, h: str, layer: int) -> str:
        """One packed projection: [B, s, (H + 2 Hkv) * d], q then k then v, not rotated."""
        return self.linear(h, f"model.layers.{layer}.self_attn.qkv_proj.weight.T")

    def linear(self, x: str, weight: str) -> str:
        """x [B, s, K] @ a decoder linear weight [K, N] -> [B, s, N]: a MatMul, or with `--weights` the target's
        quantized form of it (exporter.onnx.weights.add_quantized wrote the initializers)."""
        quant = self.cfg.weights
        if quant is None:
            return self.g.op("MatMul", x, weight)
        zero_points = [weight + ".zp"] if not quant.symmetric else []
        return self.target.quantized_matmul(self, x, weight, zero_points)

    def weight_shape(self, weight: str) -> tuple[int, int]:
        """(K, N) of an exported decoder linear weight (exporter.onnx.weights.exported_tensors)."""
        s = self.s
        attn, hidden = s.num_heads * s.head_dim, s.hidden_size
        shapes = {"qkv_proj": (hidden, attn + 2 * s.num_kv_heads * s.head_dim), "o_proj": (attn, hidden),
                  "gate_proj": (hidden, s.intermediate_size), "up_proj": (hidden, s.intermediate_size),
                  "down_proj": (s.intermediate_size, hidden)}
        return shapes[weight.split(".")[-3]]

    def split_qkv(self, packed: str) -> tuple[str, str, str]:
        s = self.s
        sizes = [s.num_heads * s.head_dim, s.num_kv_heads * s.head_dim, s.num_kv_heads * s.head_dim]
        return self.g.op("Split", packed, self.g.const(sizes), axis=-1, outputs=3)

    def qkv(self, h: str, layer: int, cos: str, sin: str) -> tuple[str, str, str]:
        """q [B, s, H*d], k / v [B, s, Hkv*d] from the packed projection; q and k rotated."""
        s = self.s
        q, k, v = self.split_qkv(self.qkv_packed(h, layer))
        return self.rotate(q, s.num_heads, cos, sin), self.rotate(k, s.num_kv_heads, cos, sin), v

    def to_heads(self, x: str, heads: int) -> str:
        """[B, s, heads * d] -> [B, heads, s, d] (BNSH, the cache layout)."""
        g = self.g
        return g.op("Transpose", g.reshape(x, g.const([0, 0, heads, self.s.head_dim])), perm=[0, 2, 1, 3])

    def expand_kv(self, x: str, to: int) -> str:
        """[B, s, Hkv * d] -> [B, s, to * d], query head h reading KV head h // group (query-head caches)."""
        g, hkv, d = self.g, self.s.num_kv_heads, self.s.head_dim
        if to == hkv:
            return x
        x5 = g.unsqueeze(g.reshape(x, g.const([0, 0, hkv, d])), [3])  # [B, s, Hkv, 1, d]
        shape = g.concat(g.dim(x, 0), g.dim(x, 1), g.const([hkv, to // hkv, d]))
        return g.reshape(g.op("Expand", x5, shape), g.const([0, 0, to * d]))

    def mlp(self, x: str, layer: int) -> str:
        """SwiGLU. Gate and up stay two MatMuls: packed, a long prompt would hold the packed [q, 2I] output and
        its split copies at once (the prefill's peak), for no decode gain."""
        g = self.g
        p = f"model.layers.{layer}.mlp."
        gate = self.linear(x, p + "gate_proj.weight.T")
        act = g.op("Mul", gate, g.op("Sigmoid", gate))  # SiLU
        return self.linear(g.op("Mul", act, self.linear(x, p + "up_proj.weight.T")), p + "down_proj.weight.T")

    def decoder(self, x: str, attend, between=None, to_last_attention: bool = False) -> str | None:
        """Every decoder layer; `attend(layer, h) -> [B, s, H*d]` does the projections and the cache-specific part
        from the normalised hidden states h; `between(layer, residual, h) -> (residual, h)`, when given, sees each
        layer's residual stream and MLP output before the next layer does (a method may drop rows there).
        `to_last_attention`: stop after the last layer's attention (a pass that only reads attention: None).

        The residual adds and the norms go through the target (a fused Add + RMSNorm where it has one)."""
        s = self.s
        residual, h = None, None
        for layer in range(s.num_layers):
            p = f"model.layers.{layer}."
            if residual is None:
                residual, h = x, self.target.norm(self, x, p + "input_layernorm.weight")
            else:
                residual, h = self.target.add_norm(self, residual, h, p + "input_layernorm.weight")
            out = attend(layer, h)
            if to_last_attention and layer == s.num_layers - 1:
                return None
            attn = self.linear(out, p + "self_attn.o_proj.weight.T")
            residual, h = self.target.add_norm(self, residual, attn, p + "post_attention_layernorm.weight")
            h = self.mlp(h, layer)
            if between is not None:
                residual, h = between(layer, residual, h)
        residual, h = self.target.add_norm(self, residual, h, "model.norm.weight")
        return h

    def logits(self, h: str, positions: str | None = None) -> str:
        """Normalised hidden states [B, s, hidden] -> logits [B, V] float32 at `positions` [B] (default: last)."""
        g = self.g
        if positions is None:
            last = g.slice(h, g.const([-1]), g.const([INT_MAX]), axis=1)
        else:
            idx = g.op("Expand", g.unsqueeze(positions, [1, 2]),
                       g.concat(g.dim(h, 0), g.const([1, self.s.hidden_size])))
            last = g.op("GatherElements", h, idx, axis=1)  # [B, 1, hidden]
        out = g.op("MatMul", last, "lm_head.weight.T")
        return g.op("Cast", g.reshape(out, g.const([0, self.s.vocab_size])), to=TensorProto.FLOAT,
                    outputs=["logits"])
