"""Quantized weights (`build --weights int8|int4`) against fp32, with FullKV and PyramidKV, and against
onnxruntime-genai's int4 model of the same checkpoint; then what each compression costs in accuracy.

Speed (the checkpoint of scripts/bench_peers.py: LLaMA-shaped, random weights, 8 layers, hidden 512, 8/2 heads x 64,
MLP 1536, fp32): pkv-export engines for fp32 / int8 / int4 (block 32, symmetric) x FullKV / PyramidKV (C=128,
w=8), and genai's `-p int4` model, all from that directory. Per engine: its size on disk and the build's peak
RSS (the build in a process of its own). Per context (batch 1) and 4k at batch 8: prefill seconds and decode
ms/token, each run in a process of its own, engines interleaved over rounds (order reversed every other round),
medians.

Accuracy (`--accuracy`): the trained preset tiny-retriever, NIAH default grid and a key-value lookup, for fp32 /
int8 / int4 (block 32) under FullKV and PyramidKV C=256 (`pkv-export validate --engine`, no reference).

Prints JSON, then Markdown tables and the targets of issue 24, and writes them to docs/benchmarks.md (`--no-doc`
to skip). onnxruntime-genai comes with the `bench` extra.

    python scripts/bench_weights.py [--contexts 1024 4096 8192] [--rounds 2] [--accuracy] [--no-doc]
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_peers  # noqa: E402
from bench_common import markdown_table, write_section  # noqa: E402

# name -> build flags; "a4": MatMulNBits at accuracy level 4 (int8 activations, as genai's CPU int4 default)
WEIGHTS = {"fp32": [], "int8": ["--weights", "int8", "--block-size", "32"],
           "int4": ["--weights", "int4", "--block-size", "32"],
           "int8a4": ["--weights", "int8", "--block-size", "32", "--accuracy-level", "4"],
           "int4a4": ["--weights", "int4", "--block-size", "32", "--accuracy-level", "4"]}
POLICIES = {"full": [], "pyramidkv": ["--kv-budget", "128", "--window", "8"]}
ACCURACY_POLICIES = {"full": [], "pyramidkv": ["--kv-budget", "256", "--window", "32"]}
KV_LOOKUP = ["--needle", "The magic number of Winnipeg is 90316.", "--question",
             "What is the magic number of Winnipeg?", "--answer", "90316", "--lengths", "1008,4032",
             "--depths", "0,50,100"]


def cli(*args: str) -> list[str]:
    return [sys.executable, "-c", "import sys; from pkv_cli import main; sys.argv[0] = 'pkv-export'; main()", *args]


def build_peak(cmd: list[str]) -> float:
    """Peak RSS (MiB) of a build run as its own process: VmHWM read by the process itself at its end."""
    code = ("import sys, runpy, pathlib\n"
            "from pkv_cli import main\n"
            "sys.argv = ['pkv-export', *sys.argv[1:]]\n"
            "try:\n    main()\nexcept SystemExit as e:\n    code = e.code\nelse:\n    code = 0\n"
            "status = pathlib.Path('/proc/self/status').read_text().splitlines()\n"
            "hwm = next(line for line in status if line.startswith('VmHWM'))\n"
            "print('PEAK', int(hwm.split()[1]) / 1024, file=sys.stderr)\n"
            "sys.exit(code)\n")
    r = subprocess.run([sys.executable, "-c", code, *cmd], capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"build failed: {r.stderr.strip().splitlines()[-2:]}")
    return float(next(line.split()[1] for line in r.stderr.splitlines() if line.startswith("PEAK")))


def engine_mib(path: Path) -> float:
    return round(sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20, 2)


def build_engines(checkpoint: Path, work: Path, max_len: int) -> tuple[dict[str, Path], list[dict]]:
    engines, builds = {}, []
    for weights in WEIGHTS:
        for policy, flags in POLICIES.items():
            name = f"pkv-{policy}-{weights}"
            out = work / name
            peak = build_peak(["build", "--model", str(checkpoint), "--policy", policy, *flags,
                               *WEIGHTS[weights], "--max-input-len", str(max_len), "--out", str(out)])
            engines[name] = out
            builds.append({"engine": name, "weights": weights, "policy": policy, "engine_mib": engine_mib(out),
                           "build_peak_rss_mib": round(peak, 1)})
    out = bench_peers.build_genai(checkpoint, work / "genai-int4", "int4")
    if out is None:
        return engines, builds
    engines["genai-int4"] = out
    builds.append({"engine": "genai-int4", "weights": "int4 (genai)", "policy": "full", "engine_mib": engine_mib(out)})
    return engines, builds


def speed(engines: dict[str, Path], work: Path, cases: list[tuple[int, int]], args) -> list[dict]:
    from engines.prompts import synthetic_prompt_ids
    from exporter.tokenizer import byte_level_tokenizer

    tokenizer = byte_level_tokenizer()
    rows = []
    for context, batch in cases:
        ids_file = work / f"ids-{context}-{batch}.npy"
        np.save(ids_file, np.array([synthetic_prompt_ids(tokenizer, context, seed=b) for b in range(batch)]))
        runs: dict[str, list[dict]] = {name: [] for name in engines}
        for r in range(args.rounds):
            for name in list(engines) if r % 2 == 0 else list(engines)[::-1]:
                kind = "genai" if name.startswith("genai") else "pkv"
                runs[name].append(bench_peers.measure(kind, engines[name], ids_file, args.new_tokens, args.timeout))
                print(f"context={context} batch={batch} round={r} {name}: {runs[name][-1].get('decode_ms')}",
                      file=sys.stderr)
        for name, results in runs.items():
            ok = [x for x in results if "error" not in x]
            row = {"engine": name, "context": context, "batch": batch}
            if not ok:
                rows.append({**row, "error": results[0]["error"]})
                continue
            rows.append({**row, "prefill_s": round(statistics.median(x["prefill_s"] for x in ok), 3),
                         "decode_ms": round(statistics.median(x["decode_ms"] for x in ok), 2),
                         "peak_rss_mib": max(x["peak_rss_mib"] for x in ok)})
    by = {(r["engine"], r["context"], r["batch"]): r for r in rows if "decode_ms" in r}
    for (name, context, batch), row in by.items():
        if name.startswith("pkv-"):
            fp32 = by.get((name.rsplit("-", 1)[0] + "-fp32", context, batch))
            if fp32:
                row["decode_speedup_vs_fp32"] = round(fp32["decode_ms"] / row["decode_ms"], 2)
            genai = by.get(("genai-int4", context, batch))
            if genai:
                row["decode_speedup_vs_genai_int4"] = round(genai["decode_ms"] / row["decode_ms"], 2)
    return rows


def accuracy(work: Path) -> list[dict]:
    rows = []
    for weights in ("fp32", "int8", "int4", "int4a4"):
        for policy, flags in ACCURACY_POLICIES.items():
            out = work / f"retriever-{policy}-{weights}"
            r = subprocess.run(cli("build", "--model", "tiny-retriever", "--policy", policy, *flags,
                                   *WEIGHTS[weights], "--out", str(out)), capture_output=True, text=True)
            if r.returncode != 0:
                raise SystemExit(f"build failed: {r.stderr.strip()}")
            row = {"weights": weights, "policy": policy + ("" if policy == "full" else " C=256")}
            for suite, extra in (("niah_default_grid", []), ("kv_lookup", KV_LOOKUP)):
                run = work / f"run-{policy}-{weights}-{suite}"
                r = subprocess.run(cli("validate", "--engine", str(out), "--suite", "niah", "--reference", "none",
                                       *extra, "--out", str(run), "--json"), capture_output=True, text=True)
                if r.returncode != 0:
                    raise SystemExit(f"validate failed: {r.stderr.strip()}")
                summary = json.loads((run / "summary.json").read_text())
                row[suite] = summary["overall"]["engine_score"]
            rows.append(row)
            print(row, file=sys.stderr)
    return rows


def targets(builds: list[dict], rows: list[dict]) -> list[str]:
    size = {b["engine"]: b["engine_mib"] for b in builds}
    by = {(r["engine"], r["context"], r["batch"]): r for r in rows if "decode_ms" in r}
    lines = []

    def check(label: str, values: list[tuple[str, float]], ok) -> None:
        if values:
            shown = ", ".join(f"{k}: {v}" for k, v in values)
            lines.append(f"- {'met' if all(ok(v) for _, v in values) else 'MISSED'}: {label} ({shown})")

    for policy in POLICIES:
        if f"pkv-{policy}-fp32" in size:
            check(f"int4 engine <= 0.16x fp32's size ({policy})",
                  [(policy, round(size[f"pkv-{policy}-int4"] / size[f"pkv-{policy}-fp32"], 3))], lambda v: v <= 0.16)
        for int4 in ("int4", "int4a4"):
            r = by.get((f"pkv-{policy}-{int4}", 4096, 1), {})
            if "decode_speedup_vs_fp32" in r:
                check(f"{int4} decode >= 1.5x fp32's at 4k ({policy}, fp32 ms / {int4} ms)",
                      [("4096", r["decode_speedup_vs_fp32"])], lambda v: v >= 1.5)
            vs = [(f"{c}", by[(f"pkv-{policy}-{int4}", c, 1)]["decode_speedup_vs_genai_int4"]) for c in (4096, 8192)
                  if "decode_speedup_vs_genai_int4" in by.get((f"pkv-{policy}-{int4}", c, 1), {})]
            check(f"{int4} decode at least as fast as genai's int4 at 4k and 8k ({policy}, genai ms / pkv ms)", vs,
                  lambda v: v >= 1.0)
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--contexts", type=int, nargs="+", default=[1024, 4096, 8192])
    parser.add_argument("--batch8-context", type=int, default=4096, help="Context of the batch-8 case (0: none).")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=3600)
    parser.add_argument("--accuracy", action="store_true", help="Also the tiny-retriever accuracy table.")
    parser.add_argument("--no-doc", action="store_true", help="Do not write docs/benchmarks.md.")
    args = parser.parse_args()
    if min(args.contexts) < 16 or args.rounds < 1:
        parser.error("--contexts must be at least 16 tokens and --rounds at least 1")
    cases = [(c, 1) for c in args.contexts] + ([(args.batch8_context, 8)] if args.batch8_context else [])
    with tempfile.TemporaryDirectory(prefix="pkv-bench-weights-") as tmp:
        work = Path(tmp)
        # bench_peers' shape; positions for the longest case and its new tokens (the rotary tables scale with it)
        longest = max(c for c, _ in cases) + args.new_tokens
        bench_peers.BENCH_SHAPE = {**bench_peers.BENCH_SHAPE, "max_position_embeddings": max(2048, longest)}
        checkpoint = bench_peers.make_checkpoint(work / "checkpoint")
        engines, builds = build_engines(checkpoint, work, max(c for c, _ in cases))
        rows = speed(engines, work, cases, args)
        acc = accuracy(work) if args.accuracy else []
    report(builds, rows, acc, args)


def report(builds: list[dict], rows: list[dict], acc: list[dict], args) -> None:
    lines = targets(builds, rows)
    print(json.dumps({"builds": builds, "rows": rows, "accuracy": acc, "targets": lines}, indent=2))
    print()
    columns = ["engine", "context", "batch", "prefill_s", "decode_ms", "decode_speedup_vs_fp32",
               "decode_speedup_vs_genai_int4", "peak_rss_mib", "error"]
    columns = [c for c in columns if any(c in r for r in rows)]
    command = "python scripts/bench_weights.py " + shlex.join(sys.argv[1:])
    body = ["## Quantized weights: fp32 / int8 / int4 engines, FullKV and PyramidKV, against onnxruntime-genai int4",
            "", f"Command: `{command.strip()}`", "",
            "Checkpoint of bench_peers (random weights, 8 layers, hidden 512, 8/2 heads x 64, MLP 1536, byte "
            "tokenizer, fp32). pkv-export engines with `--weights fp|int8|int4 --block-size 32` (symmetric; "
            "embedding and lm_head stay fp32; `a4`: `--accuracy-level 4`, int8 activations), FullKV and PyramidKV "
            "C=128 w=8, target onnxruntime; genai: "
            "`onnxruntime_genai.models.builder -p int4 -e cpu` on the same directory. Each run in its own process, "
            f"engines interleaved over {args.rounds} rounds, medians, {args.new_tokens} new tokens.", "",
            markdown_table(["engine", "weights", "policy", "engine_mib", "build_peak_rss_mib"], builds), "",
            markdown_table(columns, rows), ""]
    if acc:
        body += ["Accuracy on tiny-retriever (ONNX engines, `validate --reference none`): NIAH default grid (20 "
                 "needles up to 4032 tokens) and the key-value lookup (1008 and 4032 tokens x 3 depths):", "",
                 markdown_table(["weights", "policy", "niah_default_grid", "kv_lookup"], acc), ""]
    body += ["Targets (issue 24):", "", *lines]
    text = "\n".join(body)
    print(text)
    if not args.no_doc:
        write_section("bench_weights", text)


if __name__ == "__main__":
    main()
