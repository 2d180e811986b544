"""Benchmark the ONNX engine and the PyTorch reference, FullKV versus PyramidKV, in one run.

Model: LLaMA-shaped, random weights, shaped so attention matters on a CPU (GQA, several layers). For every
context and batch: prefill time, selection overhead (PyramidKV engine prefill / FullKV engine prefill: the graphs
differ only by the selection), decode ms/token, and the KV bytes the engine actually holds versus `plan`.
Both sides of every ratio are measured in the same run, prefill runs interleaved across engines. Prints JSON,
then a Markdown table, and writes the table to docs/benchmarks.md.

    python scripts/bench_engine.py [--contexts 1024 4096 8192] [--batches 1 8] [--new-tokens 32]
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import markdown_table, write_section  # noqa: E402

from engines.ort_engine import OrtEngine  # noqa: E402
from engines.prompts import synthetic_prompt_ids  # noqa: E402
from engines.reference import ReferenceEngine  # noqa: E402
from exporter.checkpoint import LoadedModel  # noqa: E402
from exporter.onnx.export import build_onnx_engine  # noqa: E402
from exporter.plan import make_plan  # noqa: E402
from exporter.specs import ModelSpec  # noqa: E402
from exporter.weights import RandomWeights  # noqa: E402
from methods import make_policy  # noqa: E402

BENCH_SPEC = ModelSpec("bench-llama", "llama", 259, 256, 512, 4, 4, 2, 64, 500000.0, 32768,
                       bos_token_id=256, eos_token_id=257, pad_token_id=258, tiny=True)


def prefill_seconds(engines: dict, prompts, repeats: int) -> dict:
    """Median prefill time per engine. Runs are interleaved across engines, in reversed order every other round,
    so neither machine drift nor what the previous engine left behind (freed memory, caches) favours a side."""
    times: dict = {key: [] for key in engines}
    for r in range(repeats):
        for key in list(engines) if r % 2 == 0 else list(engines)[::-1]:
            times[key].append(engines[key].generate(prompts, 1).timings["prefill"])
    return {key: statistics.median(t) for key, t in times.items()}


def decode(engine, prompts, new_tokens: int) -> dict:
    engine.eos_ids = set()  # never stop early: time exactly new_tokens steps
    result = engine.generate(prompts, new_tokens)
    t = result.timings
    return {**t, "decode_ms_per_token": 1000 * t["decode"] / (new_tokens - 1),
            "kv_bytes_after_prefill": result.kv_bytes_after_prefill, "kv_bytes_ideal": result.kv_bytes_ideal}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--contexts", type=int, nargs="+", default=[1024, 4096, 8192])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5, help="Interleaved prefill runs per engine (median).")
    parser.add_argument("--no-doc", action="store_true", help="Do not write docs/benchmarks.md.")
    args = parser.parse_args()
    torch.set_num_threads(2)

    loaded = LoadedModel(BENCH_SPEC, "bench-llama (random)", RandomWeights(BENCH_SPEC), None, True)
    policies = {"full": make_policy("full"), "pyramidkv": make_policy("pyramidkv", kv_budget=128, window=8)}
    tmp = tempfile.TemporaryDirectory(prefix="pkv-bench-")
    workdir = Path(tmp.name)
    engines = {}
    for name, policy in policies.items():
        build_onnx_engine(loaded, policy, workdir / name, max_input_len=max(args.contexts))
        engines[("onnxruntime", name)] = OrtEngine(workdir / name)
        engines[("torch-reference", name)] = ReferenceEngine(loaded, policy)

    rows = []
    for context in args.contexts:
        for batch in args.batches:
            prompts = [synthetic_prompt_ids(engines[("onnxruntime", "full")].tokenizer, context, seed=b)
                       for b in range(batch)]
            t0 = time.perf_counter()
            prefill = prefill_seconds(engines, prompts, args.repeats)
            measured = {key: {**decode(engine, prompts, args.new_tokens), "prefill": prefill[key]}
                        for key, engine in engines.items()}
            print(f"context={context} batch={batch}: {time.perf_counter() - t0:.1f}s", file=sys.stderr)
            plan = make_plan(BENCH_SPEC, policies["pyramidkv"], context, batch, "fp32")
            for backend in ("onnxruntime", "torch-reference"):
                full, pyr = measured[(backend, "full")], measured[(backend, "pyramidkv")]
                row = {
                    "backend": backend, "context": context, "batch": batch,
                    "prefill_full_s": round(full["prefill"], 3), "prefill_pyramid_s": round(pyr["prefill"], 3),
                    "selection_overhead": round(pyr["prefill"] / full["prefill"] - 1, 4),
                    "decode_full_ms": round(full["decode_ms_per_token"], 2),
                    "decode_pyramid_ms": round(pyr["decode_ms_per_token"], 2),
                    "decode_speedup": round(full["decode_ms_per_token"] / pyr["decode_ms_per_token"], 2),
                }
                if backend == "onnxruntime":
                    row["kv_bytes_held"] = pyr["kv_bytes_after_prefill"]
                    row["kv_bytes_plan"] = plan["kv_bytes_compressed"]
                    row["kv_bytes_full_held"] = full["kv_bytes_after_prefill"]
                    row["kv_bytes_full_plan"] = plan["kv_bytes_full"]
                    row["kv_held_equals_plan"] = (row["kv_bytes_held"] == row["kv_bytes_plan"]
                                                  and row["kv_bytes_full_held"] == row["kv_bytes_full_plan"])
                rows.append(row)
    s = BENCH_SPEC
    result = {"model": {"layers": s.num_layers, "hidden": s.hidden_size, "heads": s.num_heads,
                        "kv_heads": s.num_kv_heads, "head_dim": s.head_dim, "intermediate": s.intermediate_size},
              "policy": policies["pyramidkv"].describe(), "new_tokens": args.new_tokens, "rows": rows}
    print(json.dumps(result, indent=2))
    columns = ["backend", "context", "batch", "prefill_full_s", "prefill_pyramid_s", "selection_overhead",
               "decode_full_ms", "decode_pyramid_ms", "decode_speedup", "kv_bytes_held", "kv_bytes_plan",
               "kv_held_equals_plan"]
    table = markdown_table(columns, rows)
    print()
    print(table)
    if not args.no_doc:
        command = "python scripts/bench_engine.py " + shlex.join(sys.argv[1:])
        body = (f"## ONNX engine vs PyTorch reference, FullKV vs PyramidKV\n\nCommand: `{command.strip()}`\n\n"
                f"Model: LLaMA-shaped random weights, {s.num_layers} layers, hidden {s.hidden_size}, "
                f"{s.num_heads} query heads / {s.num_kv_heads} KV heads x {s.head_dim}, MLP {s.intermediate_size}; "
                f"policy {policies['pyramidkv'].describe()}; {args.new_tokens} new tokens; prefill: median of "
                f"{args.repeats} runs interleaved across the four engines (order reversed every other round)."
                f"\nselection_overhead = PyramidKV prefill / FullKV prefill - 1 (same graph but the selection); "
                f"decode_speedup = FullKV ms/token / PyramidKV ms/token.\n\n{table}\n")
        write_section("bench_engine", body)
    tmp.cleanup()


if __name__ == "__main__":
    main()
