"""The tensorrt-target graphs as TensorRT's ONNX parser is given them.

TensorRT (10.14+) imports the ONNX `Attention` op as an `IAttention`, which by default must find one fused
kernel; when none fits (fp32, or the tiny presets' head_dim 16) the build fails unless the layer is
decomposable. onnx-tensorrt's Attention importer sets that from a node attribute, `TRT_decomposable` (int,
default 0; read in `onnxOpImporters.cpp`). The attribute is not in the ONNX schema, so onnxruntime and
`onnx.checker` refuse a graph that carries it ("Unrecognized attribute"): the engine's graphs stay standard,
and the build parses a marked copy written next to them (the same external weights file), never shipped.

The same copy is where each selection node becomes the chain of GPU kernels that computes it
(`trt_plugins.trt_chain`): one `pkv` plugin per kernel, since a TensorRT AOT plugin runs one kernel and the
selection is spread over several. The engine's graphs keep the single node and its ONNX function.
"""

from __future__ import annotations

from pathlib import Path

import onnx
from onnx import helper

DECOMPOSABLE = "TRT_decomposable"


def _graphs(model: onnx.ModelProto):
    """Every graph of the model: the main one, subgraphs of If/Loop nodes, and model-local functions' bodies."""
    pending = [model.graph]
    while pending:
        graph = pending.pop()
        yield graph.node
        for node in graph.node:
            pending.extend(a.g for a in node.attribute if a.type == onnx.AttributeProto.GRAPH)
            pending.extend(g for a in node.attribute if a.type == onnx.AttributeProto.GRAPHS for g in a.graphs)
    for function in model.functions:
        yield function.node


def mark_decomposable(model: onnx.ModelProto) -> int:
    """Set TRT_decomposable=1 on every standard-domain Attention node, in place; returns how many."""
    count = 0
    for nodes in _graphs(model):
        for node in nodes:
            if node.op_type == "Attention" and node.domain in ("", "ai.onnx"):
                kept = [a for a in node.attribute if a.name != DECOMPOSABLE]
                del node.attribute[:]
                node.attribute.extend([*kept, helper.make_attribute(DECOMPOSABLE, 1)])
                count += 1
    return count


def parser_input(onnx_path: Path) -> Path:
    """A copy of `onnx_path` with every Attention node decomposable and every selection node expanded into its
    kernel chain, beside it (its external data resolves to the same files); the input TensorRT's parser reads."""
    from trt_plugins.trt_chain import expand_selections

    model = onnx.load(str(onnx_path), load_external_data=False)
    mark_decomposable(model)
    expand_selections(model)
    out = onnx_path.with_name(f"{onnx_path.stem}.tensorrt-parser.onnx")
    onnx.save_model(model, str(out))
    return out
