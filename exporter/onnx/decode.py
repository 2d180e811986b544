"""The decode graph: S new tokens per row (1 while generating; a whole question when a compressed context is
asked something, batch 1) -> logits of the last one, every layer's cache updated in its own buffer.

I/O (per layer i; the buffers come from the prefill's present.{i}.* and stay where they are):
  in:  input_ids, position_ids [B, S] int64 (the tokens and their true absolute positions);
       past_key_values.{i}.key / .value [B, Hc, cap_i, d]: valid slots first;
       past_lengths.{i} [B] int64: valid slots per row before these tokens (they go to the slots after);
       cache_positions.{i} [B, Hc, n_i] int64 (sliding-window models only): the prefill's kept_indices.{i},
           i.e. the absolute position of each kept token, for the window mask
  out: logits [B, V] f32; present.{i}.key / .value [B, Hc, cap_i, d] (onnxruntime target: bind the past
       buffers here too and the op writes the new token in place; no cache is copied per step).
Every layer has its own capacity and lengths, so layers with different budgets decode side by side.
"""

from __future__ import annotations

import onnx
from onnx import TensorProto, helper

from exporter.onnx.layers import GraphConfig, Layers
from exporter.onnx.model import make_model
from exporter.onnx.targets import TARGETS
from trt_plugins.onnx_graph import GraphBuilder


def cache_visible(g: GraphBuilder, lay: Layers, layer: int, past_lengths: str, inputs: list):
    """A function T -> [B, H, S, T] bool (slot t visible to new token i), or to None when every slot of every
    row up to its length is visible. Needed for a sliding window (a slot's token must be within the window of
    token i, by absolute position) and for per-head cache lengths (KVzip: a head's slots after its own count,
    up to the row's longest head, hold nothing)."""
    s = lay.s
    per_head = lay.cfg.policy.per_head_lengths
    if not s.sliding_window and not per_head:  # (evictions that keep every row's slots compact need none)
        return lambda total: None
    name = f"cache_positions.{layer}"
    inputs.append(helper.make_tensor_value_info(name, TensorProto.INT64, ["batch", lay.cfg.cache_heads,
                                                                           f"kept_len_{layer}"]))

    def visible(total: str) -> str:
        n = g.dim(name, 2)
        counts = g.op("ReduceSum", g.op("Cast", g.op("GreaterOrEqual", name, g.const(0)), to=TensorProto.INT64),
                      g.const([2]), keepdims=1)  # [B, Hc, 1] prefill tokens per head
        kept = g.op("ReduceMax", counts, g.const([1]), keepdims=1)  # [B, 1, 1] the row's prefill slots
        head = g.slice(name, g.const([0]), g.op("Min", n, total), axis=2)
        prefill_pos = g.op("Pad", head, g.concat(g.const([0, 0, 0, 0, 0]), g.op("Max", g.op("Sub", total, n),
                                                                              g.const([0]))),
                           g.const(-1))  # [B, Hc, T]
        slots = g.unsqueeze(g.op("Range", g.const(0), g.scalar(total), g.const(1)), [0, 1])  # [1, 1, T]
        in_prefill = g.op("Less", slots, kept)  # [B, 1, T]
        batch, steps = g.dim("position_ids", 0), g.dim("position_ids", 1)
        shape = g.concat(batch, g.const([lay.cfg.cache_heads]), steps, total)
        # A prefill slot is used when it holds a position (a shorter head's tail does not).
        ok = g.op("Expand", g.unsqueeze(g.op("Or", g.op("Not", in_prefill),
                                              g.op("GreaterOrEqual", prefill_pos, g.const(0))), [2]), shape)
        if s.sliding_window:
            first = g.unsqueeze(g.slice("position_ids", g.const([0]), g.const([1]), axis=1), [2])  # [B, 1, 1]
            # Slots after the prefill's tokens hold later tokens: position = first new - (past_length - slot).
            later = g.op("Add", g.op("Sub", first, g.unsqueeze(past_lengths, [1, 2])), slots)
            pos = g.op("Where", in_prefill, prefill_pos, later)  # [B, Hc, T]
            new = g.unsqueeze("position_ids", [1, 3])  # [B, 1, S, 1]
            near = g.op("Less", g.op("Sub", new, g.unsqueeze(pos, [2])), g.const(s.sliding_window))  # [B, Hc, S, T]
            ok = g.op("And", ok, near)
        group = s.num_heads // lay.cfg.cache_heads
        if group > 1:
            grouped = g.concat(batch, g.const([lay.cfg.cache_heads, group]), steps, total)
            ok = g.reshape(g.op("Expand", g.unsqueeze(ok, [2]), grouped),
                           g.concat(batch, g.const([s.num_heads]), steps, total))
        return ok  # [B, H, S, T]

    return visible


def build_decode(cfg: GraphConfig, initializers: list[onnx.TensorProto]) -> onnx.ModelProto:
    s = cfg.spec
    target = TARGETS[cfg.target]
    g = GraphBuilder()
    lay = Layers(g, cfg, target)
    hc = cfg.cache_heads
    x = g.op("Gather", "model.embed_tokens.weight", "input_ids", axis=0)  # [B, 1, hidden]
    cos, sin = (None, None) if target.rotary_in_attention else lay.rope_tables("position_ids")
    inputs = [helper.make_tensor_value_info(n, TensorProto.INT64, ["batch", "new_tokens"])
              for n in ("input_ids", "position_ids")]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", s.vocab_size])]

    def attend(layer: int, h: str) -> str:
        cache = ["batch", hc, f"capacity_{layer}", s.head_dim]
        past = [f"past_key_values.{layer}.key", f"past_key_values.{layer}.value"]
        lengths = f"past_lengths.{layer}"
        inputs.extend([helper.make_tensor_value_info(past[0], cfg.onnx_dtype, cache),
                       helper.make_tensor_value_info(past[1], cfg.onnx_dtype, cache),
                       helper.make_tensor_value_info(lengths, TensorProto.INT64, ["batch"])])
        visible = cache_visible(g, lay, layer, lengths, inputs)
        # The attention op writes the graph outputs itself: an Identity in between would make onnxruntime
        # allocate (and copy) a new cache instead of updating the bound buffer in place.
        present = (f"present.{layer}.key", f"present.{layer}.value")
        out = target.decode_attention(lay, h, layer, (cos, sin), past[0], past[1], lengths, visible, present)
        outputs.extend([helper.make_tensor_value_info(f"present.{layer}.key", cfg.onnx_dtype, cache),
                        helper.make_tensor_value_info(f"present.{layer}.value", cfg.onnx_dtype, cache)])
        outputs.extend(cfg.policy.graph_decode_layer(lay, h, layer, present[0], lengths, visible))
        return out

    h = lay.decoder(x, attend)
    lay.logits(h)
    return make_model(g, cfg, "pkv_decode", inputs, outputs, initializers)
