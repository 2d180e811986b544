"""Every KV method in the same ONNX engine, in one run: selection cost, decode speed, bytes held.

For each context: one engine per method (same random LLaMA-shaped model as bench_engine.py), measured side by
side with FullKV:
* prefill_s: median of `--repeats` prefills, interleaved across engines (order reversed every other round);
* selection_ms: time inside the selection (the `If` node that wraps each layer's selection in the prefill graph),
  from onnxruntime's profiler on one extra prefill, so it is not the difference of two noisy medians;
  selection_share: that over the profiled prefill's total node time;
* reuse_speedup (ChunkKV with index reuse): selection_ms of ChunkKV without reuse / this one's;
* a method's own nodes at the graph's top level (`sel_*`, exporter.onnx.prefill.METHOD_NODES) count as selection:
  PyramidInfer's recent-window scoring and gathering between layers (its prefill also runs deeper layers over
  fewer tokens, which prefill_vs_full shows); KVzip's reconstruction pass and its one top-k over every layer;
* scoring_ms: a method's own top-level `Loop` (KVzip's reconstruction pass) alone, scoring_vs_prefill that over
  FullKV's whole prefill (profiled node time); kv_span_over_held, for per-head lengths (KVzip), the bytes the
  layout spans over the kept pairs' bytes;
* decode_ms per token (`--new-tokens` steps, EOS ignored) and decode_speedup = FullKV's / this one's;
* kv_bytes_held after the prefill, and its ratio to FullKV's.
Prints JSON, then a Markdown table, and writes the table to docs/benchmarks.md (section bench_methods).

    python scripts/bench_methods.py [--contexts 4096 8192] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import markdown_table, write_section  # noqa: E402
from bench_engine import BENCH_SPEC, decode, prefill_seconds  # noqa: E402

from engines.ort_engine import OrtEngine  # noqa: E402
from engines.prompts import synthetic_prompt_ids  # noqa: E402
from exporter.checkpoint import LoadedModel  # noqa: E402
from exporter.onnx.export import build_onnx_engine  # noqa: E402
from exporter.onnx.prefill import METHOD_NODES  # noqa: E402
from exporter.weights import RandomWeights  # noqa: E402
from methods import make_policy, options_for  # noqa: E402

METHODS = {
    "full": ("full", {}),
    "streamingllm": ("streamingllm", {}),
    "h2o": ("h2o", {}),
    "snapkv": ("snapkv", {}),
    "pyramidkv": ("pyramidkv", {}),
    "chunkkv": ("chunkkv", {}),
    "chunkkv-reuse2": ("chunkkv", {"reuse": 2}),
    "chunkkv-reuse4": ("chunkkv", {"reuse": 4}),
    "chunkkv-pyramid": ("chunkkv", {"budget_schedule": "pyramid"}),
    "kvzip": ("kvzip", {}),
    "pyramidinfer": ("pyramidinfer", {}),
}


def profiled_selection(engine_dir: Path, engine: OrtEngine, prompts) -> tuple[float, float, float]:
    """(ms inside the selection (If nodes, a method's own nodes), ms of every node, ms of a method's own Loop: KVzip's
    reconstruction pass) of one profiled prefill."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.enable_profiling = True
    opts.profile_file_prefix = str(engine_dir / "profile")
    opts.intra_op_num_threads = 2
    saved = engine.prefill
    engine.prefill = ort.InferenceSession(str(engine_dir / "prefill.onnx"), opts, providers=["CPUExecutionProvider"])
    try:
        engine.generate(prompts, 1)
        events = json.loads(Path(engine.prefill.end_profiling()).read_text())
    finally:
        engine.prefill = saved
    import onnx

    # Top-level nodes only: an If's time includes its branch, whose nodes are profiled too.
    graph = onnx.load(str(engine_dir / "prefill.onnx"), load_external_data=False).graph
    names = {f"{n.name}_kernel_time" for n in graph.node}
    top = [e for e in events if e.get("cat") == "Node" and e["name"] in names]
    select = sum(e["dur"] for e in top if e["args"].get("op_name") == "If" or e["name"].startswith(METHOD_NODES))
    scoring = sum(e["dur"] for e in top if e["name"].startswith(METHOD_NODES) and e["args"].get("op_name") == "Loop")
    return select / 1000, sum(e["dur"] for e in top) / 1000, scoring / 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--contexts", type=int, nargs="+", default=[4096, 8192])
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--kv-budget", type=int, default=128)
    parser.add_argument("--window", type=int, default=8)
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=None,
                        help="Measure only these (FullKV is always measured: every ratio is against it).")
    parser.add_argument("--no-doc", action="store_true", help="Do not write docs/benchmarks.md.")
    args = parser.parse_args()
    torch.set_num_threads(2)
    loaded = LoadedModel(BENCH_SPEC, "bench-llama (random)", RandomWeights(BENCH_SPEC), None, True)
    tmp = tempfile.TemporaryDirectory(prefix="pkv-bench-methods-")
    work = Path(tmp.name)
    engines, policies = {}, {}
    for key, (name, kw) in METHODS.items():
        shared = options_for(name, {"kv_budget": args.kv_budget, "window": args.window})  # for those that have them
        policies[key] = make_policy(name, **shared, **kw)
        if args.methods and key not in args.methods and key != "full":
            continue
        build_onnx_engine(loaded, policies[key], work / key, max_input_len=max(args.contexts))
        engines[key] = OrtEngine(work / key)
    rows = []
    for context in args.contexts:
        prompts = [synthetic_prompt_ids(engines["full"].tokenizer, context, seed=0)]
        prefill = prefill_seconds(engines, prompts, args.repeats)
        measured = {}
        for key, engine in engines.items():
            selection, total, scoring = profiled_selection(work / key, engine, prompts)
            measured[key] = {"prefill": prefill[key], "selection_ms": selection, "scoring_ms": scoring,
                             "node_ms": total, **decode(engine, prompts, args.new_tokens)}
            print(f"context={context} {key}: {measured[key]['prefill']:.2f}s", file=sys.stderr)
        full = measured["full"]
        for key, m in measured.items():
            row = {"method": key, "policy": policies[key].describe(), "context": context,
                   "prefill_s": round(m["prefill"], 3), "prefill_vs_full": round(m["prefill"] / full["prefill"], 3),
                   "selection_ms": round(m["selection_ms"], 1),
                   "selection_share": round(m["selection_ms"] / m["node_ms"], 4) if m["node_ms"] else None,
                   "decode_ms": round(m["decode_ms_per_token"], 2),
                   "decode_speedup": round(full["decode_ms_per_token"] / m["decode_ms_per_token"], 2),
                   "kv_bytes_held": m["kv_bytes_after_prefill"],
                   "kv_ratio": round(m["kv_bytes_after_prefill"] / full["kv_bytes_after_prefill"], 4)}
            if m["scoring_ms"]:
                row["scoring_ms"] = round(m["scoring_ms"], 1)
                row["scoring_vs_prefill"] = round(m["scoring_ms"] / full["node_ms"], 3)
            if policies[key].per_head_lengths:
                row["kv_span_over_held"] = round(m["kv_bytes_after_prefill"] / m["kv_bytes_ideal"], 3)
            if key.startswith("chunkkv-reuse") and "chunkkv" in measured and measured["chunkkv"]["selection_ms"]:
                row["reuse_speedup"] = round(measured["chunkkv"]["selection_ms"] / max(m["selection_ms"], 1e-9), 2)
            rows.append(row)
    print(json.dumps({"model": BENCH_SPEC.to_dict(), "rows": rows}, indent=2))
    columns = ["method", "context", "prefill_s", "prefill_vs_full", "selection_ms", "selection_share",
               "reuse_speedup", "scoring_ms", "scoring_vs_prefill", "decode_ms", "decode_speedup", "kv_bytes_held",
               "kv_ratio", "kv_span_over_held"]
    table = markdown_table(columns, rows)
    print()
    print(table)
    if not args.no_doc:
        command = "python scripts/bench_methods.py " + shlex.join(sys.argv[1:])
        s = BENCH_SPEC
        body = (f"## {'Every method' if not args.methods else ', '.join(args.methods) + ' against FullKV'} in the ONNX "
                f"engine: selection cost, decode speed, bytes held\n\n"
                f"Command: `{command.strip()}`\n\nModel: LLaMA-shaped random weights, {s.num_layers} layers, hidden "
                f"{s.hidden_size}, {s.num_heads} query / {s.num_kv_heads} KV heads x {s.head_dim}; C = "
                f"{args.kv_budget}, w = {args.window}, batch 1, {args.new_tokens} new tokens. prefill_s: median of "
                f"{args.repeats} interleaved runs; selection_ms: onnxruntime profiler, time inside the selection "
                f"(`If`) nodes of one prefill; reuse_speedup: ChunkKV's selection_ms without reuse / with it; "
                f"decode_speedup: FullKV ms/token / the method's; KVzip: scoring_ms = its reconstruction pass "
                f"(`--score-chunk` {make_policy('kvzip').score_chunk} tokens per chunk), scoring_vs_prefill = that / "
                f"FullKV's whole prefill, kv_span_over_held = bytes its per-layer layout spans / the kept pairs' "
                f"bytes; PyramidInfer (the official llama3_8b config: recent window 20 % of the prompt, a cosine "
                f"ramp from keeping 1 to 0.9 of the context per layer): "
                f"selection_ms = its scoring and gathering between layers; with {args.new_tokens} new tokens its "
                f"generation stage (after R + 16 tokens) does not start.\n\n"
                f"{table}\n")
        # A subset is its own section: it does not replace the table of every method.
        write_section("bench_methods" + ("_" + "-".join(args.methods) if args.methods else ""), body)
    tmp.cleanup()


if __name__ == "__main__":
    main()
