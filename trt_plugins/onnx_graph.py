"""A small helper for writing ONNX graphs and functions by hand with `onnx.helper`.

Hand-written graphs keep the exported interface exactly as specified (names, one symbolic length per layer,
external weights shared by two graphs) without depending on a tracer's choices.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 21
IR_VERSION = 10  # onnxruntime 1.31 reads IR <= 13; onnx 1.23 would write 14 by default
CUSTOM_DOMAIN = "pkv"

NP_TO_ONNX = {np.dtype("float32"): TensorProto.FLOAT, np.dtype("float16"): TensorProto.FLOAT16,
              np.dtype("int64"): TensorProto.INT64, np.dtype("bool"): TensorProto.BOOL}


class GraphBuilder:
    """Collects nodes; every helper returns the name(s) of the new node's output(s)."""

    def __init__(self, prefix: str = ""):
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[TensorProto] = []
        self.prefix = prefix
        self._count = 0

    def fresh(self, hint: str) -> str:
        self._count += 1
        return f"{self.prefix}{hint}_{self._count}"

    def op(self, op_type: str, *inputs: str, outputs: int | Sequence[str] = 1, domain: str = "", **attrs):
        """Add a node. `outputs` is a count (names generated) or explicit names; returns one name or a list."""
        names = list(outputs) if not isinstance(outputs, int) else [self.fresh(op_type) for _ in range(outputs)]
        self.nodes.append(helper.make_node(op_type, list(inputs), names, name=self.fresh(op_type + "_node"),
                                           domain=domain or None, **attrs))
        return names[0] if len(names) == 1 else names

    def const(self, value, dtype=np.int64, name: str | None = None) -> str:
        """A small constant as a Constant node (works inside functions, where initializers do not exist)."""
        array = np.asarray(value, dtype=dtype)
        out = name or self.fresh("const")
        self.nodes.append(helper.make_node("Constant", [], [out], name=self.fresh("Constant_node"),
                                           value=numpy_helper.from_array(array, out)))
        return out

    # Shape helpers (all int64 1-D unless said otherwise).
    def dim(self, tensor: str, axis: int) -> str:
        """Size of `axis` of `tensor` as a [1] int64 tensor."""
        bounds = {"start": axis} if axis == -1 else {"start": axis, "end": axis + 1}
        return self.op("Shape", tensor, **bounds)

    def scalar(self, one_elem: str) -> str:
        return self.op("Squeeze", one_elem, self.const([0]))

    def concat(self, *parts: str, axis: int = 0) -> str:
        return self.op("Concat", *parts, axis=axis)

    def reshape(self, tensor: str, *parts: str) -> str:
        return self.op("Reshape", tensor, self.concat(*parts) if len(parts) > 1 else parts[0])

    def unsqueeze(self, tensor: str, axes: Sequence[int]) -> str:
        return self.op("Unsqueeze", tensor, self.const(list(axes)))

    def slice(self, tensor: str, start: str, end: str, axis: int) -> str:
        return self.op("Slice", tensor, start, end, self.const([axis]))

    def make_function(self, name: str, inputs: list[str], outputs: list[str], attributes: list[str],
                      opset: int = OPSET) -> onnx.FunctionProto:
        return helper.make_function(CUSTOM_DOMAIN, name, inputs, outputs, self.nodes,
                                    [helper.make_opsetid("", opset)], attributes=attributes)
