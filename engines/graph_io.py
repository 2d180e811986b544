"""An onnx engine's manifest against the inputs and outputs its graphs declare, checked when the engine opens.

The manifest's digest proves the manifest was not edited by accident, not that it describes the graphs: one
rewritten with its digest recomputed (num_layers 3 or 8 for a 4-layer engine) made the runner bind names the
graphs do not have (KeyError `kept_indices.4`) or leave inputs unbound (onnxruntime's "Missing Input"). Here every
name the runner binds must exist, each layer's cache must have the manifest's heads and head size, and the graphs
must hold exactly the manifest's layers: otherwise one line, before anything runs.
"""

from __future__ import annotations

import re
from pathlib import Path

from exporter.specs import ModelSpec
from pkv_core.errors import UserInputError

_LAYERED = re.compile(r"^(?:present|kept_indices|kv_lengths|past_key_values|past_lengths|cache_positions)\.(\d+)\b")


def expected_io(num_layers: int, windowed: bool) -> dict[tuple[str, str], list[str]]:
    """(graph, "inputs" | "outputs") -> the names the onnxruntime runner binds (engines/ort_engine.py)."""
    layers = range(num_layers)
    cache = [f"present.{i}.{part}" for i in layers for part in ("key", "value")]
    decode_in = ["input_ids", "position_ids"] + [f"past_key_values.{i}.{part}" for i in layers
                                                 for part in ("key", "value")] + [f"past_lengths.{i}" for i in layers]
    if windowed:
        decode_in += [f"cache_positions.{i}" for i in layers]
    return {
        ("prefill.onnx", "inputs"): ["input_ids", "attention_mask", "position_ids", "reserve_tokens"],
        ("prefill.onnx", "outputs"): ["logits", *cache] + [f"{k}.{i}" for i in layers
                                                          for k in ("kept_indices", "kv_lengths")],
        ("decode.onnx", "inputs"): decode_in,
        ("decode.onnx", "outputs"): ["logits", *cache],
    }


def check_graph_io(directory: Path, spec: ModelSpec, cache_heads: int, windowed: bool, sessions: dict) -> None:
    """`sessions`: {"prefill.onnx": InferenceSession, "decode.onnx": ...}. Refuses, in one line naming the engine,
    a manifest whose layers, cache heads, head size, vocabulary or sliding window the graphs do not have."""
    def fail(why: str) -> UserInputError:
        return UserInputError(f"{directory}: the manifest does not describe the engine's graphs ({why}); rebuild "
                              "the engine instead of editing pkv-engine.json")

    for (graph, kind), names in expected_io(spec.num_layers, windowed).items():
        declared = {a.name: a.shape for a in getattr(sessions[graph], f"get_{kind}")()}
        held = {int(m.group(1)) for n in declared if (m := _LAYERED.match(n))}
        if held and max(held) + 1 != spec.num_layers:
            raise fail(f"it says {spec.num_layers} layers, {graph} has {max(held) + 1}")
        for name in names:
            if name not in declared:
                raise fail(f"{graph} has no {kind[:-1]} '{name}'")
        surplus = [n for n in declared if n.startswith("cache_positions.") and not windowed]
        if surplus:
            raise fail(f"{graph} takes '{surplus[0]}', which the manifest's model and policy do not use")
        for name, shape in declared.items():
            if name.startswith(("present.", "past_key_values.")):
                _dim(fail, graph, name, shape, 1, cache_heads, "cache heads")
                _dim(fail, graph, name, shape, 3, spec.head_dim, "head_dim")
            elif name == "logits":
                _dim(fail, graph, name, shape, -1, spec.vocab_size, "vocab_size")


def _dim(fail, graph: str, name: str, shape: list, axis: int, want: int, what: str) -> None:
    """A static dimension of a declared shape must equal the manifest's number (symbolic ones are not checked)."""
    if len(shape) > (axis if axis >= 0 else -axis - 1) and isinstance(shape[axis], int) and shape[axis] != want:
        raise fail(f"{graph}'s {name} has {shape[axis]} {what}, the manifest says {want}")
