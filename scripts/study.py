"""The accuracy-versus-compression study on the real model (SmolLM2-135M-Instruct, the `smollm2-135m` preset): one
command that runs every sweep, then writes the tables and plots of docs/study.md's results.

    python scripts/study.py --out runs/study            # the whole study (47 min on 2 cores: docs/study.md)
    python scripts/study.py --out runs/study --quick    # a few minutes: the same steps on a tiny grid

Steps (each a `pkv-export sweep` run in a process of its own, resumed if its directory exists):
  niah        NIAH at 1k/2k/4k tokens x depths 0/25/50/75/100 (15 samples), every method, budgets 64-1024 (fp32)
  ruler       RULER's six tasks at 1k tokens, one sample each, answers of up to 64 tokens, the same cells
  niah-int4   NIAH at 1k/2k x depths 0/50/100 (6 samples) on int4 weights (as `build --weights int4` stores them)
  window-W    SnapKV and PyramidKV at C = 64/128/256 on NIAH 1k/2k with observation windows W = 8, 16, 32, 64
Then: docs/study-results.md (generated tables: score per method and budget, per length / task, int4 beside fp32,
the ordering against the PyramidKV paper's, the window table, each step's time) and docs/img/study/*.png (the sweeps'
heatmaps and accuracy-versus-KV-bytes plots). Prints the results as JSON too.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

from bench_common import markdown_table  # scripts/ is on the path of a script run from it

ROOT = Path(__file__).resolve().parent.parent
METHODS = "full,streamingllm,h2o,snapkv,pyramidkv,chunkkv,kvzip,pyramidinfer"
# The PyramidKV paper's LongBench ordering at small budgets (its Table 1, LLaMA-3-8B-Instruct, KV size 64-128).
PAPER_ORDER = ["full", "pyramidkv", "snapkv", "h2o", "streamingllm"]


def steps(a: argparse.Namespace) -> dict[str, list[str]]:
    """Step name -> sweep arguments (without --out)."""
    common = ["--model", a.model, "--max-input-len", str(a.max_input_len), "--json"]
    niah = ["--suite", "niah", "--lengths", a.niah_lengths, "--depths", a.depths]
    out = {
        "niah": ["--policies", METHODS, "--budgets", a.budgets, "--window", str(a.window), *niah, *common],
        "ruler": ["--policies", METHODS, "--budgets", a.budgets, "--window", str(a.window), "--suite", "ruler",
                  "--lengths", a.ruler_lengths, "--limit", str(a.ruler_limit), "--max-new-tokens",
                  str(a.ruler_new_tokens), *common],
        "niah-int4": ["--policies", METHODS, "--budgets", a.budgets, "--window", str(a.window), "--suite", "niah",
                      "--lengths", a.int4_lengths, "--depths", a.int4_depths, "--weights", "int4", *common],
    }
    for w in a.windows:
        budgets = ",".join(b for b in a.window_budgets.split(",") if int(b) > w)
        out[f"window-{w}"] = ["--policies", "snapkv,pyramidkv", "--budgets", budgets, "--window", str(w), "--suite",
                              "niah", "--lengths", a.window_lengths, "--depths", a.depths, *common]
    return out


class StepClock:
    """A step's wall time over every run of the study, interrupted ones included: OUT/study-time.json holds
    {step: seconds}, rewritten every `every` seconds while the step runs (so a killed run loses at most that)."""

    def __init__(self, out: Path, name: str, every: float = 15.0):
        self.path, self.name, self.every = out / "study-time.json", name, every
        self.before = self.read().get(name, 0.0)
        self.started = time.monotonic()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._beat, daemon=True)

    def read(self) -> dict[str, float]:
        return json.loads(self.path.read_text()) if self.path.is_file() else {}

    def total(self) -> float:
        return self.before + time.monotonic() - self.started

    def write(self) -> float:
        seconds = round(self.total(), 1)
        times = self.read() | {self.name: seconds}
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(times, indent=1))
        tmp.replace(self.path)
        return seconds

    def _beat(self) -> None:
        while not self.stop.wait(self.every):
            self.write()

    def __enter__(self) -> StepClock:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()
        self.final = self.write()


def run_sweep(name: str, args: list[str], out: Path) -> dict:
    where = out / name
    command = [sys.executable, "-c", "import sys; from pkv_cli import main; sys.argv[0] = 'pkv-export'; main()",
               "sweep", *args, "--out", str(where)]
    if (where / "sweep-config.json").is_file():
        command.append("--resume")
    print(f"[study] {name}: {' '.join(command[3:])}", file=sys.stderr, flush=True)
    with StepClock(out, name) as clock:
        result = subprocess.run(command, stdout=subprocess.PIPE, text=True)
    if result.returncode != 0:
        raise SystemExit(f"[study] {name} failed (exit {result.returncode}); rerun to resume it")
    summary = json.loads(result.stdout)
    summary["study_seconds"] = clock.final  # every run of this step, this one included
    summary["run_seconds"] = round(clock.final - clock.before, 1)
    return summary


def score_table(summary: dict, by: str | set[str]) -> tuple[list[str], list[list[str]]]:
    """Rows: methods; columns: budgets (FullKV and PyramidInfer have one cell each); `by`: overall or a group key
    prefix ('L1024', a RULER task)."""
    cells = summary["cells"]
    budgets = sorted({c["kv_budget"] for c in cells if c["kv_budget"] is not None})
    rows = []
    for method in METHODS.split(","):
        mine = [c for c in cells if c["policy"] == method]
        if not mine:
            continue
        row = [method]
        for b in budgets:
            cell = next((c for c in mine if c["kv_budget"] in (b, None)), None)
            row.append("-" if cell is None else f"{pick(cell, by):.2f}")
        ratio = [c["kv_ratio"] for c in mine if c["kv_ratio"] is not None]
        row.append(f"{min(ratio):.3f}-{max(ratio):.3f}" if ratio else "-")
        rows.append(row)
    return ["method", *[f"C={b}" for b in budgets], "KV vs FullKV"], rows


def pick(cell: dict, by: str | set[str]) -> float:
    """The cell's score: overall, over the groups starting with `by`, or over the groups in the set `by`."""
    if by == "overall":
        return cell["score"]
    chosen = (lambda k: k in by) if isinstance(by, set) else (lambda k: k.startswith(by))
    values = [v for k, v in cell["groups"].items() if chosen(k)]
    return sum(values) / len(values)


def markdown(columns: list[str], rows: list[list[str]]) -> str:
    """A table of rows given as lists (bench_common's rows are dicts)."""
    return markdown_table(columns, [dict(zip(columns, r, strict=True)) for r in rows]) + "\n"


def ordering(summary: dict, budget: int) -> dict:
    """Each relation of the paper's chain at one budget: held (>= for the first two, > after) or not."""
    score = {c["policy"]: c["score"] for c in summary["cells"] if c["kv_budget"] in (budget, None)}
    out = {}
    for i, (a, b) in enumerate(zip(PAPER_ORDER, PAPER_ORDER[1:], strict=False)):
        if a in score and b in score:
            strict = i >= 2
            held = score[a] > score[b] if strict else score[a] >= score[b]
            out[f"{a} {'>' if strict else '>='} {b}"] = {"held": held, a: score[a], b: score[b]}
    return out


def groups_of(summary: dict) -> list[str]:
    keys = sorted({k.split("-")[0] if summary["suite"] == "niah" else k.split("/")[0]
                   for c in summary["cells"] for k in c["groups"]},
                  key=lambda k: (len(k), k))
    return keys


def write_results(results: dict[str, dict], a: argparse.Namespace, doc: Path, images: Path) -> None:
    images.mkdir(parents=True, exist_ok=True)
    parts = ["# Study results (generated by `python scripts/study.py`)\n",
             f"Command: `python scripts/study.py {' '.join(sys.argv[1:])}`; model `{a.model}`; observation window "
             f"{a.window} for the main sweeps. Scores are the suites' own (NIAH: fraction of the answer's words "
             "recovered, 0-1; RULER: string_match_all, 0-100). The analysis is in docs/study.md.\n"]
    for name, summary in results.items():
        if name.startswith("window-"):
            continue
        parts.append(f"## {name}: {summary['samples']} samples, {summary['study_seconds'] / 60:.1f} min\n")
        parts.append(markdown(*score_table(summary, "overall")))
        for group in groups_of(summary):
            parts.append(f"\n{group}:\n\n" + markdown(*score_table(summary, group)))
        for plot in summary.get("plots", []):
            target = images / f"{name}-{plot}"
            shutil.copy(Path(a.out) / name / plot, target)
            parts.append(f"\n![{name} {plot}](img/study/{target.name})\n")
        for budget in (64, 128):
            rel = ordering(summary, budget)
            if rel:
                said = "; ".join(f"{k}: {'yes' if v['held'] else 'NO'}" for k, v in rel.items())
                parts.append(f"\nPaper's ordering at C={budget}: {said}\n")
    if "niah" in results and "niah-int4" in results:
        same = {k for c in results["niah-int4"]["cells"] for k in c["groups"]}  # fp32 on the int4 sweep's samples
        parts.append(f"## int4 weights beside fp32 (NIAH, the {len(same)} samples of the int4 sweep: "
                     f"{', '.join(sorted(same))})\n")
        fp, q4 = score_table(results["niah"], same), score_table(results["niah-int4"], "overall")
        rows = [[r[0], *[f"{x} / {y}" for x, y in zip(r[1:-1], s[1:-1], strict=True)]]
                for r, s in zip(fp[1], q4[1], strict=True)]
        parts.append(markdown(["method (fp32 / int4)", *fp[0][1:-1]], rows))
    windows = {n: s for n, s in results.items() if n.startswith("window-")}
    if windows:
        parts.append("## Observation window (NIAH, SnapKV and PyramidKV)\n")
        cells = sorted({c["cell"] for s in windows.values() for c in s["cells"]},
                       key=lambda c: (c.split("-C")[0], int(c.split("-C")[1])))
        rows = []
        for name, s in sorted(windows.items(), key=lambda kv: int(kv[0].split("-")[1])):
            score = {c["cell"]: c["score"] for c in s["cells"]}
            rows.append([name.removeprefix("window-"), *[f"{score[c]:.2f}" if c in score else "-" for c in cells]])
        parts.append(markdown(["window", *cells], rows))
    parts.append("## Time per step\n\nWall time over every run of each step (a resumed study adds its earlier runs, "
                 "kept in OUT/study-time.json).\n")
    parts.append(markdown(["step", "samples", "minutes"],
                          [[n, str(s["samples"]), f"{s['study_seconds'] / 60:.1f}"] for n, s in results.items()]))
    total = sum(s["study_seconds"] for s in results.values()) / 60
    parts.append(f"Total: {total:.1f} min.\n")
    doc.write_text("\n".join(parts))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="directory of the sweeps (resumed when rerun)")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--budgets", default="64,128,256,512,1024")
    p.add_argument("--window", type=int, default=32, help="observation window of the main sweeps")
    p.add_argument("--niah-lengths", default="1024,2048,4096")
    p.add_argument("--depths", default="0,25,50,75,100")
    p.add_argument("--ruler-lengths", default="1024")
    p.add_argument("--ruler-limit", type=int, default=1, help="RULER samples per task and length")
    p.add_argument("--ruler-new-tokens", type=int, default=64, help="RULER answer length of every task")
    p.add_argument("--int4-lengths", default="1024,2048")
    p.add_argument("--int4-depths", default="0,50,100")
    p.add_argument("--windows", type=int, nargs="*", default=[8, 16, 32, 64])
    p.add_argument("--window-budgets", default="64,128,256")
    p.add_argument("--window-lengths", default="1024,2048")
    p.add_argument("--max-input-len", type=int, default=4096)
    p.add_argument("--steps", nargs="*", default=None, help="run only these steps (names as above)")
    p.add_argument("--quick", action="store_true", help="a tiny grid: checks the pipeline in minutes")
    p.add_argument("--doc", type=Path, default=ROOT / "docs" / "study-results.md")
    p.add_argument("--no-doc", action="store_true")
    a = p.parse_args()
    if a.quick:
        a.budgets, a.niah_lengths, a.depths, a.ruler_lengths, a.ruler_limit = "64,128", "1024", "50", "1024", 1
        a.int4_lengths, a.int4_depths = "1024", "50"
        a.windows, a.window_budgets, a.window_lengths = [8, 32], "64,128", "1024"
    plan = steps(a)
    unknown = [name for name in a.steps or [] if name not in plan]
    if unknown:  # usage errors exit 2 before anything is written
        p.error(f"unknown step {unknown[0]!r} (steps: {', '.join(plan)})")
    if a.out.exists() and not a.out.is_dir():
        p.error(f"--out {a.out} is a file, not a directory")
    a.out.mkdir(parents=True, exist_ok=True)
    results = {}
    for name in a.steps or plan:
        results[name] = run_sweep(name, plan[name], a.out)
    print(json.dumps({n: {"seconds": s["study_seconds"], "cells": {c["cell"]: c["score"] for c in s["cells"]}}
                      for n, s in results.items()}, indent=2))
    if not a.no_doc:
        write_results(results, a, a.doc, a.doc.parent / "img" / "study")
        print(f"[study] wrote {a.doc}", file=sys.stderr)


if __name__ == "__main__":
    main()
