"""The TensorRT plugins of the selections (Quickly Deployable Plugins API, TensorRT 10.x), for GPU hosts: one plugin
`pkv::<name>` per stage of `trt_plugins.select_stages` (SelectPartials, SelectScores, SelectPool, SelectRadix,
SelectEmit, StreamingSelect, ChunkSums, ChunkHist, ChunkEmit), because an AOT plugin runs exactly one kernel and
a selection spread over the GPU is a chain of kernels. `trt_chain` rewrites each selection node of the
tensorrt-target graphs into its chain of these plugins before TensorRT parses them.

Each plugin has an ahead-of-time implementation (its Triton kernel compiled to PTX by `trt_plugins.trt_aot`, baked
into the plan: no Python at run time) and a JIT implementation (the same kernel launched from Python through
torch) as the fallback; the build prefers AOT (`PREFER_AOT_PYTHON_PLUGINS`). A plugin's tensors are its kernel's
tensor parameters, its attributes the kernel's compile-time constants (UPPERCASE, int; SCALE float) plus
MAX_SELECTED for the stages whose output width it sets; output shapes follow `select_stages.output_shapes`.

The nine plugins are registered by one factory: TensorRT reads a plugin function's parameters, their
annotations and its return annotation with `inspect.signature` (tensorrt/plugin/_validate.py) and calls it
positionally (tensors, then attribute values in registration order, then outputs and stream / tactic), so each
generated function carries an explicit `__signature__` with the real classes as annotations.

Nothing here imports TensorRT or Triton at module level (`require_tensorrt` must answer on a machine with
neither); `register_plugins()` does, and says what is missing.
"""

from __future__ import annotations

import inspect

TRT_HINT = ("TensorRT 10.x from NVIDIA's index on a GPU host: pip install --extra-index-url https://pypi.nvidia.com "
            "'tensorrt-cu12==10.15.*' (the PyPI 'tensorrt' package is a stub that downloads from there)")
_REGISTERED = False


def plugin_names() -> list[str]:
    """Every plugin `register_plugins` registers."""
    from trt_plugins.select_stages import STAGES

    return [f"pkv::{stage.name}" for stage in STAGES]


class MissingTensorRT(ImportError):
    """TensorRT (or its Python plugin API) is not installed: the message says how to get it."""


def require_tensorrt():
    try:
        import tensorrt as trt
    except ImportError:
        raise MissingTensorRT(f"this needs {TRT_HINT}") from None
    if not hasattr(trt, "QuickPluginCreationRequest"):
        raise MissingTensorRT(f"TensorRT {trt.__version__} has no ahead-of-time Python plugins (10.9+ needed); "
                              f"install {TRT_HINT}")
    return trt


def attribute_type(name: str) -> type:
    return float if name == "SCALE" else int


def _dims(trtp, stage, descs: dict):
    """Output-shape sizes (`select_stages.Dims`) from the input descriptors' shape expressions."""
    from trt_plugins.select_stages import Dims

    def both_ints(a, b):
        return isinstance(a, int) and isinstance(b, int)

    source = descs["keys"] if "keys" in descs else descs.get("raw")  # where the prompt length q is
    return Dims(descs[stage.inputs[0]].shape_expr[0], None if source is None else source.shape_expr[2],
                minimum=lambda a, b: min(a, b) if both_ints(a, b) else trtp.min(a, b),
                cdiv=lambda a, b: -(-a // b) if both_ints(a, b) else trtp.cdiv(a, b))


def _signature(trtp, stage, tensor_type, tail: list[inspect.Parameter], returns) -> inspect.Signature:
    kind = inspect.Parameter.POSITIONAL_OR_KEYWORD
    params = [inspect.Parameter(n, kind, annotation=tensor_type) for n in stage.inputs]
    params += [inspect.Parameter(a, kind, annotation=attribute_type(a)) for a in stage.attributes]
    return inspect.Signature(params + tail, return_annotation=returns)


def _register(trt, trtp, stage) -> None:
    from trt_plugins.select_stages import KINDS, output_shapes

    name = f"pkv::{stage.name}"
    kind = inspect.Parameter.POSITIONAL_OR_KEYWORD
    dtypes = {trt.float32: "fp32", trt.float16: "fp16", trt.bfloat16: "bf16"}
    kinds = {"i64": trt.int64, "i32": trt.int32, "f32": trt.float32}
    outs = tuple[(trtp.TensorDesc,) * len(stage.outputs)]
    # What TensorRT requires an aot_impl to declare it returns: kernel name, PTX, launch parameters, int32 args.
    payload = tuple[str | bytes, str | bytes, trtp.KernelLaunchParams, trtp.SymIntExprs]

    def describe(*args, **kwargs):
        bound = describe.__signature__.bind(*args, **kwargs).arguments
        descs = {n: bound[n] for n in stage.inputs}
        shapes = output_shapes(stage, _dims(trtp, stage, descs), {a: bound[a] for a in stage.attributes})
        types = [descs[o.removesuffix("_out")].dtype if KINDS.get(o) == "data" else kinds[KINDS.get(o, "f32")]
                 for o in stage.outputs]
        return tuple(trtp.from_shape_expr(s, dtype=t) for s, t in zip(shapes, types, strict=True))

    def run(*args, **kwargs):  # pragma: no cover - GPU only
        bound = run.__signature__.bind(*args, **kwargs).arguments
        _run_jit(stage, bound, {a: bound[a] for a in stage.attributes})

    def aot(*args, **kwargs):
        bound = aot.__signature__.bind(*args, **kwargs).arguments
        return _aot_payload(trtp, stage, bound, {a: bound[a] for a in stage.attributes}, dtypes)

    describe.__signature__ = _signature(trtp, stage, trtp.TensorDesc, [], outs)
    run.__signature__ = _signature(trtp, stage, inspect.Parameter.empty,
                                   [inspect.Parameter("outputs", kind), inspect.Parameter("stream", kind)], None)
    aot.__signature__ = _signature(trtp, stage, trtp.TensorDesc,
                                   [inspect.Parameter("outputs", kind, annotation=tuple[trtp.TensorDesc]),
                                    inspect.Parameter("tactic", kind, annotation=int)], payload)
    for fn, role in ((describe, "describe"), (run, "jit"), (aot, "aot")):
        fn.__name__ = fn.__qualname__ = f"{stage.name}_{role}"
    trtp.register(name)(describe)
    trtp.impl(name)(run)
    trtp.aot_impl(name)(aot)


def _aot_payload(trtp, stage, bound: dict, constants: dict, dtypes: dict):
    """The stage's PTX and how TensorRT launches it: grid B x rows x programs, the int32 scalars."""
    from trt_plugins.select_stages import KINDS, scalar_values
    from trt_plugins.trt_aot import compile_stage

    descs = {n: bound[n] for n in stage.inputs}
    data = [d for n, d in descs.items() if KINDS.get(n) == "data"]
    kernel = compile_stage(stage.name, dtypes[data[0].dtype] if data else "fp32", constants)
    launch = trtp.KernelLaunchParams()
    launch.grid_x = stage.grid(descs[stage.inputs[0]].shape_expr[0], constants)
    launch.block_x = kernel.num_warps * 32
    launch.shared_mem = kernel.shared
    shapes = {n: tuple(d.shape_expr) for n, d in descs.items()}
    width = bound["outputs"][0].shape_expr[2] if "width" in stage.scalars else None
    extra = scalar_values(stage, shapes, width)
    return kernel.name, kernel.ptx, launch, trtp.SymIntExprs.from_tuple([trtp.SymInt32(e) for e in extra])


def register_plugins() -> None:
    """Register every stage plugin with TensorRT's plugin registry (idempotent). Call before parsing a graph
    rewritten by `trt_chain`, and before deserializing a plan that uses a JIT implementation."""
    global _REGISTERED
    if _REGISTERED:
        return
    trt = require_tensorrt()

    import tensorrt.plugin as trtp

    from trt_plugins.select_stages import STAGES

    for stage in STAGES:
        _register(trt, trtp, stage)
    _REGISTERED = True


def _run_jit(stage, bound: dict, constants: dict) -> None:  # pragma: no cover - GPU only
    import torch

    from trt_plugins.triton_select import launch

    with torch.cuda.stream(torch.cuda.ExternalStream(bound["stream"])):
        tensors = {n: torch.as_tensor(bound[n], device="cuda") for n in stage.inputs}
        outputs = {n: torch.as_tensor(t, device="cuda") for n, t in zip(stage.outputs, bound["outputs"], strict=True)}
        launch(stage, tensors, constants, outputs)
