"""The one command a GPU host runs to prove the GPU half of pkv-export; on a machine without one it runs what it can.

    python scripts/gpu_acceptance.py [--contexts 4096 8192 16384 32768] [--report DIR]

Sections, each reported as passed / failed / skipped (with the reason):

1. environment: torch, CUDA device, triton, TensorRT, TensorRT-LLM, onnxruntime execution providers;
2. kernels: the Triton selection kernel against the op specification (tests/trt_plugins: the whole test matrix
   on CUDA when there is a GPU, under TRITON_INTERPRET=1 otherwise), and the AOT payload compiled for sm_90;
3. kernel benchmark (GPU): the kernel against the PyTorch specification on CUDA, LLaMA-3-8B head shapes;
4. TensorRT (GPU + TensorRT): `build --backend tensorrt` of the tiny presets (PyramidKV, StreamingLLM, FullKV),
   `compare` against the PyTorch reference (tokens, kept index sets, logits), then TensorRT against the
   onnxruntime engine (CUDA execution provider where onnxruntime-gpu is installed) for FullKV and PyramidKV;
5. TensorRT-LLM (GPU + TensorRT-LLM 1.2): `build --backend trtllm` of a small checkpoint, `compare` against the
   PyTorch reference (FullKV must pass; PyramidKV is reported: the runtime keeps one budget for every layer);
6. onnxruntime on CUDA (onnxruntime-gpu): the onnxruntime-only methods (KVzip's reconstruction Loop and
   per-head masks, PyramidInfer's gathering between layers and its generation-stage evictions) and PyramidKV on
   the CUDA execution provider against the PyTorch reference (tokens, kept index sets, logits within 1e-3).

Prints a JSON report, then Markdown; `--report DIR` also writes both there. Exit code 1 when a section that ran
failed, 0 otherwise (skipped sections are not failures; the report says what was skipped and why).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PKV = [sys.executable, "-c", "import sys; from pkv_cli import main; sys.argv[0] = 'pkv-export'; main()"]


def version(module: str) -> str | None:
    try:
        return getattr(importlib.import_module(module), "__version__", "installed")
    except Exception:  # noqa: BLE001 - any import failure means "not usable here"
        return None


def environment() -> dict:
    import torch

    env = {"python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.cuda.is_available(),
           "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
           "triton": version("triton"), "tensorrt": version("tensorrt"), "tensorrt_llm": version("tensorrt_llm")}
    try:
        import onnxruntime as ort

        env["onnxruntime_providers"] = ort.get_available_providers()
    except ImportError:
        env["onnxruntime_providers"] = []
    return env


def section(name: str, fn, *args) -> dict:
    t0 = time.perf_counter()
    try:
        result = fn(*args)
    except Skip as e:
        return {"section": name, "status": "skipped", "reason": str(e)}
    except Exception as e:  # noqa: BLE001 - the report records any failure, with its message
        return {"section": name, "status": "failed", "error": f"{type(e).__name__}: {e}"}
    return {"section": name, "status": result.pop("status", "passed"), "seconds": round(time.perf_counter() - t0, 1),
            **result}


class Skip(Exception):
    pass


def pytest_counts(stdout: str) -> dict:
    """{"passed": n, "failed": n, "skipped": n, "error": n} from pytest's last summary line."""
    summary = (stdout.strip().splitlines() or [""])[-1]
    counts = {k: 0 for k in ("passed", "failed", "skipped", "error")}
    for number, word in re.findall(r"(\d+) (passed|failed|skipped|errors?)", summary):
        counts["error" if word.startswith("error") else word] += int(number)
    return counts


def run_pytest(files: list[str], select: str | None, need_cuda_tests: bool) -> dict:
    """Run test files in a fresh interpreter; passed only when some tests ran and none failed, and (on a GPU) when
    none was skipped (a skipped CUDA test proves nothing)."""
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs", *files,
                        *(["-k", select] if select else [])], cwd=ROOT, capture_output=True, text=True)
    counts = pytest_counts(r.stdout)
    ok = r.returncode == 0 and counts["passed"] > 0 and not counts["failed"] and not counts["error"]
    if need_cuda_tests and counts["skipped"]:
        ok = False
    skipped = [line for line in r.stdout.splitlines() if line.startswith("SKIPPED")][:5]
    return {"status": "passed" if ok else "failed", **counts, "pytest": (r.stdout.strip().splitlines() or [""])[-1],
            **({"skipped_because": skipped} if skipped else {}),
            **({"failures": r.stdout[-3000:]} if not ok else {})}


def kernel_tests(env: dict, select: str | None) -> dict:
    """The selection kernel's test matrix against the op spec (on CUDA when there is a GPU, under the interpreter
    otherwise), the AOT payload's CPU checks and the plugin definitions as TensorRT validates them."""
    if not env["triton"]:
        raise Skip("the triton package is not installed (pip install -e '.[gpu]' or '.[dev]')")
    tests = ["tests/trt_plugins/test_triton_select.py", "tests/trt_plugins/test_trt_plugin.py",
             "tests/trt_plugins/test_trt_plugin_api.py"]
    result = run_pytest(tests, select, need_cuda_tests=False)
    return {**result, "device": "cuda" if env["cuda"] else "cpu (TRITON_INTERPRET=1)"}


def aot_payload(env: dict) -> dict:
    """The plugin's AOT payload as TensorRT runs it, without TensorRT: PTX compiled by this Triton (ISA 8.0,
    sm_80), loaded by the CUDA driver, launched with the plugin's launch parameters and argument list, equal to
    the op spec (tests/trt_plugins/test_aot_launch.py)."""
    if not env["cuda"] or not env["triton"]:
        raise Skip("needs a CUDA GPU and triton")
    from trt_plugins.aot_launch import loaders

    if not loaders():
        raise Skip("needs cuda-python (cuda.bindings) or CuPy to load PTX through the driver")
    result = run_pytest(["tests/trt_plugins/test_aot_launch.py"], None, need_cuda_tests=True)
    return {**result, "driver_bindings": [name for name, _ in loaders()]}


def kernel_benchmark(env: dict, contexts: list[int]) -> dict:
    """The Triton kernel against the PyTorch spec on CUDA, LLaMA-3-8B head shapes (32/8 heads x 128, C = 256,
    w = 8): median ms over 5 timed runs with CUDA events; failed when their kept indices differ."""
    if not env["cuda"] or not env["triton"]:
        raise Skip("needs a CUDA GPU and triton")
    import torch

    from trt_plugins.pyramidkv_select import pyramidkv_select
    from trt_plugins.triton_select import pyramidkv_select_triton

    rows = []
    for q in contexts:
        g = torch.Generator(device="cuda").manual_seed(0)
        queries = torch.randn(1, q, 32, 128, device="cuda", dtype=torch.float16, generator=g)
        keys = torch.randn(1, 8, q, 128, device="cuda", dtype=torch.float16, generator=g)
        values = torch.randn(1, 8, q, 128, device="cuda", dtype=torch.float16, generator=g)
        lengths, selected = torch.tensor([q], device="cuda"), torch.tensor([248], device="cuda")
        times, outs = {}, {}
        for name, fn in (("triton_kernel", pyramidkv_select_triton), ("torch_spec", pyramidkv_select)):
            outs[name] = fn(queries, keys, values, lengths, selected, 8)  # warm-up (compiles the kernel)
            samples = []
            for _ in range(5):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn(queries, keys, values, lengths, selected, 8)
                end.record()
                torch.cuda.synchronize()
                samples.append(start.elapsed_time(end))
            times[name] = sorted(samples)[len(samples) // 2]
        kept, want = outs["triton_kernel"][0].cpu(), outs["torch_spec"][0].cpu()
        rows.append({"context": q, **{f"{k}_ms": round(v, 3) for k, v in times.items()},
                     "speedup": round(times["torch_spec"] / times["triton_kernel"], 2),
                     "indices_equal": bool(torch.equal(kept, want)),
                     "kv_equal": bool(torch.equal(outs["triton_kernel"][1], outs["torch_spec"][1]))})
    return {"rows": rows, "status": "passed" if all(r["indices_equal"] and r["kv_equal"] for r in rows) else "failed"}


def tensorrt_checks(env: dict, workdir: Path) -> dict:
    if not env["cuda"]:
        raise Skip("needs a CUDA GPU")
    if not env["tensorrt"]:
        raise Skip("TensorRT is not installed (pip install --extra-index-url https://pypi.nvidia.com "
                   "'tensorrt-cu12==10.15.*')")
    rows = []
    for model, policy in (("tiny-llama3", "pyramidkv"), ("tiny-mistral", "pyramidkv"), ("tiny-llama3", "streamingllm"),
                          ("tiny-llama3", "full")):
        out = workdir / f"trt-{model}-{policy}"
        build = subprocess.run([*PKV, "build", "--backend", "tensorrt", "--model", model, "--policy", policy,
                                "--kv-budget", "32", "--window", "4", "--max-input-len", "1024", "--max-new-tokens",
                                "32", "--out", str(out)], capture_output=True, text=True)
        row = {"model": model, "policy": policy, "built": build.returncode == 0}
        if build.returncode != 0:
            row["error"] = build.stderr.strip()[-400:]
            rows.append(row)
            continue
        cmp = subprocess.run([*PKV, "compare", "--engine", str(out), "--prompt-len", "300", "--batch", "3",
                              "--max-new-tokens", "12", "--atol", "1e-3", "--json"], capture_output=True, text=True)
        row["compare"] = json.loads(cmp.stdout) if cmp.stdout.strip().startswith("{") else cmp.stderr.strip()[-400:]
        row["passed"] = cmp.returncode == 0
        rows.append(row)
    return {"rows": rows, "status": "passed" if all(r.get("passed") for r in rows) else "failed"}


def tensorrt_benchmark(env: dict, workdir: Path, contexts: list[int]) -> dict:
    if not env["cuda"] or not env["tensorrt"]:
        raise Skip("needs a CUDA GPU and TensorRT")
    from engines.prompts import synthetic_prompt_ids
    from engines.registry import open_engine

    backends = ["tensorrt"] + (["onnx"] if "CUDAExecutionProvider" in env["onnxruntime_providers"] else [])
    rows = []
    for policy in ("full", "pyramidkv"):
        for backend in backends:
            out = workdir / f"bench-{backend}-{policy}"
            args = ["build", "--backend", backend, "--model", "llama3-8b", "--random-weights", "--num-layers", "4",
                    "--policy", policy, "--dtype", "fp16", "--max-input-len", str(max(contexts)), "--out", str(out)]
            if backend == "tensorrt":
                args += ["--max-batch", "1", "--max-new-tokens", "64"]
            subprocess.run([*PKV, *args], check=True, capture_output=True)
            engine = open_engine(out, device="cuda")
            engine.eos_ids = set()
            for q in contexts:
                ids = synthetic_prompt_ids(engine.tokenizer, q)
                engine.generate([ids], 4)  # warm-up
                t = engine.generate([ids], 33).timings
                rows.append({"backend": backend, "policy": policy, "context": q, "prefill_s": round(t["prefill"], 4),
                             "decode_ms": round(1000 * t["decode"] / 32, 3)})
            del engine
    return {"rows": rows}


def trtllm_checks(env: dict, workdir: Path) -> dict:
    """TensorRT-LLM 1.2: a tiny checkpoint (written as a Hugging Face directory, since its PyTorch backend loads
    those) built with `--backend trtllm`, then `compare` against the PyTorch reference for FullKV (exact up to
    tolerance) and PyramidKV (the runtime keeps the largest layer budget everywhere, so the kept sets differ from
    the reference's per-layer ones: tokens are reported, not required equal), then throughput."""
    if not env["cuda"]:
        raise Skip("needs a CUDA GPU")
    if not (env["tensorrt_llm"] or "").startswith("1.2"):
        raise Skip("TensorRT-LLM 1.2 is not installed (pip install --extra-index-url https://pypi.nvidia.com "
                   "'tensorrt-llm==1.2.*')")
    sys.path.insert(0, str(ROOT / "scripts"))
    from bench_peers import make_checkpoint

    checkpoint = make_checkpoint(workdir / "hf-checkpoint")
    rows = []
    for policy in ("full", "pyramidkv"):
        out = workdir / f"trtllm-{policy}"
        build = subprocess.run([*PKV, "build", "--backend", "trtllm", "--model", str(checkpoint), "--policy", policy,
                                "--kv-budget", "128", "--window", "8", "--dtype", "bf16", "--out", str(out)],
                               capture_output=True, text=True)
        row = {"policy": policy, "built": build.returncode == 0}
        if build.returncode == 0:
            cmp = subprocess.run([*PKV, "compare", "--engine", str(out), "--model", str(checkpoint), "--prompt-len",
                                  "2000", "--max-new-tokens", "16", "--atol", "5e-2", "--min-index-agreement", "0",
                                  "--json"], capture_output=True, text=True)
            row["compare"] = json.loads(cmp.stdout) if cmp.stdout.strip().startswith("{") else cmp.stderr[-400:]
            row["passed"] = cmp.returncode == 0 or policy != "full"
        else:
            row["error"] = build.stderr.strip()[-400:]
        rows.append(row)
    return {"rows": rows, "status": "passed" if all(r.get("passed") for r in rows) else "failed"}


def onnx_cuda_checks(env: dict, workdir: Path) -> dict:
    if "CUDAExecutionProvider" not in env["onnxruntime_providers"]:
        raise Skip("needs onnxruntime-gpu and a CUDA GPU (pip install 'pkv-export[gpu]')")
    sys.path.insert(0, str(ROOT))
    from engines.compare import compare_results
    from engines.ort_engine import OrtEngine
    from engines.reference import ReferenceEngine
    from exporter.checkpoint import load_model
    from exporter.onnx.export import build_onnx_engine
    from exporter.policies import make_policy

    cases = [("pyramidkv", {"kv_budget": 32, "window": 4}), ("kvzip", {"kv_budget": 32, "score_chunk": 64}),
             ("pyramidinfer", {"min_context": 8, "recent_ratio": 0.05, "update_interval": 3})]
    prompts = ["The quick brown fox jumps over the lazy dog while the cat naps in the sun. " * 3, "A short one."]
    rows = []
    for model in ("tiny-llama3", "tiny-mistral"):
        loaded = load_model(model)
        for name, kw in cases:
            policy = make_policy(name, **kw)
            out = workdir / f"cuda-{model}-{name}"
            build_onnx_engine(loaded, policy, out, max_input_len=1024)
            got = OrtEngine(out, device="cuda").generate(prompts, 24, return_logits=True, return_indices=True)
            want = ReferenceEngine(loaded, policy).generate(prompts, 24, return_logits=True, return_indices=True)
            result = compare_results(got, want, "onnxruntime-cuda", atol=1e-3)
            rows.append({"model": model, "policy": name, "passed": result.passed,
                         "tokens_equal": result.tokens_equal, "max_abs_logit_diff": result.max_abs_logit_diff,
                         "index_agreement": result.index_agreement})
    return {"rows": rows, "status": "passed" if all(r["passed"] for r in rows) else "failed"}


def markdown(report: dict) -> str:
    lines = ["# GPU acceptance", "", "Environment: " + ", ".join(f"{k}={v}" for k, v in report["environment"].items()),
             "", "| section | status | detail |", "|---|---|---|"]
    for s in report["sections"]:
        detail = s.get("reason") or s.get("error") or s.get("pytest") or f"{len(s.get('rows', []))} rows"
        lines.append(f"| {s['section']} | {s['status']} | {str(detail).replace('|', '/')} |")
    for s in report["sections"]:
        if s.get("rows"):
            keys = [k for k in s["rows"][0] if k not in ("compare", "error")]
            lines += ["", f"## {s['section']}", "", "| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
            lines += ["| " + " | ".join(str(r.get(k)) for k in keys) + " |" for r in s["rows"]]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--contexts", type=int, nargs="+", default=[4096, 8192, 16384, 32768])
    parser.add_argument("--report", type=Path, default=None, help="Also write report.json and report.md here.")
    parser.add_argument("-k", dest="select", default=None, help="Only the kernel tests matching this (pytest -k).")
    args = parser.parse_args()
    os.chdir(ROOT)
    env = environment()
    with tempfile.TemporaryDirectory(prefix="pkv-gpu-acceptance-") as tmp:
        work = Path(tmp)
        sections = [section("kernels vs spec", kernel_tests, env, args.select),
                    section("AOT payload through the CUDA driver", aot_payload, env),
                    section("kernel benchmark", kernel_benchmark, env, args.contexts),
                    section("tensorrt build + compare", tensorrt_checks, env, work),
                    section("tensorrt vs onnxruntime", tensorrt_benchmark, env, work, args.contexts),
                    section("tensorrt-llm build + compare", trtllm_checks, env, work),
                    section("onnxruntime CUDA: KVzip, PyramidInfer, PyramidKV vs reference", onnx_cuda_checks, env,
                            work)]
    report = {"environment": env, "sections": sections,
              "mode": "gpu" if env["cuda"] else "no-gpu: kernels under the interpreter only"}
    print(json.dumps(report, indent=2, default=str))
    text = markdown(report)
    print(text)
    if args.report:
        args.report.mkdir(parents=True, exist_ok=True)
        (args.report / "report.json").write_text(json.dumps(report, indent=2, default=str))
        (args.report / "report.md").write_text(text)
    return 1 if any(s["status"] == "failed" for s in sections) else 0


if __name__ == "__main__":
    sys.exit(main())
