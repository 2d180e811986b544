"""What differs between the graphs for onnxruntime and for TensorRT: the attention op, the norms, the opsets.

`onnxruntime` (the default) uses onnxruntime's fused kernels where they keep fp32 parity:
`com.microsoft.GroupQueryAttention` (its fp32 CPU prefill is tiled: no [q, q] scores; decode updates each
layer's cache in place when one buffer is bound as both past and present), and
`SkipSimplifiedLayerNormalization` (residual add + RMSNorm in one kernel), as onnxruntime-genai emits.

`tensorrt` uses standard ops only (TensorRT parses no `com.microsoft` op): the ONNX `Attention` op (opset 23,
4-D, `is_causal`; TensorRT maps it to its attention layer from 10.14), `TensorScatter` (opset 24; TensorRT's
in-place KV-cache update) for the decode cache, plain ops for RMSNorm, and selection nodes (`PyramidKVSelect`,
`StreamingLLMSelect`, `ChunkKVSelect`, `ChunkKVGather`) that carry `plugin_namespace="pkv"` and the attributes
their GPU kernels need, while onnxruntime inlines the same-named local function; the TensorRT build expands each
into its chain of kernel plugins before parsing (`trt_plugins/trt_chain.py`).

Both targets right-pad the prompt (every row's real tokens first), which is what fused attention assumes and
what makes causal attention ignore padding without a [q, q] mask.
"""

from __future__ import annotations

import numpy as np
from onnx import TensorProto, helper

MS_DOMAIN = "com.microsoft"


ROTARY_CACHES = ("rotary.cos_cache", "rotary.sin_cache")  # [max positions, d/2], model dtype


class OnnxRuntimeTarget:
    name = "onnxruntime"
    opset = 21
    in_place_decode = True  # one OrtValue bound as past and present of a layer
    # Decode rotates inside GroupQueryAttention (do_rotary, at position_ids): a dozen fewer small ops per layer
    # per token. The prefill rotates outside, since the selection needs the rotated queries as well.
    rotary_in_attention = True

    def opsets(self) -> list:
        return [helper.make_opsetid("", self.opset), helper.make_opsetid(MS_DOMAIN, 1)]

    def norm(self, lay, x: str, weight: str) -> str:
        # Only the first layer's input norm has no residual to fuse; plain ops keep the graph checker-clean.
        return lay.rms_norm(x, weight)

    def add_norm(self, lay, residual: str, x: str, weight: str) -> tuple[str, str]:
        """(residual + x, RMSNorm(residual + x)) in one kernel."""
        out, _, _, summed = lay.g.op("SkipSimplifiedLayerNormalization", residual, x, weight, outputs=4,
                                     domain=MS_DOMAIN, epsilon=lay.s.rms_norm_eps)
        return summed, out

    # Linear layers quantized by `--weights`: MatMulNBits's layout (exporter.onnx.weights.add_quantized).
    weight_layout = "nbits"

    def quantized_matmul(self, lay, x: str, weight: str, zero_points: list[str]) -> str:
        """com.microsoft.MatMulNBits: x [B, s, K] times the block-quantized weight, dequantized in the kernel
        (accuracy level 0: float arithmetic, so the engine equals its dequantized reference; 4: int8 activations)."""
        quant, (k, n) = lay.cfg.weights, lay.weight_shape(weight)
        level = {"accuracy_level": quant.accuracy_level} if quant.accuracy_level else {}
        return lay.g.op("MatMulNBits", x, weight + ".q", weight + ".scales", *zero_points, domain=MS_DOMAIN,
                        K=k, N=n, bits=quant.bits, block_size=quant.block_size, **level)

    def _gqa(self, lay, q, k, v, past_key, past_value, seqlens, total, kv_heads, bias=None, window=None,
             present=None, rotary_positions=None):
        g, s = lay.g, lay.s
        inputs = [q, k, v, past_key, past_value, g.op("Cast", seqlens, to=TensorProto.INT32),
                  g.op("Cast", g.scalar(total), to=TensorProto.INT32)]
        inputs += [*ROTARY_CACHES, rotary_positions] if rotary_positions else ["", "", ""]
        if bias is not None:
            inputs.append(bias)
        while inputs[-1] == "":
            inputs.pop()
        outputs = [g.fresh("gqa_out"), *present] if present else 3
        return g.op("GroupQueryAttention", *inputs, outputs=outputs, domain=MS_DOMAIN, num_heads=s.num_heads,
                    kv_num_heads=kv_heads, scale=float(s.head_dim**-0.5), local_window_size=window or -1,
                    do_rotary=int(rotary_positions is not None))

    def prefill_attention(self, lay, q: str, k: str, v: str, lengths: str, positions: str | None = None
                          ) -> tuple[str, str, str]:
        """Right-padded q [B, S, H*d], k / v [B, S, Hkv*d], lengths [B] -> (out [B, S, H*d], K, V [B, Hkv, S, d]).
        `positions` [B, S]: the slots' absolute positions when they are not consecutive (PyramidInfer's gathered
        tokens): a sliding window is then measured by them, through a [B, 1, S, S] bias instead of the op's
        slot-based window."""
        g = lay.g
        seqlens = g.op("Sub", lengths, g.const(1))  # GQA: total valid length - 1 per row
        window, bias = lay.s.sliding_window, None
        if window and positions is not None:
            near = g.op("Less", g.op("Sub", g.unsqueeze(positions, [2]), g.unsqueeze(positions, [1])),
                        g.const(window))  # [B, S, S]
            bias = g.unsqueeze(g.op("Where", near, g.const(0.0, lay.cfg.np_dtype),
                                    g.const(float(np.finfo(lay.cfg.np_dtype).min), lay.cfg.np_dtype)), [1])
            window = None
        return self._gqa(lay, q, k, v, "", "", seqlens, g.dim(q, 1), lay.s.num_kv_heads, bias=bias, window=window)

    def decode_attention(self, lay, h, layer, rope, past_key, past_value, past_lengths, visible, present,
                         packed: str | None = None):
        """h [B, S, hidden] (normalised), cache buffers [B, Hc, cap, d] (valid slots first), past_lengths [B]
        -> out [B, 1, H*d]; the updated caches are written to the names `present` (key, value).
        `visible(T)` gives a [B, H, S, T] mask or None. New tokens are rotated at position_ids in the op.
        `packed` [B, S, (H + 2 Hkv) * d]: h's projection, computed by the caller (a mixed step projects the decode
        rows with a prompt's chunk); h then only gives the shape."""
        g, hc = lay.g, lay.cfg.cache_heads
        new = g.dim(h, 1)  # S new tokens (a question at batch 1, else 1)
        packed = packed or lay.qkv_packed(h, layer)
        if hc == lay.s.num_kv_heads:  # GQA splits the packed projection itself
            q, k, v = packed, "", ""
        else:  # query-head caches: the new K/V go to every query head
            q, k, v = lay.split_qkv(packed)
            k, v = lay.expand_kv(k, hc), lay.expand_kv(v, hc)
        total = g.op("Add", g.op("ReduceMax", past_lengths, keepdims=1), new)  # [1]
        mask = visible(total)
        bias = None if mask is None else lay.g.op("Where", mask, g.const(0.0, lay.cfg.np_dtype),
                                                  g.const(float(np.finfo(lay.cfg.np_dtype).min), lay.cfg.np_dtype))
        seqlens = g.op("Add", past_lengths, g.op("Sub", new, g.const([1])))  # GQA: total length - 1 per row
        return self._gqa(lay, q, k, v, past_key, past_value, seqlens, total, hc, bias=bias, present=present,
                         rotary_positions="position_ids")[0]

    def chunk_attention(self, lay, q: str, k: str, v: str, past_key: str, past_value: str, past_length: str,
                        present: tuple[str, str]) -> str:
        """A prompt's next chunk over its uncompressed cache (batch 1: GQA takes S > 1 with a past only there):
        q [1, S, H*d], k / v [1, S, Hkv*d] rotated at their absolute positions; past_key / past_value
        [1, Hkv, cap, d] holding `past_length` [1] tokens, slot = position, so the model's sliding window is the
        op's own. The chunk's K/V are written into the buffers bound as `present` (the same ones); -> out
        [1, S, H*d]."""
        g = lay.g
        total = g.op("Add", past_length, g.dim(q, 1))  # [1]
        return self._gqa(lay, q, k, v, past_key, past_value, g.op("Sub", total, g.const([1])), total,
                         lay.s.num_kv_heads, window=lay.s.sliding_window, present=present)[0]

    def select_attributes(self) -> dict:
        return {}


class TensorRTTarget:
    name = "tensorrt"
    opset = 24  # Attention (23), TensorScatter (24)
    in_place_decode = False  # TensorRT aliases the cache itself; onnxruntime's TensorScatter writes a new tensor
    rotary_in_attention = False

    def opsets(self) -> list:
        return [helper.make_opsetid("", self.opset)]

    def norm(self, lay, x: str, weight: str) -> str:
        return lay.rms_norm(x, weight)

    def add_norm(self, lay, residual: str, x: str, weight: str) -> tuple[str, str]:
        summed = lay.g.op("Add", residual, x)
        return summed, lay.rms_norm(summed, weight)

    # Linear layers quantized by `--weights`: standard blocked DequantizeLinear (opset 21) before a MatMul, the
    # pattern TensorRT fuses into its weight-only GEMM (exporter.onnx.weights.add_quantized writes [K, N]).
    weight_layout = "dq"

    def quantized_matmul(self, lay, x: str, weight: str, zero_points: list[str]) -> str:
        quant, g = lay.cfg.weights, lay.g
        w = g.op("DequantizeLinear", weight + ".q", weight + ".scales", *zero_points, axis=0,
                 block_size=quant.block_size)
        return g.op("MatMul", x, w)

    def _attention(self, lay, q4: str, k4: str, v4: str, mask: str | None, causal: bool) -> str:
        """4-D Attention, [B, H, S, d] out -> [B, S, H*d]."""
        g, s = lay.g, lay.s
        inputs = [q4, k4, v4] + ([mask] if mask is not None else [])
        out = g.op("Attention", *inputs, is_causal=int(causal), scale=float(s.head_dim**-0.5))
        return g.reshape(g.op("Transpose", out, perm=[0, 2, 1, 3]), g.const([0, 0, s.num_heads * s.head_dim]))

    def prefill_attention(self, lay, q: str, k: str, v: str, lengths: str) -> tuple[str, str, str]:
        g, s = lay.g, lay.s
        q4, k4, v4 = lay.to_heads(q, s.num_heads), lay.to_heads(k, s.num_kv_heads), lay.to_heads(v, s.num_kv_heads)
        if not s.sliding_window:  # right padding: causal attention never reaches a padding key
            return self._attention(lay, q4, k4, v4, None, causal=True), k4, v4
        # Mistral's window needs an explicit [S, S] mask: ONNX Attention has no window attribute.
        n = g.scalar(g.dim(q, 1))
        rows = g.unsqueeze(g.op("Range", g.const(0), n, g.const(1)), [1])
        cols = g.unsqueeze(g.op("Range", g.const(0), n, g.const(1)), [0])
        mask = g.op("And", g.op("LessOrEqual", cols, rows),
                    g.op("Less", g.op("Sub", rows, cols), g.const(s.sliding_window)))
        return self._attention(lay, q4, k4, v4, mask, causal=False), k4, v4

    def decode_attention(self, lay, h, layer, rope, past_key, past_value, past_lengths, visible, present,
                         packed: str | None = None):
        if packed is not None:
            raise NotImplementedError("mixed steps are built for the onnxruntime target only")
        g, s = lay.g, lay.s
        hc = lay.cfg.cache_heads
        q, k, v = lay.qkv(h, layer, *rope)
        k, v = lay.expand_kv(k, hc), lay.expand_kv(v, hc)
        present_k = g.op("TensorScatter", past_key, lay.to_heads(k, hc), past_lengths, axis=2, outputs=[present[0]])
        present_v = g.op("TensorScatter", past_value, lay.to_heads(v, hc), past_lengths, axis=2,
                         outputs=[present[1]])
        capacity = g.dim(past_key, 2)
        slots = g.unsqueeze(g.op("Range", g.const(0), g.scalar(capacity), g.const(1)), [0, 1, 2])  # [1, 1, 1, cap]
        new = g.unsqueeze(g.op("Range", g.const(0), g.scalar(g.dim(h, 1)), g.const(1)), [0, 1, 3])  # [1, 1, S, 1]
        last = g.op("Add", g.unsqueeze(past_lengths, [1, 2, 3]), new)  # [B, 1, S, 1]: the slot of each new token
        mask = g.op("LessOrEqual", slots, last)  # [B, 1, S, cap]: causal over the cache and the new tokens
        window = visible(capacity)
        if window is not None:
            mask = g.op("And", mask, window)
        return self._attention(lay, lay.to_heads(q, s.num_heads), present_k, present_v, mask, causal=False)

    def select_attributes(self) -> dict:
        return {"plugin_namespace": "pkv", "plugin_version": "1"}


TARGETS = {t.name: t for t in (OnnxRuntimeTarget(), TensorRTTarget())}
