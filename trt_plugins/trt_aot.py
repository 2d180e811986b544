"""Ahead-of-time payloads of the selection kernels for TensorRT's AOT plugins: PTX for a GPU architecture,
compiled with Triton on any machine (no GPU needed), plus the launch facts TensorRT needs. One payload per stage
of a selection chain (`select_stages`): each stage is one plugin, and an AOT plugin runs exactly one kernel.

Which PTX: TensorRT hands the plugin's PTX to the CUDA driver, whose JIT compiles it for the GPU at hand. A
driver accepts PTX up to the ISA of its own CUDA version, and PTX for `sm_XY` runs on every GPU of compute
capability X.Y or newer. Triton left alone writes what its bundled ptxas knows (Triton 3.9: `.version 9.4`,
CUDA 13.4's ISA) for `sm_90a` (Hopper only, no forward compatibility): a CUDA 12 driver, which TensorRT 10.x's
cu12 builds run on, refuses that ISA, and no other GPU loads `sm_90a`. The payload is therefore compiled for
`AOT_TARGET` = `sm_80` at ISA `AOT_PTX_ISA` = 8.0 (CUDA 12.0's): any CUDA 12.0+ driver loads it, on any
Ampere, Ada, Hopper or Blackwell GPU. `check_ptx_header` refuses anything else, and the tests assemble the PTX
with CUDA 12.9's ptxas (bundled with Triton) for sm_80 and sm_90.

TensorRT calls an AOT plugin kernel with (inputs, int32 extra arguments, outputs) and nothing else. Triton >= 3.3
appends hidden parameters (global and profile scratch pointers) to every kernel; when the kernel uses neither (its
metadata says 0 bytes of each, and the PTX never reads them), they are removed from the `.entry` signature so the
parameter list is exactly what TensorRT passes. Anything else is refused rather than launched with missing
arguments.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass

TRITON_TYPES = {"fp32": "*fp32", "fp16": "*fp16", "bf16": "*bf16"}
POINTER_TYPES = {"i64": "*i64", "i32": "*i32", "f32": "*fp32"}
MAX_SHARED = 48 * 1024  # dynamic shared memory a launch gets without opting in
AOT_ARCH = 80  # compute capability the PTX targets (sm_80: runs on every later GPU through the driver's JIT)
AOT_PTX_ISA = 80  # PTX ISA 8.0, as Triton writes versions (major * 10 + minor): CUDA 12.0's, any CUDA 12 driver


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


def ptx_header(ptx: str) -> tuple[str, str]:
    """(`.version`, `.target`) of a PTX module, exactly as written (e.g. ("8.0", "sm_80"))."""
    version = re.search(r"^\.version\s+(\S+)\s*$", ptx, re.M)
    target = re.search(r"^\.target\s+([^\s,]+)", ptx, re.M)
    if not version or not target:
        raise ValueError("not a PTX module: no .version / .target line")
    return version.group(1), target.group(1)


def check_ptx_header(ptx: str, arch: int = AOT_ARCH, isa: int = AOT_PTX_ISA) -> None:
    """Refuse PTX whose ISA or target differs from what was asked for (a Triton that ignores `ptx_version`, or
    writes an `a` target, would otherwise produce a payload that a CUDA 12 driver or a non-Hopper GPU rejects)."""
    want = (f"{isa // 10}.{isa % 10}", f"sm_{arch}")
    if ptx_header(ptx) != want:
        raise ValueError(f"the AOT payload is PTX {ptx_header(ptx)}, not {want} (.version, .target)")


_COMPILED: dict[str, AotKernel] = {}  # this process's payloads by request: a build asks once per layer and shape


def _key(name: str, dtype: str, constants: dict, arch: int) -> str:
    from trt_plugins.select_stages import STAGES

    stage = next(s for s in STAGES if s.name == name)
    return json.dumps([name, dtype, arch, {k: constants[k] for k in stage.constexprs}], sort_keys=True)


def compile_stages(requests: list[tuple[str, str, dict]], arch: int = AOT_ARCH) -> list[AotKernel]:
    """PTX of stage kernels, one per (stage name, dtype, constants) request; see `_compile`. Each specialisation
    is compiled once per process (a stage takes only the constants it names, so layers alike share payloads).
    In a process running Triton's interpreter (the CPU tests) the kernels are interpreted functions that cannot
    be compiled: a clean subprocess compiles them (all missing requests in one)."""
    keys = [_key(name, dtype, constants, arch) for name, dtype, constants in requests]
    missing = {k: r for k, r in zip(keys, requests, strict=True) if k not in _COMPILED}
    if missing and os.environ.get("TRITON_INTERPRET") != "1":
        _COMPILED.update({k: _compile(*r, arch) for k, r in missing.items()})
    elif missing:
        code = ("import json, sys; from dataclasses import asdict; from trt_plugins.trt_aot import _compile; "
                "a = json.loads(sys.argv[1]); "
                "print(json.dumps([asdict(_compile(*r, a['arch'])) for r in a['requests']]))")
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        args = json.dumps({"requests": list(missing.values()), "arch": arch})
        r = subprocess.run([sys.executable, "-c", code, args], capture_output=True, text=True, env=env)
        if r.returncode != 0:
            raise RuntimeError(f"compiling the selection kernels failed: {r.stderr.strip().splitlines()[-1:]}")
        compiled = json.loads(r.stdout.strip().splitlines()[-1])
        _COMPILED.update({k: AotKernel(**c) for k, c in zip(missing, compiled, strict=True)})
    return [_COMPILED[k] for k in keys]


def compile_stage(name: str, dtype: str, constants: dict, arch: int = AOT_ARCH) -> AotKernel:
    """PTX of one stage kernel (`select_stages.STAGES` by name) for model dtype `dtype` ("fp32" | "fp16" | "bf16")."""
    return compile_stages([(name, dtype, constants)], arch)[0]


def signature(stage, dtype: str) -> dict:
    """Triton's signature of a stage kernel: pointers by tensor kind, int32 scalars, constexprs."""
    from trt_plugins.select_stages import KINDS, SCALARS

    def kind(param: str) -> str:
        if param.isupper():
            return "constexpr"
        if param in SCALARS:
            return "i32"
        k = KINDS.get(param, "f32")
        return TRITON_TYPES[dtype] if k == "data" else POINTER_TYPES[k]

    return {p: kind(p) for p in stage.params}


def _compile(name: str, dtype: str, constants: dict, arch: int = AOT_ARCH) -> AotKernel:
    """PTX (ISA `AOT_PTX_ISA`) of stage `name` specialised to `constants` (the chain's: the kernel takes the ones
    it names) for `sm_{arch}`; halves the key block until the launch fits in 48 KiB of shared memory (the block
    only cuts loops: a program's share of the row, which the kernels of a chain agree on, does not change)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from trt_plugins.select_stages import STAGES

    stage = next(s for s in STAGES if s.name == name)
    fixed = {k: constants[k] for k in stage.constexprs}
    while True:
        source = ASTSource(fn=stage.kernel, signature=signature(stage, dtype), constexprs=fixed)
        compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32),
                                  options={"enable_fp_fusion": False, "ptx_version": AOT_PTX_ISA})
        if compiled.metadata.shared <= MAX_SHARED or fixed.get("BLOCK_K", 16) <= 16:
            break
        fixed["BLOCK_K"] //= 2
    meta = compiled.metadata
    if getattr(meta, "global_scratch_size", 0) or getattr(meta, "profile_scratch_size", 0):
        raise ValueError("the kernel needs Triton scratch memory, which a TensorRT AOT plugin cannot provide")
    keep = len(stage.inputs) + len(stage.scalars) + len(stage.outputs)
    ptx = strip_hidden_params(compiled.asm["ptx"], keep)
    check_ptx_header(ptx, arch)
    return AotKernel(meta.name, ptx, meta.num_warps, meta.shared, len(entry_params(ptx)))

