"""The `pkv::PyramidKVSelect` and `pkv::StreamingLLMSelect` TensorRT plugins (Quickly Deployable Plugins API,
TensorRT 10.x), for GPU hosts.

Each plugin has an ahead-of-time implementation (the Triton kernel of `trt_plugins.triton_select` compiled to PTX
by `trt_plugins.trt_aot`, baked into the plan: no Python at run time) and a JIT implementation (the same kernel
launched from Python through torch) as the fallback. The ONNX graphs of the tensorrt target carry the nodes with
`plugin_namespace="pkv"`, so TensorRT's parser (10.15+) uses the plugin, while onnxruntime inlines the same-named
local function; the build prefers AOT (`PREFER_AOT_PYTHON_PLUGINS`).

Outputs: kept_indices [B, Hc, W] int64, keys_out / values_out [B, Hc, W, d], scores [B, Hc, 2, q] float32 (the
kernel's scratch: raw and pooled scores). W = max_selected + min(window, q) is static per layer (the budget at the
engine's max input length, the largest any prompt gets), so a plugin output can be wider than the ONNX
function's (more -1 slots, which every consumer ignores: rows are compact).

Nothing here imports TensorRT at module level; `register_plugins()` does, and says what is missing.

No `from __future__ import annotations` here: TensorRT validates the decorated functions by their annotations
(`issubclass(param.annotation, TensorDesc)`, the `aot_impl` return type) without evaluating strings, so every
annotation must be the real class when the decorator runs.
"""

TRT_HINT = ("TensorRT 10.x from NVIDIA's index on a GPU host: pip install --extra-index-url https://pypi.nvidia.com "
            "'tensorrt-cu12==10.15.*' (the PyPI 'tensorrt' package is a stub that downloads from there)")
_REGISTERED = False


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


def output_shapes(batch, q_len, num_heads: int, num_kv_heads: int, head_dim: int, granularity: str, window: int,
                  max_selected: int, minimum=min):
    """Shapes of (kept_indices, keys_out, values_out, scores). `batch` / `q_len` are ints or TensorRT shape
    expressions (then `minimum` is `trtp.min`)."""
    cache_heads = num_heads if granularity == "query-head" else num_kv_heads
    width = minimum(window, q_len) + max_selected
    return ((batch, cache_heads, width), (batch, cache_heads, width, head_dim),
            (batch, cache_heads, width, head_dim), (batch, cache_heads, 2, q_len))


def _text(value) -> str:
    """ONNX string attributes reach plugins NUL-terminated."""
    return value.decode() if isinstance(value, bytes) else str(value).rstrip("\x00")


def register_plugins() -> None:  # pragma: no cover - needs TensorRT (scripts/gpu_acceptance.py runs it)
    """Register both plugins with TensorRT's plugin registry (idempotent). Call before parsing an ONNX graph of
    the tensorrt target, and before deserializing a plan that uses the JIT implementation."""
    global _REGISTERED
    if _REGISTERED:
        return
    trt = require_tensorrt()

    import tensorrt.plugin as trtp

    from trt_plugins.triton_select import kernel_constants
    from trt_plugins.trt_aot import compile_select_kernel, scalar_args

    dtypes = {trt.float32: "fp32", trt.float16: "fp16", trt.bfloat16: "bf16"}
    outs = tuple[trtp.TensorDesc, trtp.TensorDesc, trtp.TensorDesc, trtp.TensorDesc]
    # What TensorRT requires an aot_impl to declare it returns: kernel name, PTX, launch parameters, int32 args.
    payload = tuple[str | bytes, str | bytes, trtp.KernelLaunchParams, trtp.SymIntExprs]

    def descs(keys, values, shapes):
        kinds = (trt.int64, keys.dtype, values.dtype, trt.float32)
        return tuple(trtp.from_shape_expr(s, dtype=t) for s, t in zip(shapes, kinds, strict=True))

    def shapes_of(keys, num_heads, num_kv_heads, head_dim, granularity, window, max_selected):
        return output_shapes(keys.shape_expr[0], keys.shape_expr[2], num_heads, num_kv_heads, head_dim,
                             _text(granularity), window, max_selected, minimum=trtp.min)

    def aot(keys, outputs, constants, num_heads, num_kv_heads, head_dim, cache_heads):
        kernel = compile_select_kernel(dtypes[keys.dtype], constants)
        b, q, width = keys.shape_expr[0], keys.shape_expr[2], outputs[0].shape_expr[2]
        launch = trtp.KernelLaunchParams()
        launch.grid_x = b * cache_heads
        launch.block_x = kernel.num_warps * 32
        launch.shared_mem = kernel.shared
        extra = scalar_args(b, q, width, num_heads, num_kv_heads, cache_heads, head_dim)
        return kernel.name, kernel.ptx, launch, trtp.SymIntExprs.from_tuple([trtp.SymInt32(e) for e in extra])

    @trtp.register("pkv::PyramidKVSelect")
    def _pyramidkv_desc(queries: trtp.TensorDesc, keys: trtp.TensorDesc, values: trtp.TensorDesc,
                        lengths: trtp.TensorDesc, selected: trtp.TensorDesc, window: int, kernel: int, pooling: str,
                        granularity: str, observe: str, num_heads: int, num_kv_heads: int, head_dim: int,
                        max_selected: int) -> outs:
        return descs(keys, values, shapes_of(keys, num_heads, num_kv_heads, head_dim, granularity, window,
                                             max_selected))

    @trtp.impl("pkv::PyramidKVSelect")
    def _pyramidkv_jit(queries, keys, values, lengths, selected, window: int, kernel: int, pooling: str,
                       granularity: str, observe: str, num_heads: int, num_kv_heads: int, head_dim: int,
                       max_selected: int, outputs, stream: int) -> None:
        _run_jit((queries, keys, values, lengths, selected), outputs, stream, dict(
            h=num_heads, window=window, kernel=kernel, pooling=_text(pooling), granularity=_text(granularity),
            observe=_text(observe)))

    @trtp.aot_impl("pkv::PyramidKVSelect")
    def _pyramidkv_aot(queries: trtp.TensorDesc, keys: trtp.TensorDesc, values: trtp.TensorDesc,
                       lengths: trtp.TensorDesc, selected: trtp.TensorDesc, window: int, kernel: int, pooling: str,
                       granularity: str, observe: str, num_heads: int, num_kv_heads: int, head_dim: int,
                       max_selected: int, outputs: tuple[trtp.TensorDesc], tactic: int) -> payload:
        constants = kernel_constants(num_heads, num_kv_heads, head_dim, window, kernel, _text(pooling),
                                     _text(granularity), _text(observe), False, 0)
        return aot(keys, outputs, constants, num_heads, num_kv_heads, head_dim, constants["HC"])

    @trtp.register("pkv::StreamingLLMSelect")
    def _streaming_desc(keys: trtp.TensorDesc, values: trtp.TensorDesc, lengths: trtp.TensorDesc,
                        selected: trtp.TensorDesc, window: int, sinks: int, num_kv_heads: int, head_dim: int,
                        max_selected: int) -> outs:
        return descs(keys, values, shapes_of(keys, num_kv_heads, num_kv_heads, head_dim, "kv-head", window,
                                             max_selected))

    @trtp.impl("pkv::StreamingLLMSelect")
    def _streaming_jit(keys, values, lengths, selected, window: int, sinks: int, num_kv_heads: int, head_dim: int,
                       max_selected: int, outputs, stream: int) -> None:
        _run_jit((None, keys, values, lengths, selected), outputs, stream, dict(
            h=num_kv_heads, window=window, kernel=1, pooling="none", granularity="kv-head", observe="window",
            positional=True, sinks=sinks))

    @trtp.aot_impl("pkv::StreamingLLMSelect")
    def _streaming_aot(keys: trtp.TensorDesc, values: trtp.TensorDesc, lengths: trtp.TensorDesc,
                       selected: trtp.TensorDesc, window: int, sinks: int, num_kv_heads: int, head_dim: int,
                       max_selected: int, outputs: tuple[trtp.TensorDesc], tactic: int) -> payload:
        constants = kernel_constants(num_kv_heads, num_kv_heads, head_dim, window, 1, "none", "kv-head", "window",
                                     True, sinks)
        return aot(keys, outputs, constants, num_kv_heads, num_kv_heads, head_dim, num_kv_heads)

    _REGISTERED = True


def _run_jit(inputs, outputs, stream: int, options: dict) -> None:  # pragma: no cover - GPU only
    import torch

    from trt_plugins.triton_select import launch_into

    with torch.cuda.stream(torch.cuda.ExternalStream(stream)):
        tensors = [None if t is None else torch.as_tensor(t, device="cuda") for t in inputs]
        outs = [torch.as_tensor(t, device="cuda") for t in outputs]
        launch_into(*tensors, *outs, **options)
