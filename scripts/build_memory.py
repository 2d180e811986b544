"""Peak memory of `pkv-export build` versus the number of layers (weights are streamed layer by layer).

Builds a llama3-8b-shaped engine (or TensorRT-LLM checkpoint, `--backend trtllm --tp N --pp M`) with
deterministic random weights and N layers, each build in its own process, and reads the peak resident set size
of that process (VmHWM). Prints JSON and a Markdown table.

    python scripts/build_memory.py --layers 2 4 [--dtype fp16] [--model llama3-8b] [--backend trtllm --tp 2]
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import markdown_table, write_section  # noqa: E402


def measure(model: str, layers: int, dtype: str, workdir: Path, backend: str = "onnx", tp: int = 1,
            pp: int = 1) -> dict:
    out = workdir / f"{model}-{layers}l"
    shutil.rmtree(out, ignore_errors=True)
    # VmHWM, not ru_maxrss: a spawned process's ru_maxrss starts at its parent's peak.
    code = (
        "import sys; from pathlib import Path; from pkv_cli import main\n"
        "try:\n    main(sys.argv[1:])\nexcept SystemExit as e:\n"
        "    hwm = next(l for l in Path('/proc/self/status').read_text().splitlines() if l.startswith('VmHWM'))\n"
        "    print('PEAK_KB', hwm.split()[1], file=sys.stderr); raise\n"
    )
    args = [sys.executable, "-c", code, "build", "--model", model, "--random-weights", "--num-layers", str(layers),
            "--policy", "pyramidkv", "--dtype", dtype, "--backend", backend, "--tp", str(tp), "--pp", str(pp),
            "--out", str(out), "--json"]
    t0 = time.perf_counter()
    proc = subprocess.run(args, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"build failed: {proc.stderr.strip()}")
    peak_kb = int(next(line.split()[1] for line in proc.stderr.splitlines() if line.startswith("PEAK_KB")))
    manifest = json.loads(proc.stdout)
    engine_bytes = sum(f["bytes"] for f in manifest["files"])
    shutil.rmtree(out, ignore_errors=True)
    return {"model": model, "backend": backend if backend != "trtllm" else f"trtllm tp{tp} pp{pp}", "layers": layers,
            "dtype": dtype, "peak_rss_mib": round(peak_kb / 1024, 1),
            "engine_mib": round(engine_bytes / 2**20, 1), "build_seconds": round(seconds, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="llama3-8b")
    parser.add_argument("--layers", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--dtype", default="fp16", choices=["fp16", "fp32", "bf16"])
    parser.add_argument("--backend", default="onnx", choices=["onnx", "trtllm"])
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--no-doc", action="store_true", help="Do not write docs/benchmarks.md.")
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="pkv-build-mem-"))
    rows = [measure(args.model, n, args.dtype, workdir, args.backend, args.tp, args.pp) for n in args.layers]
    base = rows[0]
    for row in rows:
        row["peak_vs_first"] = round(row["peak_rss_mib"] / base["peak_rss_mib"], 3)
        row["engine_vs_first"] = round(row["engine_mib"] / base["engine_mib"], 3)
    print(json.dumps(rows, indent=2))
    print()
    columns = ["model", "backend", "layers", "dtype", "engine_mib", "peak_rss_mib", "engine_vs_first",
               "peak_vs_first", "build_seconds"]
    table = markdown_table(columns, rows)
    print(table)
    if not args.no_doc:
        command = "python scripts/build_memory.py " + shlex.join(sys.argv[1:])
        section = "build_memory" if args.backend == "onnx" else "build_memory_trtllm"
        write_section(section, f"## Build peak memory versus layer count ({args.backend})\n\n"
                      f"Command: `{command.strip()}`\n\n"
                      "Random-weight builds of the same architecture with more layers: the engine grows with the "
                      "layers, the build's peak resident memory does not (it is set by the largest tensor, the "
                      f"embedding).\n\n{table}\n")

if __name__ == "__main__":
    main()
