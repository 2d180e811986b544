"""Serving throughput at a fixed KV memory: in-flight batching per policy, against FullKV and against Triton's
static dynamic batching, on one real tritonserver per configuration.

The model is the LLaMA-shaped benchmark checkpoint of scripts/bench_peers.py (8 layers, hidden 512, 8 query /
2 KV heads x 64, random weights, byte tokenizer). Every policy's engine is served with the same `--kv-memory`
(in-flight: the scheduler's fixed-size slots must fit in it; static: Triton's dynamic batcher, which bounds
nothing). Two loads, both side by side in one run:

1. closed loop: C clients (C in --concurrency) each send prompts of --prompt-tokens tokens back to back, 64 new
   tokens each, over gRPC streams; per C: output tokens/s, the most sequences the server held at once (its
   status request, sampled), time to first token and inter-token latency p50/p99;
2. Poisson arrivals at --rate requests/s of prompts drawn from 1k-8k tokens (engines built for 8k): the same
   numbers, plus requests refused and the longest queue.

Prints JSON, then Markdown tables; writes docs/benchmarks.md's section and a plot of throughput against
concurrency per policy (docs/img/serving_throughput.png) unless --no-doc.

    python scripts/bench_serving.py [--policies full pyramidkv snapkv streamingllm chunkkv h2o] \\
        [--kv-memory 72MiB] [--concurrency 1 4 16 32] [--prompt-tokens 4000] [--new-tokens 64] \\
        [--rate 0.5] [--poisson-requests 24] [--no-doc]
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import shlex
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import markdown_table, write_section  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
POLICIES = {"full": {}, "pyramidkv": {"kv_budget": 128, "window": 8}, "snapkv": {"kv_budget": 128, "window": 8},
            "streamingllm": {"kv_budget": 128, "window": 8}, "chunkkv": {"kv_budget": 128, "window": 8},
            "h2o": {"kv_budget": 128, "window": 8}}


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def ms(value: float | None) -> float | None:
    return None if value is None else round(1000 * value, 1)


# ------------------------------------------------------------------ one request

def stream_request(url: str, model: str, ids_text: str, new_tokens: int, decoupled: bool) -> dict:
    """One request; {'sent', 'first', 'times' (arrival of each token), 'tokens', 'error'} (perf_counter times)."""
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(url)
    inp = grpcclient.InferInput("text_input", [1] if decoupled else [1, 1], "BYTES")
    data = np.array([ids_text.encode()], dtype=np.object_)
    inp.set_data_from_numpy(data if decoupled else data.reshape(1, 1))
    out = {"sent": time.perf_counter(), "first": None, "times": [], "tokens": 0, "error": None}
    try:
        if not decoupled:  # static batching: one response with the whole answer
            try:
                result = client.infer(model, [inp], parameters={"max_new_tokens": new_tokens}, client_timeout=3600)
            except Exception as e:  # noqa: BLE001 - the report counts failed requests
                out["error"] = str(e)
                return out
            now = time.perf_counter()
            out["first"], out["tokens"], out["times"] = now, int(result.as_numpy("output_ids").size), [now]
            return out
        responses: queue.Queue = queue.Queue()
        client.start_stream(callback=lambda result, error: responses.put((result, error, time.perf_counter())))
        client.async_stream_infer(model, [inp], parameters={"max_new_tokens": new_tokens, "stream": True},
                                  enable_empty_final_response=True)
        while True:
            result, error, at = responses.get(timeout=3600)
            if error is not None:
                out["error"] = error.message()
                return out
            count = int(result.as_numpy("output_ids").size)
            if count:
                out["first"] = out["first"] or at
                out["times"] += [at] * count
                out["tokens"] += count
            if result.get_response().parameters["triton_final_response"].bool_param:
                return out
    finally:
        if decoupled:
            client.stop_stream()
        client.close()


def summarize(results: list[dict], wall: float, held: dict, cpu_seconds: float = 0.0) -> dict:
    ok = [r for r in results if r["error"] is None]
    ttft = [r["first"] - r["sent"] for r in ok if r["first"] is not None]
    itl = [b - a for r in ok for a, b in zip(r["times"], r["times"][1:], strict=False)]
    tokens = sum(r["tokens"] for r in ok)
    return {"requests": len(results), "refused": len(results) - len(ok), "output_tokens": tokens,
            "tokens_per_s": round(tokens / wall, 2), "wall_s": round(wall, 2),
            "cpu_ms_per_token": round(1000 * cpu_seconds / tokens, 1) if tokens and cpu_seconds else None,
            "held_max": held.get("held_max"), "queue_max": held.get("queue_max"),
            "ttft_p50_ms": ms(percentile(ttft, 50)), "ttft_p99_ms": ms(percentile(ttft, 99)),
            "itl_p50_ms": ms(percentile(itl, 50)), "itl_p99_ms": ms(percentile(itl, 99))}


class Sampler:
    """Samples the in-flight model's status (slots in use, queue) every 0.2 s; for a static model, the requests
    the clients have sent and not yet had answered."""

    def __init__(self, url: str, model: str, decoupled: bool):
        self.url, self.model, self.decoupled = url, model, decoupled
        self.outstanding, self.held_max, self.queue_max = 0, 0, 0
        self.lock, self.stop = threading.Lock(), threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        while not self.stop.wait(0.2):
            status = self.status() if self.decoupled else None
            if status:
                self.held_max = max(self.held_max, status["slots_in_use"])
                self.queue_max = max(self.queue_max, status["queue_length"])

    def status(self) -> dict | None:
        import tritonclient.grpc as grpcclient

        client = grpcclient.InferenceServerClient(self.url)
        responses: queue.Queue = queue.Queue()
        try:
            client.start_stream(callback=lambda result, error: responses.put((result, error)))
            inp = grpcclient.InferInput("text_input", [1], "BYTES")
            inp.set_data_from_numpy(np.array([b"status"], dtype=np.object_))
            client.async_stream_infer(self.model, [inp], parameters={"status": True})
            result, error = responses.get(timeout=30)
            return None if error else json.loads(result.as_numpy("text_output").reshape(-1)[0])
        except Exception:  # noqa: BLE001 - a sample missed
            return None
        finally:
            client.stop_stream()
            client.close()

    def track(self, delta: int) -> None:
        with self.lock:
            self.outstanding += delta
            if not self.decoupled:
                self.held_max = max(self.held_max, self.outstanding)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join(5)


def server_cpu_seconds(server_pid: int) -> float:
    """CPU seconds (user + system) of the server and its backend stubs, which share its session: the cost of the
    work itself, steadier than wall time on a machine other work also loads."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if os.getsid(int(entry.name)) != os.getsid(server_pid):
                continue
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick
        except (OSError, ProcessLookupError, IndexError, ValueError):
            continue
    return total


# ------------------------------------------------------------------ loads

def closed_loop(url: str, model: str, decoupled: bool, prompts: list[str], clients: int, new_tokens: int,
                cpu=lambda: 0.0) -> dict:
    pending = list(prompts)
    lock = threading.Lock()
    results: list[dict] = []
    sampler = Sampler(url, model, decoupled)

    def client_loop() -> None:
        while True:
            with lock:
                if not pending:
                    return
                prompt = pending.pop()
            sampler.track(+1)
            r = stream_request(url, model, prompt, new_tokens, decoupled)
            sampler.track(-1)
            with lock:
                results.append(r)

    with sampler:
        t0, cpu0 = time.perf_counter(), cpu()
        with ThreadPoolExecutor(clients) as pool:
            for _ in range(clients):
                pool.submit(client_loop)
        wall, used = time.perf_counter() - t0, cpu() - cpu0
    return summarize(results, wall, {"held_max": sampler.held_max, "queue_max": sampler.queue_max}, used)


def poisson(url: str, model: str, decoupled: bool, prompts: list[str], rate: float, new_tokens: int,
            seed: int = 0, cpu=lambda: 0.0) -> dict:
    rng = np.random.default_rng(seed)
    gaps = rng.exponential(1.0 / rate, size=len(prompts))
    results: list[dict] = []
    sampler = Sampler(url, model, decoupled)

    def one(prompt: str) -> None:
        sampler.track(+1)
        results.append(stream_request(url, model, prompt, new_tokens, decoupled))
        sampler.track(-1)

    with sampler:
        t0, cpu0 = time.perf_counter(), cpu()
        with ThreadPoolExecutor(len(prompts)) as pool:
            for prompt, gap in zip(prompts, gaps, strict=True):
                time.sleep(gap)
                pool.submit(one, prompt)
        wall, used = time.perf_counter() - t0, cpu() - cpu0
    return summarize(results, wall, {"held_max": sampler.held_max, "queue_max": sampler.queue_max}, used)


# ------------------------------------------------------------------ main

def prompt_texts(tokenizer, lengths: list[int], seed: int) -> list[str]:
    """Texts of exactly the given byte-token lengths (BOS included)."""
    rng = np.random.default_rng(seed)
    words = "the river runs past an old mill where seven herons wait for the morning tide and fish".split()
    texts = []
    for n in lengths:
        text = ""
        while len(tokenizer(text)["input_ids"]) < n:
            text += rng.choice(words) + " "
        texts.append(tokenizer.decode(tokenizer(text)["input_ids"][1:n], skip_special_tokens=True))
    return texts


def build(checkpoint: Path, work: Path, policies: list[str], max_len: int) -> dict[str, Path]:
    from exporter.checkpoint import load_model
    from exporter.onnx.export import build_onnx_engine
    from methods import make_policy

    out = {}
    for name in policies:
        target = work / f"{Path(str(checkpoint)).name}-{name}-{max_len}"
        if not target.exists():
            build_onnx_engine(load_model(str(checkpoint)), make_policy(name, **POLICIES[name]), target,
                              max_input_len=max_len)
        out[name] = target
    return out


def serve_and_run(engine: Path, batching: str, kv_memory: int, new_tokens: int, work: Path, run) -> dict:
    from engines.triton_server import TritonServer
    from exporter.triton.repo import write_repository

    repo = write_repository({"pkv": engine}, Path(tempfile.mkdtemp(dir=work)) / "repo", batching=batching,
                            kv_memory=kv_memory, max_new_tokens=new_tokens, copy=False, max_batch_size=8)
    with TritonServer(repo, log_file=work / f"triton-{engine.name}-{batching}.log") as server:
        return run(server.grpc_url, batching == "inflight", lambda: server_cpu_seconds(server.process.pid))


def slot_numbers(engine: Path, kv_memory: int, new_tokens: int) -> dict:
    from exporter.engine_dir import read_manifest
    from exporter.slot_plan import plan_slots
    from exporter.specs import ModelSpec
    from methods import check_policy_record

    m = read_manifest(engine)
    spec = ModelSpec.from_dict(m["model"])
    plan = plan_slots(check_policy_record(m["policy"]), spec.num_layers, int(m["cache_heads"]), spec.head_dim,
                      m["dtype"], int(m["max_input_len"]), new_tokens, kv_memory)
    return {"slots": plan.slots, "slot_mib": round(plan.slot_bytes / 2**20, 2)}


def plot(rows: list[dict], path: Path, what: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for key in sorted({(r["policy"], r["batching"]) for r in rows}):
        pts = sorted((r["clients"], r["tokens_per_s"]) for r in rows if (r["policy"], r["batching"]) == key)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"{key[0]} ({key[1]})",
                linestyle="-" if key[1] == "inflight" else "--")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("concurrent clients")
    ax.set_ylabel("output tokens/s")
    ax.set_title(f"Throughput at a fixed KV memory\n(2-core CPU, {what})", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main() -> int:
    from pkv_cli.common import parse_size

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--policies", nargs="+", default=list(POLICIES), choices=list(POLICIES))
    parser.add_argument("--static-policies", nargs="*", default=["full", "pyramidkv"],
                        help="Also serve these with Triton's dynamic batcher (at the largest concurrency).")
    parser.add_argument("--kv-memory", default="72MiB")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 32])
    parser.add_argument("--requests-per-client", type=int, default=2)
    parser.add_argument("--prompt-tokens", type=int, default=4000)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--rate", type=float, default=0.5, help="Poisson arrivals per second (0: skip).")
    parser.add_argument("--poisson-requests", type=int, default=24)
    parser.add_argument("--poisson-policies", nargs="*", default=["full", "pyramidkv"])
    parser.add_argument("--mix", type=int, nargs=2, default=[1024, 8000], help="Poisson prompt lengths: lo hi.")
    parser.add_argument("--work", type=Path, default=None, help="Keep checkpoint and engines here (reused).")
    parser.add_argument("--model", default=None,
                        help="A preset or checkpoint instead of the benchmark shape (tiny-llama3: a smoke run).")
    parser.add_argument("--no-doc", action="store_true")
    parser.add_argument("--doc-section", default="bench-serving",
                        help="The docs/benchmarks.md section to write (another name keeps both runs).")
    parser.add_argument("--plot", type=Path, default=ROOT / "docs" / "img" / "serving_throughput.png")
    args = parser.parse_args()
    kv_memory = parse_size(args.kv_memory)
    work = args.work or Path(tempfile.mkdtemp(prefix="pkv-bench-serving-"))
    work.mkdir(parents=True, exist_ok=True)
    from bench_peers import make_checkpoint

    checkpoint = work / "checkpoint" if args.model is None else args.model
    if args.model is None and not checkpoint.exists():
        make_checkpoint(checkpoint)
    from exporter.checkpoint import load_model

    tokenizer = load_model(str(checkpoint)).tokenizer()
    max_len = args.prompt_tokens + 1
    engines = build(checkpoint, work, sorted(set(args.policies) | set(args.static_policies)), max_len)
    log = work / "results.jsonl"  # every measured row, written as it is measured: a rerun resumes from it
    done = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []

    def recorded(kind: str, name: str, batching: str, clients: int | None = None) -> tuple[dict | None, dict]:
        key = {"kind": kind, "policy": name, "batching": batching, "clients": clients,
               "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens, "kv_memory": kv_memory}
        return next((r["row"] for r in done if r["key"] == key), None), key

    def record(key: dict, row: dict) -> None:
        with log.open("a") as f:
            f.write(json.dumps({"key": key, "row": row}) + "\n")

    closed_rows = []
    top = max(args.concurrency)
    for name in args.policies:
        for batching in ["inflight"] + (["static"] if name in args.static_policies else []):
            wanted = args.concurrency if batching == "inflight" else [top]
            levels = []
            for clients in wanted:
                row, _ = recorded("closed", name, batching, clients)
                if row is not None:
                    closed_rows.append(row)
                else:
                    levels.append(clients)
            if not levels:
                continue

            slots = slot_numbers(engines[name], kv_memory, args.new_tokens) if batching == "inflight" else {}

            def run(url, decoupled, cpu, levels=levels, name=name, batching=batching, slots=slots):
                rows = []
                for clients in levels:
                    prompts = prompt_texts(tokenizer, [args.prompt_tokens] * (clients * args.requests_per_client),
                                           seed=clients)
                    row = {"policy": name, "batching": batching, **slots, "clients": clients,
                           **closed_loop(url, "pkv", decoupled, prompts, clients, args.new_tokens, cpu)}
                    record(recorded("closed", name, batching, clients)[1], row)
                    rows.append(row)
                    print(f"{name} {batching} C={clients}: {row}", file=sys.stderr, flush=True)
                return rows

            closed_rows += serve_and_run(engines[name], batching, kv_memory, args.new_tokens, work, run)
    poisson_rows = []
    if args.rate > 0:
        mixed = build(checkpoint, work, args.poisson_policies, args.mix[1] + 1)
        rng = np.random.default_rng(1)
        lengths = rng.integers(args.mix[0], args.mix[1] + 1, size=args.poisson_requests).tolist()
        prompts = prompt_texts(tokenizer, lengths, seed=7)
        for name in args.poisson_policies:
            row, key = recorded("poisson", name, "inflight")
            if row is None:
                def run(url, decoupled, cpu):
                    return poisson(url, "pkv", decoupled, prompts, args.rate, args.new_tokens, cpu=cpu)

                row = {"policy": name, "batching": "inflight", **slot_numbers(mixed[name], kv_memory,
                                                                               args.new_tokens),
                       **serve_and_run(mixed[name], "inflight", kv_memory, args.new_tokens, work, run)}
                record(key, row)
                print(f"poisson {name}: {row}", file=sys.stderr, flush=True)
            poisson_rows.append(row)
    targets = evaluate(closed_rows, top)
    report = {"kv_memory": kv_memory, "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens,
              "closed_loop": closed_rows, "poisson": poisson_rows, "targets": targets}
    print(json.dumps(report, indent=2))
    text = markdown(report, args)
    print(text)
    if not args.no_doc:
        plot(closed_rows, args.plot, f"{args.prompt_tokens}-token prompts, {args.new_tokens} new tokens")
        write_section(args.doc_section, text)
    return 0


def evaluate(rows: list[dict], top: int) -> dict:
    def row(policy, batching, clients=top):
        return next((r for r in rows if (r["policy"], r["batching"], r["clients"]) == (policy, batching, clients)),
                    None)

    out = {}
    full, pyramid = row("full", "inflight"), row("pyramidkv", "inflight")
    if full and pyramid:
        out["pyramidkv_held_vs_full"] = round(pyramid["held_max"] / max(full["held_max"], 1), 2)
        out["pyramidkv_tokens_per_s_vs_full"] = round(pyramid["tokens_per_s"] / full["tokens_per_s"], 2)
        if full.get("cpu_ms_per_token") and pyramid.get("cpu_ms_per_token"):
            out["full_cpu_per_token_vs_pyramidkv"] = round(full["cpu_ms_per_token"] / pyramid["cpu_ms_per_token"], 2)
    static = row("pyramidkv", "static")
    if pyramid and static:
        out["inflight_vs_static_tokens_per_s"] = round(pyramid["tokens_per_s"] / static["tokens_per_s"], 2)
    static_full = row("full", "static")
    if full and static_full:
        out["full_inflight_vs_static_tokens_per_s"] = round(full["tokens_per_s"] / static_full["tokens_per_s"], 2)
    out["met"] = {"held_8x": out.get("pyramidkv_held_vs_full", 0) >= 8,
                  "tokens_3x": out.get("pyramidkv_tokens_per_s_vs_full", 0) >= 3,
                  "inflight_2x_static": out.get("inflight_vs_static_tokens_per_s", 0) >= 2}
    return out


def markdown(report: dict, args) -> str:
    command = "python scripts/bench_serving.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    cols = ["policy", "batching", "slots", "clients", "requests", "held_max", "tokens_per_s", "cpu_ms_per_token",
            "ttft_p50_ms",
            "ttft_p99_ms", "itl_p50_ms", "itl_p99_ms", "refused"]
    lines = [f"## Serving at a fixed KV memory ({report['prompt_tokens']}-token prompts, {report['new_tokens']} new "
             "tokens): in-flight batching per policy, FullKV, static batching", "",
             f"`{command.strip()}`", "",
             f"One tritonserver per row group (python backend, CPU, 2 cores), the bench_peers model (8 layers, hidden "
             f"512, 8/2 heads x 64, fp32), KV memory {report['kv_memory'] / 2**20:.0f} MiB for every policy, "
             f"{report['prompt_tokens']}-token prompts, {report['new_tokens']} new tokens, gRPC streams. `slots`: "
             "what the memory holds; `held_max`: the most sequences the server held at once (its status, sampled "
             "every 0.2 s; static: requests outstanding); `cpu_ms_per_token`: CPU time of the server's processes per "
             "output token (steadier than wall time when other work loads the machine); ttft / itl: time to first "
             "token / between tokens.", "",
             markdown_table(cols, report["closed_loop"])]
    if report["poisson"]:
        lines += ["", f"Poisson arrivals ({args.rate}/s, {args.poisson_requests} requests, prompts "
                      f"{args.mix[0]}-{args.mix[1]} tokens, engines built for {args.mix[1] + 1}):", "",
                  markdown_table(["policy", "slots", "requests", "held_max", "queue_max", "tokens_per_s",
                                  "cpu_ms_per_token",
                                  "ttft_p50_ms", "ttft_p99_ms", "itl_p50_ms", "itl_p99_ms", "refused"],
                                 report["poisson"])]
    lines += ["", "Ratios at the largest concurrency (issue 22's targets are for 4k-token prompts and 64 new tokens: "
                  "PyramidKV holds >= 8x FullKV's sequences and reaches >= 3x its tokens/s; in-flight >= 2x static): "
                  + json.dumps(report["targets"])]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
