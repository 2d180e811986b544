"""pkv-export's ONNX engine side by side with onnxruntime-genai on the same checkpoint, long contexts.

Makes a LLaMA-shaped checkpoint with random weights (8 layers, hidden 512, 8 query / 2 KV heads x 64, MLP 1536,
the byte tokenizer) saved as an ordinary Hugging Face directory, or takes `--model DIR`. Builds pkv-export FullKV
and PyramidKV (C=128, w=8) engines and an onnxruntime-genai model (its own model builder, fp32, CPU) from it.
Then, for every context (batch 1) and 4k at batch 8, interleaved across the three (order reversed every other
round), each run in a process of its own:

- prefill seconds, decode ms/token, peak RSS of the process;
- whether its greedy tokens equal transformers' (sdpa attention, greedy generate) on the same ids: FullKV and
  genai must match all of them; PyramidKV's first token must (its prefill attends to the whole prompt), the
  rest legitimately differ (the tests prove them equal to pkv-export's own PyTorch reference);
- the physical limit of a decode step: bytes it must read per token (weights read by the step plus the KV
  cache it holds) divided by the memory bandwidth measured here (onnxruntime MatMul streaming a 256 MB matrix).

Prints JSON, then a Markdown table and the targets of issue #9 (met or not, with the numbers), and writes the
table to docs/benchmarks.md (`--no-doc` to skip). onnxruntime-genai comes with the `bench` extra
(`pip install -e ".[bench]"`).

    python scripts/bench_peers.py [--contexts 1024 4096 8192 16384 32768] [--new-tokens 32] [--rounds 2] [--no-doc]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import markdown_table, write_section  # noqa: E402

BENCH_SHAPE = dict(hidden_size=512, intermediate_size=1536, num_layers=8, num_heads=8, num_kv_heads=2, head_dim=64,
                   max_position_embeddings=65536)  # room for a 32k prompt and its new tokens
POLICIES = {"pkv-full": ("full", {}), "pkv-pyramidkv": ("pyramidkv", {"kv_budget": 128, "window": 8})}


# ---------------------------------------------------------------- workers (one process per measured run)

def run_worker(kind: str, path: str, ids_file: str, new_tokens: int) -> dict:
    ids = np.load(ids_file)  # [B, q] int64, every row the same length
    if kind == "pkv":
        from engines.ort_engine import OrtEngine

        engine = OrtEngine(Path(path))
        loaded_rss = _rss_mib()
        result = engine.generate([list(map(int, row)) for row in ids], new_tokens)
        prefill, decode = result.timings["prefill"], result.timings["decode"]
        tokens = result.tokens
        steps = max(len(t) for t in tokens) - 1  # decode steps run (all three stop at EOS, like transformers)
    elif kind == "genai":
        import onnxruntime_genai as og

        model = og.Model(path)
        loaded_rss = _rss_mib()
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=ids.shape[1] + new_tokens, do_sample=False, batch_size=ids.shape[0])
        generator = og.Generator(model, params)
        t0 = time.perf_counter()
        generator.append_tokens(ids.astype(np.int32))
        prefill = time.perf_counter() - t0
        rows: list[list[int]] = [[] for _ in range(ids.shape[0])]
        calls = 0
        t0 = time.perf_counter()
        for _ in range(new_tokens):  # the first call picks from the prefill's logits; each later one decodes
            if generator.is_done():
                break
            generator.generate_next_token()
            calls += 1
            for b, token in enumerate(generator.get_next_tokens()):
                rows[b].append(int(token))
        decode = time.perf_counter() - t0
        steps = calls - 1
        eos = set(model_eos(path))
        tokens = [row[: next((i + 1 for i, t in enumerate(row) if t in eos), len(row))] for row in rows]
    else:  # transformers' own greedy generate, the reference tokens
        import torch
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="sdpa", dtype=torch.float32)
        loaded_rss = _rss_mib()
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(torch.from_numpy(ids), attention_mask=torch.ones_like(torch.from_numpy(ids)),
                                 max_new_tokens=new_tokens, do_sample=False, pad_token_id=model.config.pad_token_id)
        prefill, decode, steps = time.perf_counter() - t0, 0.0, 0
        eos = set(model_eos(path))
        tokens = [row[: next((i + 1 for i, t in enumerate(row) if t in eos), len(row))]
                  for row in out[:, ids.shape[1]:].tolist()]
    return {"prefill_s": prefill, "decode_ms": 1000 * decode / max(steps, 1), "tokens": tokens,
            "peak_rss_mib": _rss_mib(), "loaded_rss_mib": loaded_rss}


def model_eos(path: str) -> list[int]:
    """EOS ids from a model directory's config (a finished row's later tokens are padding, not compared)."""
    for name in ("genai_config.json", "config.json"):
        f = Path(path) / name
        if f.is_file():
            data = json.loads(f.read_text())
            eos = data.get("model", data).get("eos_token_id")
            return eos if isinstance(eos, list) else [eos]
    return []


def _rss_mib() -> float:
    """This process's peak resident memory. VmHWM, not ru_maxrss: a spawned child's ru_maxrss starts at the
    parent's peak (Linux keeps the high-water mark across exec), VmHWM is the child's own."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return round(int(line.split()[1]) / 1024, 1)
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def measure(kind: str, path: Path, ids_file: Path, new_tokens: int, timeout: float) -> dict:
    cmd = [sys.executable, __file__, "--worker", kind, "--path", str(path), "--ids", str(ids_file), "--new-tokens",
           str(new_tokens)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:
        return {"error": (r.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(r.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------- set-up

def make_checkpoint(directory: Path) -> Path:
    from safetensors.torch import save_file

    from exporter.checkpoint import LoadedModel
    from exporter.specs import PRESETS
    from exporter.weights import RandomWeights

    spec = dataclasses.replace(PRESETS["tiny-llama3"], name="bench-llama", tiny=False, **BENCH_SHAPE)
    loaded = LoadedModel(spec, "bench-llama", RandomWeights(spec), None, True)
    directory.mkdir(parents=True)
    spec.to_hf_config().save_pretrained(directory)
    loaded.tokenizer().save_pretrained(directory)
    save_file({n: loaded.weights.get(n).contiguous() for n in loaded.weights.names()},
              str(directory / "model.safetensors"), metadata={"format": "pt"})
    return directory


def build_all(checkpoint: Path, workdir: Path, max_len: int) -> dict[str, Path]:
    from exporter.checkpoint import load_model
    from exporter.onnx.export import build_onnx_engine
    from methods import make_policy

    engines = {}
    for name, (policy, kw) in POLICIES.items():
        build_onnx_engine(load_model(str(checkpoint)), make_policy(policy, **kw), workdir / name, max_input_len=max_len)
        engines[name] = workdir / name
    out = build_genai(checkpoint, workdir / "genai", "fp32")
    if out is not None:
        engines["genai"] = out
    return engines


def build_genai(checkpoint: Path, out: Path, precision: str) -> Path | None:
    """onnxruntime-genai's model of `checkpoint` from its own builder (`-p precision -e cpu`), or None when
    onnxruntime-genai is not installed (the peer is then skipped, said on stderr)."""
    try:
        import onnxruntime_genai  # noqa: F401
    except ImportError:
        print("onnxruntime-genai is not installed (pip install -e '.[bench]'): the peer is skipped", file=sys.stderr)
        return None
    r = subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-m", str(checkpoint), "-i",
                        str(checkpoint), "-o", str(out), "-p", precision, "-e", "cpu"], capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"onnxruntime-genai's model builder failed: {r.stderr.strip().splitlines()[-1]}")
    return out


def memory_bandwidth_gbs() -> float:
    """Bytes per second onnxruntime's MatMul streams through a 256 MB fp32 matrix at batch 1 (the decode pattern),
    best of 10, with the default threads: the rate a decode step can read weights and caches at, at best."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    rows, cols = 512, 256 * 2**20 // (4 * 512)
    weight = np.random.default_rng(0).standard_normal((rows, cols), dtype=np.float32)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "gemv",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, rows])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, cols])],
                              initializer=[numpy_helper.from_array(weight, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    x = np.ones((1, rows), np.float32)
    best = float("inf")
    for _ in range(10):
        t0 = time.perf_counter()
        session.run(None, {"x": x})
        best = min(best, time.perf_counter() - t0)
    return weight.nbytes / best / 1e9


def bytes_per_step(checkpoint: Path, name: str, context: int, batch: int) -> int:
    """Bytes a decode step must read: every weight but the embedding table (one row is gathered) plus the KV
    cache it attends to (FullKV: the whole context; PyramidKV: what `plan` says it holds)."""
    from exporter.checkpoint import load_model
    from exporter.plan import make_plan
    from exporter.specs import tensor_shapes
    from methods import make_policy

    spec = load_model(str(checkpoint), need_weights=False).spec
    weights = 4 * sum(int(np.prod(s)) for n, s in tensor_shapes(spec).items() if n != "model.embed_tokens.weight")
    policy, kw = POLICIES.get(name, ("full", {}))
    return weights + make_plan(spec, make_policy(policy, **kw), context, batch, "fp32")["kv_bytes_compressed"]


# ---------------------------------------------------------------- the run

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=None, help="Hugging Face checkpoint [random, made here].")
    parser.add_argument("--contexts", type=int, nargs="+", default=[1024, 4096, 8192, 16384, 32768])
    parser.add_argument("--batch8-context", type=int, default=4096, help="Context of the batch-8 case (0: none).")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2, help="Interleaved runs per engine and case (median).")
    parser.add_argument("--timeout", type=float, default=3600, help="Seconds allowed per run.")
    parser.add_argument("--no-doc", action="store_true", help="Do not write docs/benchmarks.md.")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--path", help=argparse.SUPPRESS)
    parser.add_argument("--ids", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(run_worker(args.worker, args.path, args.ids, args.new_tokens)))
        return

    with tempfile.TemporaryDirectory(prefix="pkv-bench-peers-") as tmp:
        work = Path(tmp)
        checkpoint = args.model or make_checkpoint(work / "checkpoint")
        cases = [(c, 1) for c in args.contexts] + ([(args.batch8_context, 8)] if args.batch8_context else [])
        engines = build_all(checkpoint, work, max(c for c, _ in cases))
        bandwidth = memory_bandwidth_gbs()
        print(f"memory bandwidth (onnxruntime MatMul, 256 MB): {bandwidth:.1f} GB/s", file=sys.stderr)
        from engines.prompts import synthetic_prompt_ids
        from exporter.checkpoint import load_model

        tokenizer = load_model(str(checkpoint), need_weights=False).tokenizer()
        rows = []
        for context, batch in cases:
            ids_file = work / f"ids-{context}-{batch}.npy"
            np.save(ids_file, np.array([synthetic_prompt_ids(tokenizer, context, seed=b) for b in range(batch)]))
            want = measure("transformers", checkpoint, ids_file, args.new_tokens, args.timeout)
            runs: dict[str, list[dict]] = {name: [] for name in engines}
            for r in range(args.rounds):
                for name in list(engines) if r % 2 == 0 else list(engines)[::-1]:
                    kind = "genai" if name == "genai" else "pkv"
                    runs[name].append(measure(kind, engines[name], ids_file, args.new_tokens, args.timeout))
                    print(f"context={context} batch={batch} round={r} {name}: {runs[name][-1].get('prefill_s')}",
                          file=sys.stderr)
            rows.extend(summarise(context, batch, runs, want, checkpoint, bandwidth))
        report(rows, args, bandwidth)


def summarise(context, batch, runs, want, checkpoint, bandwidth) -> list[dict]:
    out = []
    ok = {name: [r for r in rs if "error" not in r] for name, rs in runs.items()}
    genai = ok.get("genai") or None
    for name, results in ok.items():
        if not results:
            out.append({"engine": name, "context": context, "batch": batch,
                        "error": next(r["error"] for r in runs[name])})
            continue
        prefill = statistics.median(r["prefill_s"] for r in results)
        decode = statistics.median(r["decode_ms"] for r in results)
        bound_ms = 1000 * bytes_per_step(checkpoint, name, context, batch) / (bandwidth * 1e9)
        tokens = results[0]["tokens"]
        row = {"engine": name, "context": context, "batch": batch, "prefill_s": round(prefill, 3),
               "decode_ms": round(decode, 2), "peak_rss_mib": max(r["peak_rss_mib"] for r in results),
               "run_rss_mib": round(max(r["peak_rss_mib"] - r["loaded_rss_mib"] for r in results), 1),
               "bound_ms": round(bound_ms, 2), "decode_vs_bound": round(decode / bound_ms, 2)}
        if "tokens" in want:
            row["tokens_equal_transformers"] = tokens == want["tokens"]
            row["first_token_equal"] = [t[:1] for t in tokens] == [t[:1] for t in want["tokens"]]
        if genai and name != "genai":
            g_prefill = statistics.median(r["prefill_s"] for r in genai)
            g_decode = statistics.median(r["decode_ms"] for r in genai)
            row["prefill_speed_vs_genai"] = round(g_prefill / prefill, 3)
            row["decode_speedup_vs_genai"] = round(g_decode / decode, 2)
            row["rss_vs_genai"] = round(row["peak_rss_mib"] / max(r["peak_rss_mib"] for r in genai), 2)
            row["run_rss_vs_genai"] = round(row["run_rss_mib"] / max(r["peak_rss_mib"] - r["loaded_rss_mib"]
                                                                     for r in genai), 2)
        if name == "pkv-pyramidkv" and ok.get("pkv-full"):
            full = statistics.median(r["prefill_s"] for r in ok["pkv-full"])
            row["selection_overhead"] = round(prefill / full - 1, 4)
        out.append(row)
    return out


def targets(rows: list[dict]) -> list[str]:
    """Issue #9's targets, each with the measured numbers."""
    by = {(r["engine"], r["context"], r["batch"]): r for r in rows if "error" not in r}
    lines = []

    def check(label: str, values: list[tuple[str, float]], ok) -> None:
        if values:
            shown = ", ".join(f"{k}: {v}" for k, v in values)
            lines.append(f"- {'met' if all(ok(v) for _, v in values) else 'MISSED'}: {label} ({shown})")

    rss = [(f"{c}", by[("pkv-pyramidkv", c, 1)]["rss_vs_genai"]) for c in (8192, 16384)
           if ("pkv-pyramidkv", c, 1) in by and "rss_vs_genai" in by[("pkv-pyramidkv", c, 1)]]
    check("prefill peak RSS within 1.5x genai's at 8k and 16k (PyramidKV / genai, whole process)", rss,
          lambda v: v <= 1.5)
    run = [(f"{c}", by[("pkv-pyramidkv", c, 1)]["run_rss_vs_genai"]) for c in (8192, 16384)
           if ("pkv-pyramidkv", c, 1) in by and "run_rss_vs_genai" in by[("pkv-pyramidkv", c, 1)]]
    check("the same, counting only what the run adds to the loaded engine (peak - RSS after loading)", run,
          lambda v: v <= 1.5)
    for name in ("pkv-full", "pkv-pyramidkv"):
        speed = [(f"{c}x{b}", r["prefill_speed_vs_genai"]) for (n, c, b), r in by.items()
                 if n == name and "prefill_speed_vs_genai" in r]
        check(f"{name} prefill at least 0.9x genai's speed (genai_s / pkv_s)", speed, lambda v: v >= 0.9)
    full = [(f"{c}x{b}", r["decode_speedup_vs_genai"]) for (n, c, b), r in by.items()
            if n == "pkv-full" and "decode_speedup_vs_genai" in r]
    check("FullKV decode at least as fast as genai (genai ms / pkv ms)", full, lambda v: v >= 1.0)
    for context, goal in ((8192, 3.0), (32768, 6.0)):
        r = by.get(("pkv-pyramidkv", context, 1), {})
        if "decode_speedup_vs_genai" in r:
            check(f"PyramidKV decode >= {goal}x genai at {context}", [(str(context), r["decode_speedup_vs_genai"])],
                  lambda v, g=goal: v >= g)
    bound = [(f"{n}@{c}x{b}", r["decode_vs_bound"]) for (n, c, b), r in by.items() if n.startswith("pkv")]
    check("every pkv decode step within 1.5x of its bytes-bound time", bound, lambda v: v <= 1.5)
    overhead = [(f"{c}x{b}", r["selection_overhead"]) for (n, c, b), r in by.items()
                if n == "pkv-pyramidkv" and c >= 4096 and "selection_overhead" in r]
    check("selection overhead <= 3% from 4k on", overhead, lambda v: v <= 0.03)
    longest = max((c for (_, c, _) in by), default=0)
    lines.append(f"- {'met' if longest >= 32768 else 'not run'}: a 32k prefill completes on this machine "
                 f"(longest context measured: {longest})")
    return lines


def report(rows: list[dict], args, bandwidth: float) -> None:
    print(json.dumps({"bandwidth_gbs": round(bandwidth, 2), "rows": rows, "targets": targets(rows)}, indent=2))
    print()
    columns = ["engine", "context", "batch", "prefill_s", "prefill_speed_vs_genai", "selection_overhead",
               "peak_rss_mib", "rss_vs_genai", "run_rss_mib", "run_rss_vs_genai", "decode_ms",
               "decode_speedup_vs_genai", "bound_ms", "decode_vs_bound", "tokens_equal_transformers",
               "first_token_equal", "error"]
    columns = [c for c in columns if any(c in r for r in rows)]
    command = "python scripts/bench_peers.py " + shlex.join(sys.argv[1:])
    body = "\n".join([
        "## Long contexts: pkv-export's ONNX engine vs onnxruntime-genai", "",
        f"Command: `{command.strip()}`", "",
        f"Checkpoint: LLaMA-shaped, random weights, {BENCH_SHAPE['num_layers']} layers, hidden "
        f"{BENCH_SHAPE['hidden_size']}, {BENCH_SHAPE['num_heads']} query / {BENCH_SHAPE['num_kv_heads']} KV heads x "
        f"{BENCH_SHAPE['head_dim']}, MLP {BENCH_SHAPE['intermediate_size']}, byte tokenizer, fp32, saved as a Hugging "
        "Face directory; pkv-export FullKV and PyramidKV (C=128, w=8) engines (target onnxruntime) and an "
        "onnxruntime-genai 0.18 model from its own builder, all from that directory. Each run in its own process, "
        f"the three interleaved over {args.rounds} rounds (order reversed every other round); medians. "
        f"{args.new_tokens} new tokens. bound_ms = bytes a decode step must read (weights + the KV cache held) / "
        f"{bandwidth:.1f} GB/s (onnxruntime MatMul streaming 256 MB on this machine). tokens_equal_transformers: "
        "greedy tokens equal to transformers' generate (sdpa) on the same ids. peak_rss_mib: the process's peak "
        "(VmHWM; pkv-export's runner imports torch and transformers, about 190 MiB that genai's process does not "
        "have); run_rss_mib: peak minus the RSS after loading the engine (what the generation itself adds).", "",
        markdown_table(columns, rows), "", "Targets (issue #9):", "", *targets(rows)])
    print(body)
    if not args.no_doc:
        write_section("bench_peers", body)


if __name__ == "__main__":
    main()
