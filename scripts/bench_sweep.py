"""`pkv-export sweep` with one prefill per sample (the default) against the same sweep run cell by cell
(`--no-shared-prefill`): N budgets x M methods that share a prefill (StreamingLLM, H2O, SnapKV, PyramidKV,
ChunkKV select after the full prefill; KVzip's budgets share its scoring pass), the same NIAH samples.

Each sweep runs as a process of its own into a fresh directory and is timed whole (model load, engine builds, every
sample, reports): the shared sweep prefills each sample once per group and builds one engine per group (FullKV's
with the capture graph; KVzip's with its scoring capture) whatever N x M is; the cell-by-cell sweep prefills each
sample once per cell and builds one engine per cell (`--engine-backend onnx`). Both runs are measured in the same
invocation, alternating their order over `--rounds`; after them the records are compared (equal apart from
timings: the script fails otherwise). Prints JSON, then a
Markdown table, and writes it to docs/benchmarks.md (`--no-doc` to skip).

    python scripts/bench_sweep.py --model smollm2-135m --policies streamingllm,snapkv,pyramidkv,chunkkv \\
        --budgets 64,128,256 --lengths 1024 --depths 25,75 --max-new-tokens 8 [--engine-backend onnx] [--no-doc]
"""

from __future__ import annotations

import argparse
import json
import resource
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import markdown_table, write_section  # noqa: E402

MODES = {"shared": [], "cell-by-cell": ["--no-shared-prefill"]}


def cli(*args: str) -> list[str]:
    return [sys.executable, "-c", "import sys; from pkv_cli import main; sys.argv[0] = 'pkv-export'; main()", *args]


def sweep_args(a: argparse.Namespace, out: Path) -> list[str]:
    return ["sweep", "--model", a.model, "--policies", a.policies, "--budgets", a.budgets, "--window", str(a.window),
            "--suite", "niah", "--lengths", a.lengths, "--depths", a.depths, "--max-new-tokens",
            str(a.max_new_tokens), "--engine-backend", a.engine_backend, "--out", str(out), "--json"]


def timeless(out: Path) -> tuple[dict, dict]:
    """(every cell's records without their timings, sweep.json without its timings and plots)."""
    records = {}
    for cell in sorted((out / "cells").iterdir()):
        rows = (cell / "samples.jsonl").read_text().splitlines()
        records[cell.name] = [{k: v for k, v in json.loads(r).items() if k != "engine_seconds"} for r in rows]
    summary = json.loads((out / "sweep.json").read_text())
    summary.pop("plots", None)
    for row in summary["cells"]:
        row.pop("seconds")
    return records, summary


def prefills_per_sample(a: argparse.Namespace) -> int:
    """A shared sweep's prefills per sample: one per group of cells sharing one (`prefill_group`), one per other
    cell."""
    from validate.sweep import parse_cells

    groups = [c.policy.prefill_group for c in parse_cells(a.policies, a.budgets, a.window)]
    return len({g for g in groups if g is not None}) + groups.count(None)


def run_once(a: argparse.Namespace, mode: str, work: Path) -> dict:
    out = work / mode
    shutil.rmtree(out, ignore_errors=True)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run(cli(*sweep_args(a, out), *MODES[mode]), capture_output=True, text=True)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime  # the sweep process's CPU time
    if proc.returncode != 0:
        raise SystemExit(f"{mode} sweep failed ({proc.returncode}): {proc.stderr[-2000:]}")
    summary = json.loads(proc.stdout)
    engines = out / "engines"
    built = sorted(p.name for p in engines.iterdir()) if engines.is_dir() else []
    cells = len(summary["cells"])
    return {"mode": mode, "wall_s": round(wall, 1), "cpu_s": round(cpu, 1), "cells": cells,
            "samples": summary["samples"],
            "prefills": summary["samples"] * (prefills_per_sample(a) if mode == "shared" else cells),
            "cell_seconds": round(sum(c["seconds"] or 0 for c in summary["cells"]), 1),
            "engines_built": len(built),
            "engine_bytes": sum(f.stat().st_size for f in engines.rglob("*") if f.is_file()) if built else 0,
            "out": out}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--policies", default="streamingllm,snapkv,pyramidkv,chunkkv")
    parser.add_argument("--budgets", default="64,128,256")
    parser.add_argument("--window", type=int, default=8)
    parser.add_argument("--lengths", default="1024")
    parser.add_argument("--depths", default="25,75")
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--engine-backend", choices=["onnx", "reference"], default="onnx")
    parser.add_argument("--rounds", type=int, default=1, help="Runs of each mode, alternating which goes first.")
    parser.add_argument("--no-doc", action="store_true", help="Do not write docs/benchmarks.md.")
    a = parser.parse_args()

    runs: dict[str, list[dict]] = {mode: [] for mode in MODES}
    with tempfile.TemporaryDirectory(prefix="bench-sweep-") as tmp:
        work = Path(tmp)
        for r in range(a.rounds):
            order = list(MODES) if r % 2 == 0 else list(MODES)[::-1]
            for mode in order:
                print(f"round {r + 1}/{a.rounds}: {mode} sweep ...", file=sys.stderr, flush=True)
                runs[mode].append(run_once(a, mode, work))
        equal = timeless(runs["shared"][-1]["out"]) == timeless(runs["cell-by-cell"][-1]["out"])
    if not equal:
        raise SystemExit("the shared sweep's records differ from the cell-by-cell sweep's")

    rows = []
    for results in runs.values():
        best = min(results, key=lambda x: x["wall_s"])
        rows.append({**{k: v for k, v in best.items() if k not in ("out", "engine_bytes")},
                     "engine_MiB": round(best["engine_bytes"] / 2**20), "wall_s_all": [x["wall_s"] for x in results]})
    shared, alone = rows
    result = {"settings": {k: v for k, v in vars(a).items() if k != "no_doc"}, "runs": rows,
              "records_equal": equal, "speedup_wall": round(alone["wall_s"] / shared["wall_s"], 2),
              "speedup_cpu": round(alone["cpu_s"] / shared["cpu_s"], 2),
              "speedup_cell_seconds": round(alone["cell_seconds"] / max(shared["cell_seconds"], 1e-9), 2)}
    print(json.dumps(result, indent=2, default=str))

    command = "python scripts/bench_sweep.py " + " ".join(
        f"--{k.replace('_', '-')} {shlex.quote(str(v))}" for k, v in result["settings"].items())
    table = markdown_table(["mode", "cells", "samples", "prefills", "engines_built", "engine_MiB", "cell_seconds",
                            "cpu_s", "wall_s", "wall_s_all"], rows)
    from methods import POLICIES

    names = [p.strip() for p in a.policies.split(",") if p.strip()]
    # one section per model and backend, and per method set when it is not only the observation group's
    tag = "" if all(POLICIES[n]().shares_prefill for n in names) else "-".join(names)
    body = (f"## Sweep: one prefill per sample vs every cell alone ({a.model}, {a.engine_backend}"
            f"{', ' + tag if tag else ''})\n\n"
            f"```bash\n{command}\n```\n\n{table}\n\n"
            f"Cell-by-cell / shared: {result['speedup_wall']}x the wall time, {result['speedup_cpu']}x the CPU "
            f"time, {result['speedup_cell_seconds']}x the summed cell seconds (prefill, selection and decode of "
            "every sample, wall clock; a shared prefill is counted once, split among its cells); records equal "
            f"apart from timings: {str(equal).lower()}. `wall_s` / `cpu_s`: each sweep's whole process (user + "
            "system CPU for `cpu_s`): model load, engine builds (one per cell when cell by cell; one per group "
            "when shared: FullKV's engine with the capture graph, KVzip's with its scoring capture), samples, "
            "reports. The machine is shared with other jobs: `cpu_s` is the steadier comparison.")
    print("\n" + body)
    if not a.no_doc:
        write_section(f"bench_sweep_{a.model}_{a.engine_backend}{'_' + tag if tag else ''}", body)


if __name__ == "__main__":
    main()
