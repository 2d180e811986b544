"""Launch an AOT payload of the selection kernel the way TensorRT does, without TensorRT (GPU hosts only).

TensorRT loads a plugin's PTX through the CUDA driver (its JIT compiles it for the GPU at hand) and launches the
one kernel with the launch parameters the `aot_impl` returned and the arguments (input pointers, the int32
extra arguments, output pointers), nothing else. `launch_payload` does exactly that with the CUDA driver API
(`cuda-python`'s `cuda.bindings.driver`, or CuPy's module loader), on torch CUDA tensors. It proves on any CUDA
machine what the plugin's AOT path depends on: that the driver accepts the PTX (`.version` / `.target`), and that
the parameter list and launch geometry compute the op (compared with `trt_plugins.pyramidkv_select` by callers).
"""

from __future__ import annotations

import ctypes

import torch

from trt_plugins.trt_aot import AotKernel, scalar_args


class PayloadLoadError(RuntimeError):
    """The CUDA driver refused the PTX (e.g. CUDA_ERROR_UNSUPPORTED_PTX_VERSION)."""


def _bindings_loader():
    """load(ptx, name) -> launcher through cuda-python's driver bindings (None when they are not installed)."""
    try:
        from cuda.bindings import driver as cu
    except ImportError:
        return None
    def check(result):
        err, *rest = result
        if err != cu.CUresult.CUDA_SUCCESS:
            _, name = cu.cuGetErrorName(err)
            raise PayloadLoadError(name.decode() if isinstance(name, bytes) else str(name))
        return rest[0] if len(rest) == 1 else rest

    def load(ptx: str, kernel_name: str):
        check(cu.cuInit(0))
        module = check(cu.cuModuleLoadData(ptx.encode() + b"\0"))
        fn = check(cu.cuModuleGetFunction(module, kernel_name.encode()))

        def launch(grid: int, block: int, shared: int, stream: int, pointers: list[int], ints: list[int],
                   outputs: list[int]) -> None:
            values = tuple(pointers) + tuple(ints) + tuple(outputs)
            types = ((ctypes.c_void_p,) * len(pointers) + (ctypes.c_int,) * len(ints)
                     + (ctypes.c_void_p,) * len(outputs))
            check(cu.cuLaunchKernel(fn, grid, 1, 1, block, 1, 1, shared, stream, (values, types), 0))

        return launch

    return load


def _cupy_loader():
    """load(ptx, name) -> launcher through CuPy's module loader (None when CuPy is not installed)."""
    try:
        import cupy
    except ImportError:
        return None
    import numpy as np

    def load_cupy(ptx: str, kernel_name: str):
        module = cupy.cuda.function.Module()
        try:
            module.load(ptx.encode())
        except cupy.cuda.driver.CUDADriverError as e:
            raise PayloadLoadError(str(e)) from None
        fn = module.get_function(kernel_name)

        def launch(grid, block, shared, stream, pointers, ints, outputs) -> None:
            args = [np.uint64(p) for p in pointers] + [np.int32(i) for i in ints] + [np.uint64(p) for p in outputs]
            with cupy.cuda.ExternalStream(stream):
                fn((grid,), (block,), tuple(args), shared_mem=shared)

        return launch

    return load_cupy


def loaders() -> list[tuple[str, object]]:
    """The driver bindings available here, in order of preference."""
    found = [("cuda.bindings.driver", _bindings_loader()), ("cupy", _cupy_loader())]
    return [(name, load) for name, load in found if load is not None]


def launch_payload(kernel: AotKernel, queries: torch.Tensor | None, keys: torch.Tensor, values: torch.Tensor,
                   lengths: torch.Tensor, selected: torch.Tensor, width: int, cache_heads: int, num_heads: int
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Run the payload as TensorRT would. queries [B, q, H, d] (None for StreamingLLM's kernel), keys / values
    [B, Hkv, q, d], lengths / selected [B] int64, all contiguous CUDA tensors. Returns the four plugin outputs:
    kept_indices [B, Hc, W] int64, keys_out / values_out [B, Hc, W, d], scores [B, Hc, 2, q] float32, poisoned
    before the launch so an unwritten element shows."""
    b, hkv, q, d = keys.shape
    device = keys.device
    outputs = (torch.full((b, cache_heads, width), -7, dtype=torch.int64, device=device),
               torch.full((b, cache_heads, width, d), float("nan"), dtype=keys.dtype, device=device),
               torch.full((b, cache_heads, width, d), float("nan"), dtype=values.dtype, device=device),
               torch.full((b, cache_heads, 2, q), float("nan"), dtype=torch.float32, device=device))
    inputs = [t for t in (queries, keys, values, lengths, selected) if t is not None]
    ints = scalar_args(b, q, width, num_heads, hkv, cache_heads, d)
    stream = torch.cuda.current_stream(device)
    available = loaders()
    if not available:
        raise RuntimeError("launching a PTX payload needs cuda-python (cuda.bindings) or CuPy")
    errors = []
    for name, load in available:
        try:
            launch = load(kernel.ptx, kernel.name)
            launch(b * cache_heads, kernel.num_warps * 32, kernel.shared, stream.cuda_stream,
                   [t.data_ptr() for t in inputs], [int(i) for i in ints], [t.data_ptr() for t in outputs])
        except PayloadLoadError:
            raise  # the driver itself refused the PTX: another binding would get the same answer
        except Exception as e:  # noqa: BLE001 - a binding's API mismatch: try the next one
            errors.append(f"{name}: {type(e).__name__}: {e}")
            continue
        stream.synchronize()
        return outputs
    raise RuntimeError("no driver binding could launch the payload: " + "; ".join(errors))
