"""The prefill graph: the whole prompt -> last-token logits + every layer's compressed cache, ready for decode.

I/O (B = batch, q = padded prompt length, rows right-padded; Hc = cache heads: Hkv, or H for query-head):
  in:  input_ids, attention_mask, position_ids [B, q] int64 (real tokens first in every row);
       reserve_tokens [1] int64: decode slots to allocate behind every layer's cache
  out: logits [B, V] f32 at each row's last real token; per layer i:
       present.{i}.key / .value [B, Hc, n_i + reserve, d]: the kept tokens of every row first (compact), zeros
           after them: the buffer decode updates in place;
       kept_indices.{i} [B, Hc, n_i] int64: prompt position of each kept token (0 = first), -1 = unused slot;
       kv_lengths.{i} [B] int64: valid cached tokens per row.
Attention is the target's (no [q, q] tensor on either target's long-context path); the selection is one
`PyramidKVSelect` / `StreamingLLMSelect` node per layer in an `If` that keeps everything when every prompt is
shorter than the budget.
"""

from __future__ import annotations

import onnx
from onnx import TensorProto, helper

from exporter.onnx.budget import selected_counts
from exporter.onnx.kvzip import KVZIP_PREFIX, global_select, reconstruction_scores
from exporter.onnx.layers import GraphConfig, Layers
from exporter.onnx.pyramidinfer import pyramidinfer_decoder
from exporter.onnx.targets import TARGETS
from trt_plugins.onnx_graph import CUSTOM_DOMAIN, IR_VERSION, GraphBuilder


def _keep_all(g: GraphBuilder, lay: Layers, k4: str, v4: str, lengths: str, hc: int):
    """(kept, K, V) when nothing is compressed: every real token, in place (rows are already compact)."""
    s = lay.s
    b, q = g.dim(k4, 0), g.dim(k4, 2)
    pos = g.unsqueeze(g.op("Range", g.const(0), g.scalar(q), g.const(1)), [0])  # [1, q]
    real = g.op("Less", pos, g.unsqueeze(lengths, [1]))  # [B, q]
    idx = g.op("Where", real, pos, g.const(-1))
    idx = g.op("Expand", g.unsqueeze(idx, [1]), g.concat(b, g.const([hc]), q))  # [B, Hc, q]
    if hc != s.num_kv_heads:  # query-head caches: every query head reads its KV head
        group = hc // s.num_kv_heads
        shape = g.concat(b, g.const([s.num_kv_heads, group]), q, g.const([s.head_dim]))
        k4 = g.reshape(g.op("Expand", g.unsqueeze(k4, [2]), shape), g.const([0, hc, -1, s.head_dim]))
        v4 = g.reshape(g.op("Expand", g.unsqueeze(v4, [2]), shape), g.const([0, hc, -1, s.head_dim]))
    used = g.unsqueeze(g.unsqueeze(real, [1]), [3])  # [B, 1, q, 1]
    zero = g.const(0.0, lay.cfg.np_dtype)
    return idx, g.op("Where", used, k4, zero), g.op("Where", used, v4, zero)


def _select(g: GraphBuilder, lay: Layers, layer: int, queries: str, k4: str, v4: str, lengths: str, selected: str,
            shared: dict):
    """The selection node (op semantics of trt_plugins.pyramidkv_select): (kept, K, V[, chunk scores]). The
    tensorrt target's node also names its plugin and carries what the plugin needs (shapes, static width) and the
    scores output. `shared` maps a ChunkKV group's first layer to its chunk scores (index reuse)."""
    pol, s = lay.cfg.policy, lay.s
    if pol.name == "chunkkv":
        source = pol.scores_from(layer)
        if source != layer:
            return g.op("ChunkKVGather", shared[source], k4, v4, lengths, selected, outputs=3, domain=CUSTOM_DOMAIN,
                        window=pol.window, chunk_size=pol.chunk_size)
        q4 = g.reshape(queries, g.const([0, 0, s.num_heads, s.head_dim]))
        return g.op("ChunkKVSelect", q4, k4, v4, lengths, selected, outputs=4, domain=CUSTOM_DOMAIN,
                    window=pol.window, chunk_size=pol.chunk_size, kernel=pol.kernel, pooling=pol.pooling)
    attrs = lay.target.select_attributes()
    outputs = 3
    if attrs:
        attrs |= {"num_kv_heads": s.num_kv_heads, "head_dim": s.head_dim, "max_selected": lay.cfg.max_selected(layer)}
        outputs = 4
    if pol.name == "streamingllm":
        return g.op("StreamingLLMSelect", k4, v4, lengths, selected, outputs=outputs, domain=CUSTOM_DOMAIN,
                    window=pol.window, sinks=pol.sinks, **attrs)[:3]
    if attrs:
        attrs["num_heads"] = s.num_heads
    q4 = g.reshape(queries, g.const([0, 0, s.num_heads, s.head_dim]))  # [B, q, H, d]: a view, no copy
    return g.op("PyramidKVSelect", q4, k4, v4, lengths, selected, outputs=outputs, domain=CUSTOM_DOMAIN,
                window=pol.window, kernel=pol.kernel, pooling=pol.pooling_op(), granularity=pol.granularity,
                observe=pol.observe, **attrs)[:3]


def _branch(builder: GraphBuilder, outputs: list[str], name: str, dtype: int) -> onnx.GraphProto:
    # A branch output must be produced inside the branch (not an outer-scope value): wrap in Identity.
    outs = [builder.op("Identity", o) for o in outputs]
    types = (TensorProto.INT64, dtype, dtype, TensorProto.FLOAT)[: len(outs)]
    infos = [helper.make_tensor_value_info(o, t, None) for o, t in zip(outs, types, strict=True)]
    return helper.make_graph(builder.nodes, name, [], infos)


def _no_chunk_scores(g: GraphBuilder, k4: str, chunk_size: int) -> str:
    """The keep-all branch's stand-in for a ChunkKV group leader's scores: zeros [B, ceil(q / c)]."""
    n = g.op("Div", g.op("Add", g.dim(k4, 2), g.const([chunk_size - 1])), g.const([chunk_size]))
    return g.op("ConstantOfShape", g.concat(g.dim(k4, 0), n),
                value=helper.make_tensor("zero", TensorProto.FLOAT, [1], [0.0]))


def build_prefill(cfg: GraphConfig, initializers: list[onnx.TensorProto]) -> onnx.ModelProto:
    s, pol = cfg.spec, cfg.policy
    target = TARGETS[cfg.target]
    g = GraphBuilder()
    lay = Layers(g, cfg, target)
    hc = cfg.cache_heads
    x = g.op("Gather", "model.embed_tokens.weight", "input_ids", axis=0)  # [B, q, hidden]
    cos, sin = (None, None) if pol.drops_tokens else lay.rope_tables("position_ids")
    lengths = g.op("ReduceSum", "attention_mask", g.const([1]), keepdims=0)  # [B] real prompt lengths
    per_layer = pol.compresses and not pol.global_selection and not pol.drops_tokens
    budgets = selected_counts(g, pol, s.num_layers, lengths) if per_layer else None
    reserve = g.op("Max", "reserve_tokens", g.const([0]))
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", s.vocab_size])]
    shared: dict[int, str] = {}  # ChunkKV: group leader layer -> its chunk scores

    def emit(layer: int, kept: str, kk: str, vv: str) -> None:
        """The layer's outputs: kept indices, the cache padded with the decode slots, valid slots per row."""
        g.op("Identity", kept, outputs=[f"kept_indices.{layer}"])
        pads = g.concat(g.const([0, 0, 0, 0, 0, 0]), reserve, g.const([0]))
        g.op("Pad", kk, pads, outputs=[f"present.{layer}.key"])
        g.op("Pad", vv, pads, outputs=[f"present.{layer}.value"])
        # A row's longest head: the slot its next token goes to (KVzip's heads hold different counts).
        valid = g.op("ReduceSum", g.op("Cast", g.op("GreaterOrEqual", kept, g.const(0)), to=TensorProto.INT64),
                     g.const([2]), keepdims=0)  # [B, Hc]
        g.op("ReduceMax", valid, g.const([1]), keepdims=0, outputs=[f"kv_lengths.{layer}"])
        cache = ["batch", hc, f"present_len_{layer}", s.head_dim]
        outputs.extend([helper.make_tensor_value_info(f"present.{layer}.key", cfg.onnx_dtype, cache),
                        helper.make_tensor_value_info(f"present.{layer}.value", cfg.onnx_dtype, cache),
                        helper.make_tensor_value_info(f"kept_indices.{layer}", TensorProto.INT64,
                                                      ["batch", hc, f"kept_len_{layer}"]),
                        helper.make_tensor_value_info(f"kv_lengths.{layer}", TensorProto.INT64, ["batch"])])

    whole: list[tuple[str, str]] = []  # KVzip: every layer's whole context cache, selected after the decoder

    def attend(layer: int, h: str) -> str:
        q, k, v = lay.qkv(h, layer, cos, sin)  # RoPE here: the selection needs the rotated queries too
        out, k4, v4 = target.prefill_attention(lay, q, k, v, lengths)  # K/V: [B, Hkv, q, d] post-RoPE
        if budgets is None:
            kept, kk, vv = _keep_all(g, lay, k4, v4, lengths, hc)
            if pol.global_selection:
                whole.append((kk, vv))
                return out
        else:
            keep_all = GraphBuilder(g.prefix + f"keepall{layer}_")
            select = GraphBuilder(g.prefix + f"select{layer}_")
            kept_all = list(_keep_all(keep_all, Layers(keep_all, cfg, target), k4, v4, lengths, hc))
            chosen = list(_select(select, Layers(select, cfg, target), layer, q, k4, v4, lengths, budgets[layer],
                                  shared))
            if len(chosen) == 4:  # a ChunkKV group leader also hands its chunk scores to the group
                kept_all.append(_no_chunk_scores(keep_all, k4, pol.chunk_size))
            then = _branch(keep_all, kept_all, g.fresh("keep_all"), cfg.onnx_dtype)
            other = _branch(select, chosen, g.fresh("select"), cfg.onnx_dtype)
            short = g.op("Less", g.op("ReduceMax", lengths, keepdims=1), g.const([pol.kv_budget]))
            kept, kk, vv, *scores = g.op("If", g.scalar(short), outputs=len(chosen), then_branch=then,
                                         else_branch=other)
            if scores:
                shared[layer] = scores[0]
        emit(layer, kept, kk, vv)
        return out

    if pol.drops_tokens:  # PyramidInfer: each layer passes only its pivotal tokens on to the next
        h, last = pyramidinfer_decoder(g, lay, cfg, target, x, lengths, emit)
        lay.logits(h, last)
        outputs.extend([helper.make_tensor_value_info(f"recent_rows.{i}", TensorProto.FLOAT,
                                                      ["batch", "recent_rows", f"kept_len_{i}"])
                        for i in range(s.num_layers)])
        outputs.append(helper.make_tensor_value_info("recent_lengths", TensorProto.INT64, ["batch"]))
    else:
        h = lay.decoder(x, attend)
        lay.logits(h, g.op("Sub", lengths, g.const(1)))
    if whole:  # KVzip: reconstruct the context to score every pair, then one selection over all layers
        kz = GraphBuilder(g.prefix + KVZIP_PREFIX)  # its own node names: profilers can tell its cost apart
        scores = reconstruction_scores(kz, cfg, target, whole, lengths, cfg.repeat_prompts, cfg.pad_id)
        picked = global_select(kz, cfg, scores, whole, lengths)
        g.nodes.extend(kz.nodes)
        for layer, (kept, kk, vv) in enumerate(picked):
            emit(layer, kept, kk, vv)
    inputs = [helper.make_tensor_value_info(n, TensorProto.INT64, ["batch", "prompt_len"])
              for n in ("input_ids", "attention_mask", "position_ids")]
    inputs.append(helper.make_tensor_value_info("reserve_tokens", TensorProto.INT64, [1]))
    return make_model(g, cfg, "pkv_prefill", inputs, outputs, initializers, with_select=pol.compresses)


def make_model(g: GraphBuilder, cfg: GraphConfig, name: str, inputs, outputs, initializers,
               with_select: bool) -> onnx.ModelProto:
    from trt_plugins.onnx_select import (
        chunkkv_gather_function,
        chunkkv_select_function,
        pyramidkv_select_function,
        streaming_select_function,
    )

    s, pol = cfg.spec, cfg.policy
    target = TARGETS[cfg.target]
    functions = []
    if with_select and not pol.global_selection and not pol.drops_tokens:  # KVzip's, PyramidInfer's: inline ops
        scores = bool(target.select_attributes())  # the plugin's 4th output: the function has it too
        if pol.name == "chunkkv":
            functions.append(chunkkv_select_function(pol.window, pol.chunk_size, s.num_heads, s.num_kv_heads,
                                                     s.head_dim, pol.kernel, pol.pooling))
            if pol.reuse > 1:
                functions.append(chunkkv_gather_function(pol.window, pol.chunk_size, s.num_kv_heads, s.head_dim))
        elif pol.name == "streamingllm":
            functions.append(streaming_select_function(pol.window, pol.sinks, s.num_kv_heads, s.head_dim, scores))
        else:
            functions.append(pyramidkv_select_function(pol.window, pol.kernel, pol.pooling_op(), pol.granularity,
                                                       s.num_heads, s.num_kv_heads, s.head_dim, pol.observe, scores))
        for f in functions:  # the function body's standard ops come from the graph's opset
            del f.opset_import[:]
            f.opset_import.extend([helper.make_opsetid("", target.opset)])
    graph = helper.make_graph(g.nodes, name, inputs, outputs, initializer=initializers)
    opsets = target.opsets() + [helper.make_opsetid(CUSTOM_DOMAIN, 1)]
    # The lowest IR version the opsets allow: onnxruntime 1.31 reads IR <= 13, onnx 1.23 would write 14.
    ir_version = max(IR_VERSION, helper.find_min_ir_version_for([helper.make_opsetid("", target.opset)]))
    return helper.make_model(graph, opset_imports=opsets, ir_version=ir_version, functions=functions,
                             producer_name="pkv-export")
