"""Load-test a local tritonserver: FullKV engine versus PyramidKV engine, served side by side in one run.

Both engines (tiny-llama3 shapes, random weights, byte tokenizer) go into one model repository and one real
tritonserver on 127.0.0.1; for each concurrency level the same number of requests (prompts of equal length, so
Triton's dynamic batcher can group them) is sent to each model with tritonclient over HTTP. Reports requests/s
and p50/p99 latency; prints JSON and a Markdown table, and writes it to docs/benchmarks.md.

    python scripts/bench_triton.py [--prompt-tokens 1024] [--new-tokens 32] [--concurrency 1 8 32]
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import markdown_table, write_section  # noqa: E402

from engines.prompts import filler_text  # noqa: E402
from engines.triton_client import TritonTextClient  # noqa: E402
from engines.triton_server import TritonServer  # noqa: E402
from exporter.checkpoint import load_model  # noqa: E402
from exporter.onnx.export import build_onnx_engine  # noqa: E402
from exporter.triton.repo import write_repository  # noqa: E402
from methods import make_policy  # noqa: E402


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    k = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[k]


def load(url: str, model: str, prompts: list[str], concurrency: int, new_tokens: int) -> dict:
    def one(prompt: str) -> float:
        with TritonTextClient(url, "http") as c:
            t0 = time.perf_counter()
            c.generate(model, prompt, max_new_tokens=new_tokens)
            return time.perf_counter() - t0

    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        latencies = list(pool.map(one, prompts))
    wall = time.perf_counter() - t0
    return {"requests": len(prompts), "requests_per_s": round(len(prompts) / wall, 3),
            "p50_ms": round(1000 * statistics.median(latencies), 1),
            "p99_ms": round(1000 * percentile(latencies, 99), 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompt-tokens", type=int, default=1024)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--kv-budget", type=int, default=128)
    parser.add_argument("--no-doc", action="store_true")
    args = parser.parse_args()

    tmp = tempfile.TemporaryDirectory(prefix="pkv-bench-triton-")
    work = Path(tmp.name)
    loaded = load_model("tiny-llama3")
    policies = {"full": make_policy("full"), "pyramidkv": make_policy("pyramidkv", kv_budget=args.kv_budget, window=8)}
    engines = {}
    for name, policy in policies.items():
        build_onnx_engine(loaded, policy, work / f"engine-{name}", max_input_len=args.prompt_tokens + 8)
        engines[name] = work / f"engine-{name}"
    repo = write_repository(engines, work / "repo", max_batch_size=32, default_new_tokens=args.new_tokens)
    rows = []
    with TritonServer(repo) as server:
        for concurrency in args.concurrency:
            n = max(16, 2 * concurrency)
            prompts = [filler_text(args.prompt_tokens, seed=i)[: args.prompt_tokens - 1] for i in range(n)]
            for name in policies:  # alternate models within each level so drifts hit both sides alike
                load(server.http_url, name, prompts[:2], min(2, concurrency), args.new_tokens)  # warm-up
                row = {"model": name, "concurrency": concurrency,
                       **load(server.http_url, name, prompts, concurrency, args.new_tokens)}
                rows.append(row)
                print(row, file=sys.stderr)
    for concurrency in args.concurrency:
        full = next(r for r in rows if r["model"] == "full" and r["concurrency"] == concurrency)
        pyr = next(r for r in rows if r["model"] == "pyramidkv" and r["concurrency"] == concurrency)
        pyr["throughput_vs_full"] = round(pyr["requests_per_s"] / full["requests_per_s"], 3)
    result = {"prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens,
              "policy": policies["pyramidkv"].describe(), "rows": rows}
    print(json.dumps(result, indent=2))
    columns = ["model", "concurrency", "requests", "requests_per_s", "p50_ms", "p99_ms", "throughput_vs_full"]
    table = markdown_table(columns, rows)
    print()
    print(table)
    if not args.no_doc:
        command = ("python scripts/bench_triton.py " + shlex.join(sys.argv[1:])).strip()
        write_section("bench_triton", f"## Triton Inference Server: FullKV vs PyramidKV engines\n\nCommand: `{command}`"
                      f"\n\nOne tritonserver (nvidia-pytriton's binary, python backend, CPU) on 127.0.0.1 serving "
                      f"both tiny-llama3 engines; prompts of {args.prompt_tokens} tokens, {args.new_tokens} new "
                      f"tokens, tritonclient over HTTP; {policies['pyramidkv'].describe()}.\n\n{table}\n")
    tmp.cleanup()


if __name__ == "__main__":
    main()
