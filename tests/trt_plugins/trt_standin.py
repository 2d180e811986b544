"""A stand-in for the parts of `tensorrt` / `tensorrt.plugin` (10.15) that `trt_plugins.trt_plugin` touches while
registering its plugins, so the decorated functions can be inspected and called on a machine without TensorRT.

It carries TensorRT's behaviour where the plugin code has failed before, not a pass: the decorators only record
the functions (the tests then apply TensorRT's documented checks to what was recorded), and the symbolic integers
`Sym` have `+`, `-`, `*`, `//` with an int or another `Sym` on the right, and no reflected operators, like
`tensorrt.plugin.SymIntExpr` / `ShapeExpr` (so `int * expr` raises TypeError as it does there).
"""

from __future__ import annotations

import types


class Sym:
    """A symbolic int32 that evaluates eagerly (its `value`), with only the operators TensorRT's SymIntExpr has."""

    def __init__(self, value):
        self.value = value.value if isinstance(value, Sym) else int(value)

    def _other(self, other) -> int:
        if isinstance(other, Sym):
            return other.value
        if isinstance(other, int):
            return other
        return NotImplemented

    def __add__(self, other):
        o = self._other(other)
        return NotImplemented if o is NotImplemented else Sym(self.value + o)

    def __sub__(self, other):
        o = self._other(other)
        return NotImplemented if o is NotImplemented else Sym(self.value - o)

    def __mul__(self, other):
        o = self._other(other)
        return NotImplemented if o is NotImplemented else Sym(self.value * o)

    def __floordiv__(self, other):
        o = self._other(other)
        return NotImplemented if o is NotImplemented else Sym(self.value // o)

    def __repr__(self) -> str:
        return f"Sym({self.value})"


def value(x) -> int:
    """The int behind an int or a Sym (anything else is a bug in the code under test)."""
    if isinstance(x, Sym):
        return x.value
    if isinstance(x, int):
        return x
    raise TypeError(f"not an int32 expression: {x!r}")


class TensorDesc:
    def __init__(self, shape=None, dtype=None):
        self.shape_expr = tuple(Sym(s) for s in shape) if shape is not None else None
        self.dtype = dtype


class SymExprs:
    pass


class SymIntExprs(SymExprs):
    def __init__(self, exprs):
        self.exprs = list(exprs)

    @classmethod
    def from_tuple(cls, exprs):
        return cls(exprs)


class SymInt32(Sym):
    pass


class KernelLaunchParams:
    _FIELDS = ("grid_x", "grid_y", "grid_z", "block_x", "block_y", "block_z", "shared_mem")

    def __init__(self):
        for name in self._FIELDS:
            object.__setattr__(self, name, SymInt32(0 if name == "shared_mem" else 1))

    def __setattr__(self, name, val):
        if name not in self._FIELDS:
            raise AttributeError(f"KernelLaunchParams object has no attribute '{name}'")
        object.__setattr__(self, name, SymInt32(val))


def make_modules() -> tuple[types.ModuleType, types.ModuleType, dict]:
    """(tensorrt, tensorrt.plugin, recorded) where recorded[(plugin name, kind)] is the decorated function."""
    recorded: dict[tuple[str, str], object] = {}
    trt = types.ModuleType("tensorrt")
    trt.__version__ = "10.15-standin"
    trt.QuickPluginCreationRequest = type("QuickPluginCreationRequest", (), {})
    for name in ("float32", "float16", "bfloat16", "int64", "int32"):
        setattr(trt, name, type(name, (), {"name": name})())  # hashable, as tensorrt.DataType members are
    plugin = types.ModuleType("tensorrt.plugin")

    def decorator(kind):
        def outer(name):
            def inner(fn):
                recorded[(name, kind)] = fn
                return fn
            return inner
        return outer

    plugin.register, plugin.impl, plugin.aot_impl = decorator("register"), decorator("impl"), decorator("aot_impl")
    plugin.TensorDesc, plugin.SymExprs, plugin.SymIntExprs = TensorDesc, SymExprs, SymIntExprs
    plugin.SymInt32, plugin.KernelLaunchParams = SymInt32, KernelLaunchParams

    def minimum(a, b):
        if not isinstance(a, Sym) and not isinstance(b, Sym):
            raise ValueError("tensorrt.plugin.min: both arguments are ints")  # as TensorRT's does
        return Sym(min(value(a), value(b)))

    def cdiv(a, b):
        if not isinstance(a, Sym) and not isinstance(b, Sym):
            raise ValueError("tensorrt.plugin.cdiv: both arguments are ints")
        return Sym(-(-value(a) // value(b)))

    def from_shape_expr(shape, dtype):
        desc = TensorDesc(dtype=dtype)
        desc.shape_expr = tuple(shape)
        return desc

    plugin.min, plugin.cdiv, plugin.from_shape_expr = minimum, cdiv, from_shape_expr
    trt.plugin = plugin
    return trt, plugin, recorded
