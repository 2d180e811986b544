"""Launch the AOT payloads of a selection chain the way TensorRT does, without TensorRT (GPU hosts only).

TensorRT loads a plugin's PTX through the CUDA driver (its JIT compiles it for the GPU at hand) and launches the
one kernel with the launch parameters the `aot_impl` returned and the arguments (input pointers, the int32
extra arguments, output pointers), nothing else. `launch_stage` does exactly that for one stage with the CUDA
driver API (`cuda-python`'s `cuda.bindings.driver`, or CuPy's module loader) on torch CUDA tensors;
`run_chain_payloads` runs every stage of a chain in order, as the plugin nodes of a plan do. It proves on any
CUDA machine what the plugins' AOT path depends on: that the driver accepts the PTX (`.version` / `.target`),
and that the parameter lists, launch geometry and the chain's wiring compute the op (compared with the
specifications by callers).
"""

from __future__ import annotations

import ctypes

import torch

from trt_plugins import select_stages as st
from trt_plugins.triton_select import allocate
from trt_plugins.trt_aot import AotKernel, compile_stages


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


def launch_stage(kernel: AotKernel, stage: st.Stage, tensors: dict, constants: dict) -> dict:
    """Run one stage's payload as TensorRT would: `tensors` its inputs by name (contiguous CUDA tensors). Returns
    its outputs by name, allocated by the plugin's shape rule and poisoned first, so an unwritten element shows."""
    inputs = {n: tensors[n].contiguous() for n in stage.inputs}
    outputs = allocate(stage, inputs, constants, poison=True)
    shapes = {n: tuple(t.shape) for n, t in inputs.items()}
    ints = [int(v) for v in st.scalar_values(stage, shapes, outputs[stage.outputs[0]].shape[-1])]
    grid = stage.grid(inputs[stage.inputs[0]].shape[0], constants)
    device = inputs[stage.inputs[0]].device
    stream = torch.cuda.current_stream(device)
    available = loaders()
    if not available:
        raise RuntimeError("launching a PTX payload needs cuda-python (cuda.bindings) or CuPy")
    errors = []
    for name, load in available:
        try:
            launch = load(kernel.ptx, kernel.name)
            launch(grid, kernel.num_warps * 32, kernel.shared, stream.cuda_stream,
                   [inputs[n].data_ptr() for n in stage.inputs], ints,
                   [outputs[n].data_ptr() for n in stage.outputs])
        except PayloadLoadError:
            raise  # the driver itself refused the PTX: another binding would get the same answer
        except Exception as e:  # noqa: BLE001 - a binding's API mismatch: try the next one
            errors.append(f"{name}: {type(e).__name__}: {e}")
            continue
        stream.synchronize()
        return outputs
    raise RuntimeError("no driver binding could launch the payload: " + "; ".join(errors))


def run_chain_payloads(chain: tuple[st.Step, ...], tensors: dict, constants: dict, dtype: str) -> dict:
    """Every stage of a chain compiled (`trt_aot`, ISA 8.0 for sm_80) and launched in order through the driver;
    returns all tensors by name, as `triton_select.run_chain` does for the Triton-lang launches."""
    kernels = compile_stages([(step.stage.name, dtype, constants | step.constants) for step in chain])
    env = dict(tensors)
    for step, kernel in zip(chain, kernels, strict=True):
        ins = {p: env[step.source(p)] for p in step.stage.inputs}
        env.update(launch_stage(kernel, step.stage, ins, constants | step.constants))
    return env
