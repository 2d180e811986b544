"""The TensorRT plugin definitions as TensorRT 10.15's `tensorrt.plugin` validates them (`_validate.py`:
`_parse_register_inputs`, `_parse_register_return`, `_validate_aot_impl`), checked on the functions
`register_plugins()` really decorates, with a stand-in for the tensorrt module (tests/trt_plugins/trt_standin.py).

Each check below is one that TensorRT performs at decoration time or when it asks the AOT implementation for its
kernel; the old plugin code failed the first three (string annotations under `from __future__ import annotations`,
no `aot_impl` return annotation, `int * ShapeExpr` in the launch arguments)."""

import inspect
import os
import sys
import typing

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
pytest.importorskip("triton", reason="the triton package (dev / gpu extras) is not installed")

from tests.trt_plugins import trt_standin  # noqa: E402
from tests.trt_plugins.payload_cases import CASES, HEAD_DIM, HEADS, KV_HEADS  # noqa: E402
from trt_plugins import select_stages as st  # noqa: E402
from trt_plugins import trt_plugin  # noqa: E402

PLUGINS = trt_plugin.plugin_names()


@pytest.fixture(scope="module")
def recorded():
    trt, plugin, recorded = trt_standin.make_modules()
    patch = pytest.MonkeyPatch()
    patch.setitem(sys.modules, "tensorrt", trt)
    patch.setitem(sys.modules, "tensorrt.plugin", plugin)
    patch.setattr(trt_plugin, "_REGISTERED", False)
    trt_plugin.register_plugins()
    yield recorded
    patch.undo()


def test_every_stage_plugin_registers_all_three_functions(recorded):
    assert len(PLUGINS) == len(st.STAGES) == 9
    assert sorted(recorded) == sorted((p, k) for p in PLUGINS for k in ("register", "impl", "aot_impl"))


@pytest.mark.parametrize("kind", ["register", "aot_impl"])
@pytest.mark.parametrize("name", PLUGINS)
def test_annotations_are_real_types_when_the_decorator_runs(recorded, name, kind):
    """TensorRT reads `inspect.signature(fn)` without eval_str and calls issubclass on each annotation."""
    sig = inspect.signature(recorded[(name, kind)])
    for param in sig.parameters.values():
        assert not isinstance(param.annotation, str), f"{param.name}: string annotation {param.annotation!r}"
    assert not isinstance(sig.return_annotation, str)


@pytest.mark.parametrize("name", PLUGINS)
def test_register_signature_as_tensorrt_parses_it(recorded, name):
    stage = next(s for s in st.STAGES if f"pkv::{s.name}" == name)
    sig = inspect.signature(recorded[(name, "register")])
    seen_attribute = False
    for param in sig.parameters.values():
        assert param.annotation is not inspect.Parameter.empty and param.default is inspect.Parameter.empty
        assert param.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD
        if inspect.isclass(param.annotation) and issubclass(param.annotation, trt_standin.TensorDesc):
            assert not seen_attribute, "tensors first, then attributes"
        else:
            seen_attribute = True
            assert param.annotation in (int, float, bytes, bool, str), f"{param.name}: {param.annotation}"
            assert param.name not in ("outputs", "stream", "tactic")
    assert list(sig.parameters) == stage.inputs + stage.attributes
    ret = sig.return_annotation
    assert typing.get_origin(ret) is tuple and len(typing.get_args(ret)) == len(stage.outputs)
    assert all(issubclass(a, trt_standin.TensorDesc) for a in typing.get_args(ret))


@pytest.mark.parametrize("name", PLUGINS)
def test_impl_and_aot_impl_schemas_as_tensorrt_checks_them(recorded, name):
    """`_validate_impl` / `_validate_aot_impl`: (tensors, attributes in registration order, outputs, stream |
    tactic), an `aot_impl` return annotation of (str | bytes, str | bytes, KernelLaunchParams, SymExprs)."""
    registered = list(inspect.signature(recorded[(name, "register")]).parameters)
    assert list(inspect.signature(recorded[(name, "impl")]).parameters) == registered + ["outputs", "stream"]
    sig = inspect.signature(recorded[(name, "aot_impl")])
    assert list(sig.parameters) == registered + ["outputs", "tactic"]
    outputs = sig.parameters["outputs"].annotation
    assert typing.get_origin(outputs) is tuple
    assert all(issubclass(a, trt_standin.TensorDesc) for a in typing.get_args(outputs))
    ret = sig.return_annotation
    assert ret is not inspect.Parameter.empty, "No return annotation found for aot_impl function"
    assert typing.get_origin(ret) is tuple
    name_t, ptx_t, launch_t, args_t = typing.get_args(ret)
    for union in (name_t, ptx_t):
        assert set(typing.get_args(union) or (union,)) <= {str, bytes}
    assert issubclass(launch_t, trt_standin.KernelLaunchParams) and issubclass(args_t, trt_standin.SymExprs)


def _descs(trt, stage, b: int, q: int, constants: dict) -> list:
    """Input descriptors of a stage as TensorRT hands them over (the shapes a chain gives them)."""
    fp16, i64, i32, f32 = trt.float16, trt.int64, trt.int32, trt.float32
    shapes = {"queries": ((b, q, HEADS, HEAD_DIM), fp16), "keys": ((b, KV_HEADS, q, HEAD_DIM), fp16),
              "values": ((b, KV_HEADS, q, HEAD_DIM), fp16), "lengths": ((b,), i64), "selected": ((b,), i64)}
    c = constants
    rows, nt = c.get("ROWS", 1), c["NT"]
    if "HC" in c:
        shapes["partials"] = (st.output_shapes(st.PARTIALS, st.Dims(b, q), c)[0], f32)
        shapes["raw"] = shapes["pooled"] = ((b, c["HC"], q), f32)
    if c.get("CHUNK"):
        shapes["chunk_scores"] = ((b, -(-q // c["CHUNK"])), f32)
    shapes["ranked"] = shapes.get("chunk_scores" if c.get("CHUNK") else "pooled")
    shapes["hist_in"] = ((b, rows, c.get("PASS", 0), nt, 256), i32)
    shapes["hist"] = ((b, rows, 4, nt, 256), i32)
    return [trt_standin.TensorDesc(*shapes[n]) for n in stage.inputs]


@pytest.mark.parametrize("case", list(CASES()))
def test_aot_impl_runs_on_symbolic_shapes(recorded, aot_payloads, case):
    """Every plugin's AOT implementation as TensorRT calls it (positionally: tensors, attribute values, output
    descriptors, tactic) on shape expressions with no reflected operators (int * expr raises TypeError there):
    the kernel is the stage's payload, the grid B x rows x programs, the int32 arguments evaluate to the
    scalars a launch of the same shapes gets."""
    trt = sys.modules["tensorrt"]
    stage, constants, payload = aot_payloads[case]
    b, q = 2, 300
    descs = _descs(trt, stage, b, q, constants)
    attrs = [constants[a] for a in stage.attributes]
    outs = recorded[(f"pkv::{stage.name}", "register")](*descs, *attrs)
    want = st.output_shapes(stage, st.Dims(b, q), constants)
    assert [[trt_standin.value(x) for x in o.shape_expr] for o in outs] == [list(s) for s in want]
    kernel_name, ptx, launch, extra = recorded[(f"pkv::{stage.name}", "aot_impl")](*descs, *attrs, outs, 0)
    assert (kernel_name, ptx) == (payload.name, payload.ptx)
    assert trt_standin.value(launch.grid_x) == stage.grid(b, constants)
    assert trt_standin.value(launch.block_x) == payload.num_warps * 32
    shapes = {n: tuple(trt_standin.value(x) for x in d.shape_expr) for n, d in zip(stage.inputs, descs, strict=True)}
    width = want[0][-1] if "width" in stage.scalars else None
    assert [trt_standin.value(e) for e in extra.exprs] == st.scalar_values(stage, shapes, width)
