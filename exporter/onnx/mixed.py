"""`mixed.onnx`: one scheduler step that decodes the running sequences and runs one prompt's next chunk together,
so the two share every weight read (on a CPU a decode step costs about one read of the weights, which a chunk
pays anyway). The decode rows and the chunk's tokens go through the projections and the MLP as one [1, n + S]
sequence; only the attention is apart: the decode's (decode.onnx's, per row, over the slots) and the chunk's
(chunk.onnx's, over its prompt's uncompressed cache).

I/O (onnxruntime target; per layer i):
  decode part, as decode.onnx at S = 1: input_ids, position_ids [n, 1]; past_key_values.{i}.key / .value
      [n, Hc, cap_i, d], past_lengths.{i} [n], cache_positions.{i} (sliding-window models) -> logits [n, V],
      present.{i}.key / .value (bind the past buffers: written in place);
  chunk part, as chunk.onnx: chunk_ids, chunk_position_ids [1, S]; chunk_past_length [1];
      chunk_key_values.{i}.key / .value [1, Hkv, capc, d] -> chunk_logits [1, V], chunk_present.{i}.key / .value
      (in place), window_queries.{i} (methods with a window).
Each row is computed as its own graph computes it (row-wise ops; the attention apart), so answers and kept sets
are those of decode.onnx and chunk.onnx (tested).
"""

from __future__ import annotations

import onnx
from onnx import TensorProto, helper

from exporter.onnx.decode import cache_visible
from exporter.onnx.layers import INT_MAX, GraphConfig, Layers
from exporter.onnx.model import make_model
from exporter.onnx.targets import TARGETS
from trt_plugins.onnx_graph import GraphBuilder

MIXED = "mixed.onnx"


def build_mixed(cfg: GraphConfig, initializers: list[onnx.TensorProto]) -> onnx.ModelProto:
    s, target, hc = cfg.spec, TARGETS[cfg.target], cfg.cache_heads
    g = GraphBuilder()
    lay = Layers(g, cfg, target)
    window = cfg.policy.window if cfg.policy.compresses else 0
    ints = TensorProto.INT64
    inputs = [helper.make_tensor_value_info(n, ints, ["batch", 1]) for n in ("input_ids", "position_ids")]
    inputs += [helper.make_tensor_value_info(n, ints, [1, "chunk_len"]) for n in ("chunk_ids", "chunk_position_ids")]
    inputs.append(helper.make_tensor_value_info("chunk_past_length", ints, [1]))
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", s.vocab_size]),
               helper.make_tensor_value_info("chunk_logits", TensorProto.FLOAT, [1, s.vocab_size])]
    rows = g.dim("input_ids", 0)  # [1] n decode rows
    hidden = g.const([1, -1, s.hidden_size])
    x = g.op("Concat", g.reshape(g.op("Gather", "model.embed_tokens.weight", "input_ids", axis=0), hidden),
             g.op("Gather", "model.embed_tokens.weight", "chunk_ids", axis=0), axis=1)  # [1, n + S, hidden]
    cos, sin = lay.rope_tables("chunk_position_ids")  # the decode rows rotate inside their attention op

    def attend(layer: int, h: str) -> str:
        packed = lay.qkv_packed(h, layer)  # [1, n + S, (H + 2 Hkv) d]: one projection for every row
        width = (s.num_heads + 2 * s.num_kv_heads) * s.head_dim
        decode_rows = g.reshape(g.slice(packed, g.const([0]), rows, axis=1), g.const([-1, 1, width]))  # [n, 1, .]
        chunk_rows = g.slice(packed, rows, g.const([INT_MAX]), axis=1)  # [1, S, .]
        # decode: decode.onnx's attention over each row's slots
        cache = ["batch", hc, f"capacity_{layer}", s.head_dim]
        past = (f"past_key_values.{layer}.key", f"past_key_values.{layer}.value")
        lengths = f"past_lengths.{layer}"
        inputs.extend([helper.make_tensor_value_info(past[0], cfg.onnx_dtype, cache),
                       helper.make_tensor_value_info(past[1], cfg.onnx_dtype, cache),
                       helper.make_tensor_value_info(lengths, ints, ["batch"])])
        visible = cache_visible(g, lay, layer, lengths, inputs)
        present = (f"present.{layer}.key", f"present.{layer}.value")
        out_rows = target.decode_attention(lay, "input_ids", layer, (None, None), past[0], past[1], lengths, visible,
                                           present, packed=decode_rows)  # [n, 1, H*d]
        outputs.extend(helper.make_tensor_value_info(name, cfg.onnx_dtype, cache) for name in present)
        # the chunk: chunk.onnx's attention over its prompt's cache, q and k rotated outside
        q, k, v = lay.split_qkv(chunk_rows)
        q, k = lay.rotate(q, s.num_heads, cos, sin), lay.rotate(k, s.num_kv_heads, cos, sin)
        if window:
            name = f"window_queries.{layer}"
            g.op("Identity", g.slice(q, g.const([-window]), g.const([INT_MAX]), axis=1), outputs=[name])
            outputs.append(helper.make_tensor_value_info(name, cfg.onnx_dtype, [1, f"window_len_{layer}",
                                                                                 s.num_heads * s.head_dim]))
        chunk_cache = [1, s.num_kv_heads, f"chunk_capacity_{layer}", s.head_dim]
        chunk_past = (f"chunk_key_values.{layer}.key", f"chunk_key_values.{layer}.value")
        chunk_present = (f"chunk_present.{layer}.key", f"chunk_present.{layer}.value")
        inputs.extend(helper.make_tensor_value_info(name, cfg.onnx_dtype, chunk_cache) for name in chunk_past)
        outputs.extend(helper.make_tensor_value_info(name, cfg.onnx_dtype, chunk_cache) for name in chunk_present)
        out_chunk = target.chunk_attention(lay, q, k, v, *chunk_past, "chunk_past_length", chunk_present)
        flat = g.const([1, -1, s.num_heads * s.head_dim])
        return g.op("Concat", g.reshape(out_rows, flat), out_chunk, axis=1)  # [1, n + S, H*d]

    h = lay.decoder(x, attend)  # [1, n + S, hidden]
    last = g.op("Concat", g.slice(h, g.const([0]), rows, axis=1), g.slice(h, g.const([-1]), g.const([INT_MAX]),
                                                                          axis=1), axis=1)  # [1, n + 1, hidden]
    scores = g.op("Cast", g.reshape(g.op("MatMul", last, "lm_head.weight.T"), g.const([-1, s.vocab_size])),
                  to=TensorProto.FLOAT)  # [n + 1, V]
    g.op("Slice", scores, g.const([0]), rows, g.const([0]), outputs=["logits"])
    g.op("Slice", scores, rows, g.const([INT_MAX]), g.const([0]), outputs=["chunk_logits"])
    return make_model(g, cfg, "pkv_mixed", inputs, outputs, initializers)
