"""KVzip inside the prefill graph: the reconstruction pass (an ONNX `Loop` over chunks of the context) and the
one top-k over every layer and head, in the op semantics of trt_plugins.kvzip_select.

The prefill's first pass kept every layer's whole context cache; this module turns those caches into the
compressed ones (methods.kvzip.KVzipPolicy.graph_end). Only the onnxruntime target builds it: the reconstruction
attention needs its probabilities (explicit MatMul + Softmax), and no TensorRT plugin implements the global
selection. `lay` is the graph writer's transformer body (exporter.onnx.layers.Layers) on this module's builder.
"""

from __future__ import annotations

import numpy as np
from onnx import TensorProto, helper

from trt_plugins.kvzip_select import FIRST_PROMPT, LATER_PROMPT, SINK_SCORE
from trt_plugins.onnx_graph import GraphBuilder
from trt_plugins.onnx_patterns import F32_MIN, compact, gather_kept, grouped_logits


def _prompt(g: GraphBuilder, pol, prompts: tuple[list[int], list[int]], start: str, i: str, batch: str) -> str:
    """The chunk's repeat prompt [B, p]: the first chunk's, or the later one followed by the previous chunk's last
    `postfix` tokens of input_ids (an `If`: the two differ in length)."""
    branches = []
    for which, ids in enumerate(prompts):
        b = GraphBuilder(g.prefix + f"prompt{which}_")
        out = b.op("Expand", b.const([ids]), b.concat(batch, b.const([len(ids)])))
        if which == 1:
            tail_from = b.op("Max", b.op("Sub", start, b.const([pol.postfix])),
                             b.op("Sub", start, b.const([pol.score_chunk])))
            out = b.op("Concat", out, b.slice("input_ids", tail_from, start, axis=1), axis=1)
        out = b.op("Identity", out)
        branches.append(helper.make_graph(b.nodes, g.fresh(f"prompt{which}"), [],
                                          [helper.make_tensor_value_info(out, TensorProto.INT64, None)]))
    first = g.op("Equal", i, g.const(0))
    return g.op("If", first, then_branch=branches[0], else_branch=branches[1])


def _chunk_bias(g: GraphBuilder, s, n: str, lengths: str, positions: str, part: str) -> str:
    """[B, 1, s, q + s] f32, 0 where input token i may attend to key j, F32_MIN elsewhere: the row's real context
    keys and its own keys up to itself (within the sliding window, if any). A token that takes no part sees no
    context key, so it puts no probability there (what `on_cache * taking_part` does in the spec). Computed once per
    chunk for every layer. s: the model spec."""
    cols = g.op("Range", g.const(0), g.scalar(n), g.const(1))  # [q]
    key_pos = g.op("Concat", g.op("Expand", g.unsqueeze(cols, [0]), g.concat(g.dim(positions, 0), n)), positions,
                   axis=1)  # [B, q + s]
    real = g.op("Less", g.unsqueeze(cols, [0]), g.unsqueeze(lengths, [1]))  # [B, q]
    context_ok = g.op("And", g.unsqueeze(real, [1]), g.unsqueeze(part, [2]))  # [B, s, q]
    own_ok = g.op("Expand", g.const([[[True]]], np.bool_), g.concat(g.op("Shape", positions), g.dim(positions, 1)))
    visible = g.op("And", g.op("Concat", context_ok, own_ok, axis=2),
                   g.op("LessOrEqual", g.unsqueeze(key_pos, [1]), g.unsqueeze(positions, [2])))  # [B, s, q + s]
    if s.sliding_window:
        near = g.op("Less", g.op("Sub", g.unsqueeze(positions, [2]), g.unsqueeze(key_pos, [1])),
                    g.const(s.sliding_window))
        visible = g.op("And", visible, near)
    return g.unsqueeze(g.op("Where", visible, g.const(0.0, np.float32), g.const(F32_MIN, np.float32)), [1])


def _score_bias(g: GraphBuilder, n_sinks: str, lengths: str, start: str, end: str, part: str) -> str:
    """[B, 1, s, ns + n + s] f32 for the official score's softmax: 0 where input token i may see key j (the row's
    real sink keys, the real keys of the slice [start, end) this chunk repeats, its own input up to itself),
    F32_MIN elsewhere (trt_plugins.kvzip_select.chunk_scores). Computed once per chunk for every layer."""
    cols = g.op("Concat", g.op("Range", g.const(0), g.scalar(n_sinks), g.const(1)),
                g.op("Range", g.scalar(start), g.scalar(end), g.const(1)), axis=0)  # [ns + n] context positions
    b, s = g.dim(part, 0), g.dim(part, 1)
    real = g.op("Less", g.unsqueeze(cols, [0]), g.unsqueeze(lengths, [1]))  # [B, ns + n]
    real = g.op("Expand", g.unsqueeze(real, [1]), g.concat(b, s, g.dim(cols, 0)))  # [B, s, ns + n]
    j = g.op("Range", g.const(0), g.scalar(s), g.const(1))
    causal = g.op("LessOrEqual", g.unsqueeze(j, [0]), g.unsqueeze(j, [1]))  # [s, s]: key j' <= row j
    causal = g.op("Expand", g.unsqueeze(causal, [0]), g.concat(b, s, s))
    visible = g.op("Concat", real, causal, axis=2)  # [B, s, ns + n + s]
    return g.unsqueeze(g.op("Where", visible, g.const(0.0, np.float32), g.const(F32_MIN, np.float32)), [1])


def _attend(lay, h: str, layer: int, rope: tuple[str, str], cache: tuple[str, str], n: str, bias: str,
            span: dict[str, str], best: str) -> tuple[str, str]:
    """One layer of the reconstruction: h [B, s, hidden] -> (attention output [B, s, H*d], new best scores
    [B, Hkv, q]). cache: the layer's context K/V [B, Hkv, q, d]; n: q as [1]; bias: `_chunk_bias`; span: the
    chunk's `start`, `end` (the slice it repeats, [1]), `sinks` (ns, [1]), `bias` (`_score_bias`), `part`
    ([B, 1, s, 1] f32). The forward's five passes over [B, H, s, q + s] scores dominate; the official score's
    softmax runs over [B, H, s, ns + n + s] only."""
    g, s = lay.g, lay.s
    hkv, heads, d = s.num_kv_heads, s.num_heads, s.head_dim
    q, k, v = lay.qkv(h, layer, *rope)
    q4 = g.op("Mul", g.op("Cast", lay.to_heads(q, heads), to=TensorProto.FLOAT), g.const(d**-0.5, np.float32))
    own_k = lay.to_heads(k, hkv)
    keys = g.op("Cast", g.op("Concat", cache[0], own_k, axis=2), to=TensorProto.FLOAT)
    values = g.op("Cast", g.op("Concat", cache[1], lay.to_heads(v, hkv), axis=2), to=TensorProto.FLOAT)
    logits = grouped_logits(g, q4, keys, heads, hkv, d, scale=False)  # [B, H, s, q + s] (q4 is scaled)
    logits = g.op("Add", logits, bias)
    probs = g.op("Softmax", logits, axis=-1)
    out = g.op("MatMul", g.reshape(probs, g.const([0, hkv, -1, 0])), values)  # [B, Hkv, g * s, d]
    out = g.op("Cast", g.reshape(out, g.const([0, heads, -1, d])), to=lay.cfg.onnx_dtype)
    out = g.reshape(g.op("Transpose", out, perm=[0, 2, 1, 3]), g.const([0, 0, heads * d]))
    # The official score: sinks + the repeated slice + the chunk's own keys.
    start, end, ns = span["start"], span["end"], span["sinks"]
    score_keys = g.op("Cast", g.op("Concat", g.slice(cache[0], g.const([0]), ns, axis=2),
                                   g.slice(cache[0], start, end, axis=2), own_k, axis=2), to=TensorProto.FLOAT)
    slog = grouped_logits(g, q4, score_keys, heads, hkv, d, scale=False)  # [B, H, s, ns + n + s]
    sprobs = g.op("Softmax", g.op("Add", slog, span["bias"]), axis=-1)
    per_head = g.op("ReduceMax", g.op("Mul", sprobs, span["part"]), g.const([2]), keepdims=0)  # [B, H, ns + n + s]
    width = g.op("Sub", end, start)
    per_head = g.slice(per_head, ns, g.op("Add", ns, width), axis=2)  # [B, H, n]: the slice's tokens
    grouped = g.op("ReduceMax", g.reshape(per_head, g.concat(g.const([0, hkv, heads // hkv]), width)), g.const([2]),
                   keepdims=0)  # [B, Hkv, n]
    full = g.op("Pad", grouped, g.concat(g.const([0, 0]), start, g.const([0, 0]), g.op("Sub", n, end)))
    return out, g.op("Max", best, full)  # [B, Hkv, q]: the chunks' slices are disjoint


def repeat_prompts(tokenizer) -> tuple[tuple[list[int], list[int]], int]:
    """KVzip's repeat prompts (first chunk, later chunks) in this model's tokens, and its pad id."""
    prompts = tuple(tokenizer(p, add_special_tokens=False)["input_ids"] for p in (FIRST_PROMPT, LATER_PROMPT))
    return prompts, tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0


def reconstruction_scores(lay, pol, caches: list[tuple[str, str]], lengths: str) -> list[str]:
    """Every layer's KVzip scores [B, Hkv, q] f32 from a Loop over the context's chunks (right-padded input_ids).
    caches: every layer's whole context K/V [B, Hkv, q, d]; lengths [B]."""
    g, s = lay.g, lay.s
    prompts, pad_id = repeat_prompts(lay.cfg.tokenizer())
    num_layers = s.num_layers
    q = g.dim("input_ids", 1)
    rest = g.op("Sub", q, g.const([pol.sinks]))  # the context after the sinks ("system prompt")
    chunks = g.op("Max", g.op("Div", g.op("Add", rest, g.const([pol.score_chunk - 1])), g.const([pol.score_chunk])),
                  g.const([1]))
    zeros = g.op("ConstantOfShape", g.concat(g.dim("input_ids", 0), g.const([s.num_kv_heads]), q),
                 value=helper.make_tensor("zero", TensorProto.FLOAT, [1], [0.0]))
    body = lay.on(GraphBuilder(g.prefix + "rec_"))
    b = body.g
    i = b.unsqueeze("rec_i", [0])
    start = b.op("Min", b.op("Add", b.op("Mul", i, b.const([pol.score_chunk])), b.const([pol.sinks])), q)
    end = b.op("Min", b.op("Add", start, b.const([pol.score_chunk])), q)
    batch = b.dim("input_ids", 0)
    prompt = _prompt(b, pol, prompts, start, i, batch)
    ids = b.op("Concat", prompt, b.slice("input_ids", start, end, axis=1), axis=1)  # [B, s]
    j = b.unsqueeze(b.op("Range", b.const(0), b.scalar(b.dim(ids, 1)), b.const(1)), [0])  # [1, s]
    row_len = b.unsqueeze(lengths, [1])  # [B, 1]
    in_context = b.op("Less", b.op("Sub", b.op("Add", start, j), b.dim(prompt, 1)), row_len)
    part = b.op("And", in_context, b.op("Less", start, row_len))  # [B, s]
    ids = b.op("Where", part, ids, b.const(pad_id))
    positions = b.op("Add", row_len, j)  # [B, s]
    rope = body.rope_tables(positions)
    bias = _chunk_bias(b, s, q, lengths, positions, part)
    n_sinks = b.op("Min", b.const([pol.sinks]), q)
    span = {"start": start, "end": end, "sinks": n_sinks, "bias": _score_bias(b, n_sinks, lengths, start, end, part),
            "part": b.unsqueeze(b.op("Cast", part, to=TensorProto.FLOAT), [1, 3])}
    x = b.op("Gather", "model.embed_tokens.weight", ids, axis=0)
    best = [f"rec_best_{layer}" for layer in range(num_layers)]
    new_best = []

    def attend(layer: int, h: str) -> str:
        attn, scores = _attend(body, h, layer, rope, caches[layer], q, bias, span, best[layer])
        new_best.append(scores)
        return attn

    body.decoder(x, attend, to_last_attention=True)  # nothing reads on after the last layer's attention
    b.op("Identity", "rec_cond", outputs=["rec_cond_out"])
    outs = [b.op("Identity", n, outputs=[f"rec_best_out_{layer}"]) for layer, n in enumerate(new_best)]
    graph = helper.make_graph(
        b.nodes, g.fresh("reconstruction"),
        [helper.make_tensor_value_info("rec_i", TensorProto.INT64, []),
         helper.make_tensor_value_info("rec_cond", TensorProto.BOOL, []),
         *[helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in best]],
        [helper.make_tensor_value_info("rec_cond_out", TensorProto.BOOL, []),
         *[helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in outs]])
    result = g.op("Loop", g.scalar(chunks), g.const(True, np.bool_), *[zeros] * num_layers, body=graph,
                  outputs=num_layers)
    return result if isinstance(result, list) else [result]


def global_select(lay, pol, scores: list[str], caches: list[tuple[str, str]], lengths: str
                  ) -> list[tuple[str, str, str]]:
    """The top min(C, length) * L * Hkv pairs of every row over all layers and heads -> per layer (kept [B, Hkv, n_l],
    K, V [B, Hkv, n_l, d]): each head's picks compact and ascending, -1 and zeros after them."""
    g, s = lay.g, lay.s
    num_layers, hkv, d = s.num_layers, s.num_kv_heads, s.head_dim
    q = g.dim("attention_mask", 1)  # the prefill's and a shared prefill's selection graph's (no input_ids there)
    pos = g.op("Range", g.const(0), g.scalar(q), g.const(1))  # [q]
    flat = g.op("Concat", *[g.unsqueeze(x, [1]) for x in scores], axis=1)  # [B, L, Hkv, q]
    flat = g.op("Where", g.op("Less", pos, g.const(pol.sinks)), g.const(SINK_SCORE, np.float32), flat)
    real = g.unsqueeze(g.op("Less", g.unsqueeze(pos, [0]), g.unsqueeze(lengths, [1])), [1, 2])  # [B, 1, 1, q]
    flat = g.reshape(g.op("Where", real, flat, g.const(-1.0, np.float32)), g.const([0, -1]))  # [B, L * Hkv * q]
    budgets = g.op("Mul", g.op("Min", lengths, g.const(pol.kv_budget)), g.const(num_layers * hkv))  # [B]
    k = g.op("ReduceMax", budgets, keepdims=1)
    _, order = g.op("TopK", flat, k, outputs=2, axis=-1, largest=1, sorted=1)  # [B, k] by rank, ties lower first
    used = g.op("Less", g.unsqueeze(g.op("Range", g.const(0), g.scalar(k), g.const(1)), [0]),
                g.unsqueeze(budgets, [1]))  # [B, k]
    keep = g.op("ScatterElements", g.op("ConstantOfShape", g.op("Shape", flat),
                                         value=helper.make_tensor("zero", TensorProto.INT64, [1], [0])),
                order, g.op("Cast", used, to=TensorProto.INT64), axis=1)
    keep = g.reshape(keep, g.concat(g.dim(flat, 0), g.const([num_layers, hkv]), q))  # [B, L, Hkv, q] 0/1
    sentinel = g.op("Cast", q, to=TensorProto.FLOAT)
    out = []
    for layer in range(num_layers):
        held = g.op("Squeeze", g.slice(keep, g.const([layer]), g.const([layer + 1]), axis=1), g.const([1]))
        n = g.reshape(g.op("ReduceMax", g.op("ReduceSum", held, g.const([2]), keepdims=0), keepdims=1),
                      g.const([1]))  # the layer's longest head
        picks = g.op("Where", g.op("Cast", held, to=TensorProto.BOOL), g.op("Cast", pos, to=TensorProto.FLOAT),
                     sentinel)  # [B, Hkv, q]
        kept = compact(g, picks, n, sentinel)  # [B, Hkv, n_l]
        out.append((kept, *gather_kept(g, kept, list(caches[layer]), d)))
    return out

