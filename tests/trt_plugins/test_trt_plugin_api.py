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
from trt_plugins import trt_plugin  # noqa: E402
from trt_plugins.trt_aot import scalar_args  # noqa: E402

PLUGINS = ["pkv::PyramidKVSelect", "pkv::StreamingLLMSelect"]


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


def test_both_plugins_register_all_three_functions(recorded):
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
    sig = inspect.signature(recorded[(name, "register")])
    seen_attribute = False
    for param in sig.parameters.values():
        assert param.annotation is not inspect.Parameter.empty and param.default is inspect.Parameter.empty
        if inspect.isclass(param.annotation) and issubclass(param.annotation, trt_standin.TensorDesc):
            assert not seen_attribute, "tensors first, then attributes"
        else:
            seen_attribute = True
            assert param.annotation in (int, float, bytes, bool, str), f"{param.name}: {param.annotation}"
    ret = sig.return_annotation
    assert typing.get_origin(ret) is tuple and len(typing.get_args(ret)) == 4
    assert all(issubclass(a, trt_standin.TensorDesc) for a in typing.get_args(ret))


@pytest.mark.parametrize("name", PLUGINS)
def test_aot_impl_declares_the_payload_tensorrt_expects(recorded, name):
    sig = inspect.signature(recorded[(name, "aot_impl")])
    assert list(sig.parameters)[-2:] == ["outputs", "tactic"]
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


@pytest.mark.parametrize("name", PLUGINS)
def test_aot_impl_runs_on_symbolic_shapes(recorded, name):
    """The AOT implementation as TensorRT calls it: shape expressions with no reflected operators (int * expr
    raises TypeError there); the int32 arguments it returns evaluate to the contiguous strides."""
    trt = sys.modules["tensorrt"]
    b, h, hkv, q, d, window, max_selected = 2, 8, 2, 300, 64, 8, 40
    queries = trt_standin.TensorDesc((b, q, h, d), trt.float16)
    keys = trt_standin.TensorDesc((b, hkv, q, d), trt.float16)
    values = trt_standin.TensorDesc((b, hkv, q, d), trt.float16)
    lengths = trt_standin.TensorDesc((b,), trt.int64)
    selected = trt_standin.TensorDesc((b,), trt.int64)
    fn = recorded[(name, "aot_impl")]
    if name == "pkv::PyramidKVSelect":
        attrs = dict(window=window, kernel=7, pooling="max", granularity="kv-head", observe="window", num_heads=h,
                     num_kv_heads=hkv, head_dim=d, max_selected=max_selected)
        descs = recorded[(name, "register")](queries, keys, values, lengths, selected, **attrs)
        kernel_name, ptx, launch, extra = fn(queries, keys, values, lengths, selected, **attrs, outputs=descs,
                                             tactic=0)
        heads = h
    else:
        attrs = dict(window=window, sinks=4, num_kv_heads=hkv, head_dim=d, max_selected=max_selected)
        descs = recorded[(name, "register")](keys, values, lengths, selected, **attrs)
        kernel_name, ptx, launch, extra = fn(keys, values, lengths, selected, **attrs, outputs=descs, tactic=0)
        heads = hkv
    width = window + max_selected
    assert [trt_standin.value(x) for x in descs[0].shape_expr] == [b, hkv, width]
    assert f".entry {kernel_name}(" in ptx
    assert trt_standin.value(launch.grid_x) == b * hkv and trt_standin.value(launch.block_x) % 32 == 0
    assert [trt_standin.value(e) for e in extra.exprs] == scalar_args(b, q, width, heads, hkv, hkv, d)
