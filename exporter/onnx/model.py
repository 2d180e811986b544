"""An ONNX model from a written graph: the opsets of its target, the model-local functions its custom nodes call,
and the lowest IR version those opsets allow."""

from __future__ import annotations

import onnx
from onnx import helper

from exporter.onnx.layers import GraphConfig
from exporter.onnx.targets import TARGETS
from trt_plugins.onnx_graph import CUSTOM_DOMAIN, IR_VERSION, GraphBuilder


def make_model(g: GraphBuilder, cfg: GraphConfig, name: str, inputs, outputs, initializers,
               functions: list[onnx.FunctionProto] = ()) -> onnx.ModelProto:
    target = TARGETS[cfg.target]
    functions = list(functions)
    for f in functions:  # the function body's standard ops come from the graph's opset
        del f.opset_import[:]
        f.opset_import.extend([helper.make_opsetid("", target.opset)])
    graph = helper.make_graph(g.nodes, name, inputs, outputs, initializer=initializers)
    opsets = target.opsets() + [helper.make_opsetid(CUSTOM_DOMAIN, 1)]
    # The lowest IR version the opsets allow: onnxruntime 1.31 reads IR <= 13, onnx 1.23 would write 14.
    ir_version = max(IR_VERSION, helper.find_min_ir_version_for([helper.make_opsetid("", target.opset)]))
    return helper.make_model(graph, opset_imports=opsets, ir_version=ir_version, functions=functions,
                             producer_name="pkv-export")
