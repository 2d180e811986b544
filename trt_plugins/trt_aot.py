"""Ahead-of-time payloads of the selection kernel for TensorRT's AOT plugins: PTX for a GPU architecture,
compiled with Triton on any machine (no GPU needed), plus the launch facts TensorRT needs.

TensorRT calls an AOT plugin kernel with (inputs, int32 extra arguments, outputs) and nothing else. Triton >= 3.3
appends hidden parameters (global and profile scratch pointers) to every kernel; when the kernel uses neither (its
metadata says 0 bytes of each, and the PTX never reads them), they are removed from the `.entry` signature so the
parameter list is exactly what TensorRT passes. Anything else is refused rather than launched with missing
arguments.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

SCALAR_ARGS = ["q_len", "width", "sq_b", "sq_s", "sq_h", "sk_b", "sk_h", "sk_s", "so_b", "so_h", "so_s"]
TENSOR_INPUTS = ["q_ptr", "k_ptr", "v_ptr", "len_ptr", "sel_ptr"]
TENSOR_OUTPUTS = ["idx_ptr", "ko_ptr", "vo_ptr", "sc_ptr"]
TRITON_TYPES = {"fp32": "*fp32", "fp16": "*fp16", "bf16": "*bf16"}
MAX_SHARED = 48 * 1024  # dynamic shared memory a launch gets without opting in


@dataclass
class AotKernel:
    name: str
    ptx: str
    num_warps: int
    shared: int
    params: int  # parameters of the .entry after stripping


def entry_params(ptx: str) -> list[str]:
    """Names of the `.param`s of the PTX's (single) `.entry`."""
    start = ptx.index(".entry")
    signature = ptx[start : ptx.index(")", start) + 1]
    return re.findall(r"\.param\s+[^,)]*?(\w+)\s*[,)]", signature)


def strip_hidden_params(ptx: str, keep: int) -> str:
    """Drop the `.entry` parameters after the first `keep` if the body never references them."""
    names = entry_params(ptx)
    extra = names[keep:]
    for name in extra:
        if ptx.count(name) != 1:  # referenced beyond its declaration
            raise ValueError(f"the kernel uses the hidden parameter {name}; it cannot run as a TensorRT AOT plugin")
    if not extra:
        return ptx
    start = ptx.index(".entry")
    end = ptx.index(")", start)
    signature = ptx[start:end]
    cut = signature.index(names[keep - 1]) + len(names[keep - 1])
    return ptx[: start + cut] + "\n" + ptx[end:]


def compile_select_kernel(dtype: str, constants: dict, arch: int = 90) -> AotKernel:
    """PTX of the selection kernel; see `_compile`. In a process running Triton's interpreter (the CPU tests),
    the kernels are interpreted functions that cannot be compiled: a clean subprocess compiles them."""
    import os

    if os.environ.get("TRITON_INTERPRET") != "1":
        return _compile(dtype, constants, arch)
    import json
    import subprocess
    import sys

    code = ("import json, sys; from dataclasses import asdict; from trt_plugins.trt_aot import _compile; "
            "a = json.loads(sys.argv[1]); print(json.dumps(asdict(_compile(a['dtype'], a['constants'], a['arch']))))")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    args = json.dumps({"dtype": dtype, "constants": constants, "arch": arch})
    r = subprocess.run([sys.executable, "-c", code, args], capture_output=True, text=True, env=env)
    if r.returncode != 0:
        raise RuntimeError(f"compiling the selection kernel failed: {r.stderr.strip().splitlines()[-1:]}")
    return AotKernel(**json.loads(r.stdout.strip().splitlines()[-1]))


def _compile(dtype: str, constants: dict, arch: int = 90) -> AotKernel:
    """PTX of the selection kernel specialised to `constants` (trt_plugins.triton_select.kernel_constants; the
    StreamingLLM kernel when POSITIONAL, which has no query input) for `sm_{arch}`; halves the key block until the
    launch fits in 48 KiB of shared memory."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from trt_plugins.triton_select import _select_kernel, _streaming_kernel

    pointer = TRITON_TYPES[dtype]
    positional = bool(constants["POSITIONAL"])
    inputs = TENSOR_INPUTS[1:] if positional else TENSOR_INPUTS
    signature = {n: pointer for n in inputs if n not in ("len_ptr", "sel_ptr")} | {"len_ptr": "*i64",
                                                                                    "sel_ptr": "*i64"}
    signature |= {n: "i32" for n in SCALAR_ARGS}
    signature |= {"idx_ptr": "*i64", "ko_ptr": pointer, "vo_ptr": pointer, "sc_ptr": "*fp32"}
    constants = dict(constants)
    while True:
        source = ASTSource(fn=_streaming_kernel if positional else _select_kernel,
                           signature=signature | {k: "constexpr" for k in constants},
                           constexprs=constants)
        compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32), options={"enable_fp_fusion": False})
        if compiled.metadata.shared <= MAX_SHARED or constants["BLOCK_K"] <= 16:
            break
        constants["BLOCK_K"] //= 2
    meta = compiled.metadata
    if getattr(meta, "global_scratch_size", 0) or getattr(meta, "profile_scratch_size", 0):
        raise ValueError("the kernel needs Triton scratch memory, which a TensorRT AOT plugin cannot provide")
    keep = len(inputs) + len(SCALAR_ARGS) + len(TENSOR_OUTPUTS)
    ptx = strip_hidden_params(compiled.asm["ptx"], keep)
    return AotKernel(meta.name, ptx, meta.num_warps, meta.shared, len(entry_params(ptx)))


def scalar_args(batch, q_len, width, num_heads, num_kv_heads, cache_heads, head_dim) -> list:
    """The int32 extra arguments, in SCALAR_ARGS order, for contiguous inputs and outputs (ints or TensorRT shape
    expressions: only + and * are used)."""
    return [q_len, width,
            q_len * num_heads * head_dim, num_heads * head_dim, head_dim,  # queries [B, q, H, d]
            num_kv_heads * q_len * head_dim, q_len * head_dim, head_dim,  # keys / values [B, Hkv, q, d]
            cache_heads * width * head_dim, width * head_dim, head_dim]  # keys_out / values_out [B, Hc, W, d]
