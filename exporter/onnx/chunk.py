"""The graphs of a chunked prefill (in-flight serving, onnxruntime target): a prompt's chunks extend its
uncompressed cache one after another, then the method selects over the whole prompt exactly as one prefill does.

`chunk.onnx` runs the next S tokens of one prompt (batch 1) over the tokens before them:
  in:  input_ids, position_ids [1, S] int64 (the chunk and its absolute positions);
       past_length [1] int64: tokens already in the cache (= the chunk's first position);
       past_key_values.{i}.key / .value [1, Hkv, cap, d]: the prompt's uncompressed cache, slot = position
  out: logits [1, V] f32 at the chunk's last token (the first generated token's, after the last chunk);
       present.{i}.key / .value: the same buffers (bind them as both: GroupQueryAttention writes the chunk in place);
       window_queries.{i} [1, min(w, S), H*d] (methods with a window w): the chunk's last rotated queries
q and k are rotated outside the attention op with the prefill's own nodes, so every chunk computes what the whole
prefill computes for its rows.

`mixed.onnx` (exporter/onnx/mixed.py) runs a chunk together with the decode of the running sequences.

`select.onnx` (compressing methods; no weights) runs the method's per-layer selection once, after the last chunk:
  in:  past_key_values.{i}.key / .value [1, Hkv, q, d]: the whole prompt's cache (q = the prompt's length);
       window_queries.{i} [1, w', H*d]: the last chunk's (it holds the prompt's last w tokens: the scheduler keeps
       the last chunk at least w long)
  out: present.{i}.key / .value [1, Hc, n_i, d], kept_indices.{i} [1, Hc, n_i], kv_lengths.{i} [1]: what the
       prefill graph outputs, with no decode slots behind the kept tokens.
The queries are zero rows before the window: every method that chunks (`KVPolicy.chunked_prefill`) reads only the
window's rows, so its graph hook, budgets and kept sets are the prefill's own.
"""

from __future__ import annotations

import onnx
from onnx import TensorProto, helper

from exporter.onnx.layers import INT_MAX, GraphConfig, Layers
from exporter.onnx.mixed import MIXED, build_mixed
from exporter.onnx.model import make_model
from exporter.onnx.prefill import PrefillGraph
from exporter.onnx.targets import TARGETS
from methods import KVPolicy
from methods.backends import SLOTS
from trt_plugins.onnx_graph import GraphBuilder

CHUNK, SELECT = "chunk.onnx", "select.onnx"


def chunk_graph_names(policy: KVPolicy, target: str) -> list[str]:
    """The chunked-prefill graphs an engine gets: those of an in-flight engine whose method can chunk exactly."""
    if not TARGETS[target].in_place_decode or policy.why_not(SLOTS) is not None or not policy.chunked_prefill:
        return []
    return [CHUNK, MIXED, SELECT] if policy.compresses else [CHUNK, MIXED]


def _cache_inputs(cfg: GraphConfig, layer: int, length: str) -> list:
    s = cfg.spec
    shape = [1, s.num_kv_heads, length, s.head_dim]
    return [helper.make_tensor_value_info(f"past_key_values.{layer}.{part}", cfg.onnx_dtype, shape)
            for part in ("key", "value")]


def build_chunk(cfg: GraphConfig, initializers: list[onnx.TensorProto]) -> onnx.ModelProto:
    s, target = cfg.spec, TARGETS[cfg.target]
    g = GraphBuilder()
    lay = Layers(g, cfg, target)
    window = cfg.policy.window if cfg.policy.compresses else 0
    inputs = [helper.make_tensor_value_info(n, TensorProto.INT64, [1, "chunk_len"])
              for n in ("input_ids", "position_ids")]
    inputs.append(helper.make_tensor_value_info("past_length", TensorProto.INT64, [1]))
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, s.vocab_size])]
    x = g.op("Gather", "model.embed_tokens.weight", "input_ids", axis=0)  # [1, S, hidden]
    cos, sin = lay.rope_tables("position_ids")

    def attend(layer: int, h: str) -> str:
        q, k, v = lay.qkv(h, layer, cos, sin)  # [1, S, H*d], [1, S, Hkv*d] x 2, q and k rotated
        if window:
            name = f"window_queries.{layer}"
            g.op("Identity", g.slice(q, g.const([-window]), g.const([INT_MAX]), axis=1), outputs=[name])
            outputs.append(helper.make_tensor_value_info(name, cfg.onnx_dtype, [1, f"window_len_{layer}",
                                                                                 s.num_heads * s.head_dim]))
        inputs.extend(_cache_inputs(cfg, layer, f"capacity_{layer}"))
        present = (f"present.{layer}.key", f"present.{layer}.value")
        outputs.extend(helper.make_tensor_value_info(name, cfg.onnx_dtype,
                                                     [1, s.num_kv_heads, f"capacity_{layer}", s.head_dim])
                       for name in present)
        return target.chunk_attention(lay, q, k, v, f"past_key_values.{layer}.key", f"past_key_values.{layer}.value",
                                      "past_length", present)

    lay.logits(lay.decoder(x, attend))
    return make_model(g, cfg, "pkv_chunk", inputs, outputs, initializers)


def build_select(cfg: GraphConfig, initializers: list[onnx.TensorProto]) -> onnx.ModelProto:
    """No weights: `initializers` is not used (the builder signature is the other graphs')."""
    pol, s, target = cfg.policy, cfg.spec, TARGETS[cfg.target]
    g = GraphBuilder()
    lay = Layers(g, cfg, target)
    first = "past_key_values.0.key"
    q = g.dim(first, 2)  # [1] the prompt's length: every slot of the cache is a prompt token
    pg = PrefillGraph(lay, q, g.const([0]))
    pg.outputs = []  # the logits came from the last chunk
    inputs = []
    pol.graph_begin(pg)
    for layer in range(s.num_layers):
        inputs.extend(_cache_inputs(cfg, layer, "prompt_len"))
        name = f"window_queries.{layer}"
        inputs.append(helper.make_tensor_value_info(name, cfg.onnx_dtype, [1, f"window_len_{layer}",
                                                                           s.num_heads * s.head_dim]))
        before = g.op("Sub", q, g.dim(name, 1))  # rows before the window: zeros, which no chunking method reads
        queries = g.op("Pad", name, g.concat(g.const([0]), before, g.const([0, 0, 0, 0])))  # [1, q, H*d]
        cache = pol.graph_layer(pg, layer, queries, f"past_key_values.{layer}.key",
                                f"past_key_values.{layer}.value")
        if cache is not None:
            pg.emit(layer, *cache)
    pol.graph_end(pg)
    return make_model(g, cfg, "pkv_select", inputs, pg.outputs, [], pol.graph_functions(s, target))


BUILDERS = {CHUNK: build_chunk, SELECT: build_select, MIXED: build_mixed}
