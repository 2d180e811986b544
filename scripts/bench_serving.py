"""Serving at a fixed KV memory: in-flight batching with and without chunked prefill, per policy (FullKV against
PyramidKV), and optionally Triton's static batcher, on one real tritonserver per configuration.

The model is --model (a preset such as smollm2-135m, the real SmolLM2-135M-Instruct, or a checkpoint directory) or,
by default, the LLaMA-shaped synthetic benchmark checkpoint of scripts/bench_peers.py (8 layers, hidden 512, 8 query
/ 2 KV heads x 64, random weights, byte tokenizer). Every policy's engine (one per policy, built for the longest
prompt) is served with the same `--kv-memory`. A configuration is a policy and a `--step-tokens` budget (0: every
prompt prefilled whole between two decode steps, the scheduler before chunked prefill); each runs, on its own
server:

1. closed loop: C clients (C in --concurrency) each send --requests-per-client prompts of --prompt-tokens tokens
   back to back, --new-tokens each (ignore_eos: every answer has that many tokens), over gRPC streams;
2. Poisson arrivals (--rate requests/s, --poisson-requests prompts of lengths drawn from --mix).

Per run: output tokens/s, the most sequences the server held at once (its status, sampled), time to first token
and inter-token latency p50/p99, the server's mean step with no prompt work (`decode_step_ms`: the decode of the
sequences in flight alone) and with it, and whether every answer equals the whole-prefill configuration's
(token ids per prompt). The targets of issue 34 are evaluated from one run's rows.

Prints JSON, then Markdown tables; writes its docs/benchmarks.md section (--doc-section) and a plot (--plot) unless
--no-doc. Measured rows are appended to WORK/results.jsonl as they come: a rerun with the same --work resumes.

    python scripts/bench_serving.py [--model smollm2-135m] [--policies full pyramidkv] [--step-tokens 0 256] \\
        [--kv-memory 72MiB] [--concurrency 1 8 32] [--prompt-tokens 1000] [--new-tokens 64] \\
        [--rate 0.2] [--poisson-requests 12] [--mix 256 2000] [--work WORK] [--no-doc]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import queue
import shlex
import shutil
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
SYNTHETIC = "synthetic (bench_peers: 8 layers, hidden 512, 8/2 heads x 64, random weights, fp32)"


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def ms(value: float | None) -> float | None:
    return None if value is None else round(1000 * value, 1)


# ------------------------------------------------------------------ one request

def stream_request(url: str, model: str, text: str, new_tokens: int, decoupled: bool) -> dict:
    """One request; {'sent', 'first', 'times' (arrival of each token), 'ids', 'error'} (perf_counter times)."""
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(url)
    inp = grpcclient.InferInput("text_input", [1] if decoupled else [1, 1], "BYTES")
    data = np.array([text.encode()], dtype=np.object_)
    inp.set_data_from_numpy(data if decoupled else data.reshape(1, 1))
    out = {"sent": time.perf_counter(), "first": None, "times": [], "ids": [], "error": None}
    try:
        if not decoupled:  # static batching: one response with the whole answer
            try:
                result = client.infer(model, [inp], parameters={"max_new_tokens": new_tokens}, client_timeout=3600)
            except Exception as e:  # noqa: BLE001 - the report counts failed requests
                out["error"] = str(e)
                return out
            now = time.perf_counter()
            out["first"], out["ids"], out["times"] = now, result.as_numpy("output_ids").reshape(-1).tolist(), [now]
            return out
        responses: queue.Queue = queue.Queue()
        client.start_stream(callback=lambda result, error: responses.put((result, error, time.perf_counter())))
        client.async_stream_infer(model, [inp], enable_empty_final_response=True,
                                  parameters={"max_new_tokens": new_tokens, "stream": True, "ignore_eos": True})
        while True:
            result, error, at = responses.get(timeout=3600)
            if error is not None:
                out["error"] = error.message()
                return out
            ids = result.as_numpy("output_ids").reshape(-1).tolist()
            if ids:
                out["first"] = out["first"] or at
                out["times"] += [at] * len(ids)
                out["ids"] += ids
            if result.get_response().parameters["triton_final_response"].bool_param:
                return out
    finally:
        if decoupled:
            client.stop_stream()
        client.close()


def answers_digest(results: list[dict]) -> dict[str, str]:
    """Per prompt (its sha1), the sha1 of the answer's token ids: compared across configurations."""
    return {hashlib.sha1(r["prompt"].encode()).hexdigest()[:12]: hashlib.sha1(str(r["ids"]).encode()).hexdigest()[:12]
            for r in results if r["error"] is None}


def summarize(results: list[dict], wall: float, sampler: Sampler, cpu_seconds: float, steps: dict) -> dict:
    ok = [r for r in results if r["error"] is None]
    ttft = [r["first"] - r["sent"] for r in ok if r["first"] is not None]
    itl = [b - a for r in ok for a, b in zip(r["times"], r["times"][1:], strict=False)]
    tokens = sum(len(r["ids"]) for r in ok)
    return {"requests": len(results), "refused": len(results) - len(ok), "output_tokens": tokens,
            "tokens_per_s": round(tokens / wall, 2), "wall_s": round(wall, 2),
            "cpu_ms_per_token": round(1000 * cpu_seconds / tokens, 1) if tokens and cpu_seconds else None,
            "held_max": sampler.held_max, "queue_max": sampler.queue_max,
            "ttft_p50_ms": ms(percentile(ttft, 50)), "ttft_p99_ms": ms(percentile(ttft, 99)),
            "itl_p50_ms": ms(percentile(itl, 50)), "itl_p99_ms": ms(percentile(itl, 99)), **steps,
            "answers": answers_digest(results)}


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

    def steps(self, before: dict | None, after: dict | None) -> dict:
        """Mean loop step (ms) over the run with no prompt work (the decode alone) and with it, from the server's
        counters."""
        if not before or not after or "decode_only_steps" not in after:
            return {}
        out = {}
        for kind, name in (("decode_only", "decode_step_ms"), ("mixed", "mixed_step_ms")):
            n = after[f"{kind}_steps"] - before[f"{kind}_steps"]
            seconds = after[f"{kind}_seconds"] - before[f"{kind}_seconds"]
            out[name] = round(1000 * seconds / n, 1) if n else None
        return out

    def track(self, delta: int) -> None:
        with self.lock:
            self.outstanding += delta
            if not self.decoupled:
                self.held_max = max(self.held_max, self.outstanding)

    def __enter__(self):
        self.before = self.status() if self.decoupled else None
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join(5)
        self.after = self.status() if self.decoupled else None


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

def run_load(url: str, model: str, decoupled: bool, prompts: list[str], new_tokens: int, cpu, *,
             clients: int | None = None, rate: float | None = None, seed: int = 0) -> dict:
    """A closed loop of `clients` clients sending `prompts` back to back, or Poisson arrivals of them at `rate`/s."""
    results: list[dict] = []
    lock = threading.Lock()
    sampler = Sampler(url, model, decoupled)

    def one(prompt: str) -> None:
        sampler.track(+1)
        r = stream_request(url, model, prompt, new_tokens, decoupled) | {"prompt": prompt}
        sampler.track(-1)
        with lock:
            results.append(r)

    pending = list(prompts)

    def client_loop() -> None:
        while True:
            with lock:
                if not pending:
                    return
                prompt = pending.pop()
            one(prompt)

    with sampler:
        t0, cpu0 = time.perf_counter(), cpu()
        if clients is not None:
            with ThreadPoolExecutor(clients) as pool:
                for _ in range(clients):
                    pool.submit(client_loop)
        else:
            gaps = np.random.default_rng(seed).exponential(1.0 / rate, size=len(prompts))
            with ThreadPoolExecutor(len(prompts)) as pool:
                for prompt, gap in zip(prompts, gaps, strict=True):
                    time.sleep(gap)
                    pool.submit(one, prompt)
        wall, used = time.perf_counter() - t0, cpu() - cpu0
    return summarize(results, wall, sampler, used, sampler.steps(sampler.before, sampler.after))


# ------------------------------------------------------------------ main

def prompt_texts(tokenizer, lengths: list[int], seed: int) -> list[str]:
    """Texts of about the given token lengths (the tokenizer's special tokens included), cut from one long text
    of plain words at random offsets."""
    rng = np.random.default_rng(seed)
    words = "the river runs past an old mill where seven herons wait for the morning tide and fish".split()
    special = len(tokenizer("")["input_ids"])
    need = max(lengths) - special
    text = " ".join(rng.choice(words, size=2 * need + 64))
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    while len(ids) < 2 * need:  # a tokenizer that merges words: more text
        text += " " + " ".join(rng.choice(words, size=need))
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    texts = []
    for n in lengths:
        start = int(rng.integers(0, len(ids) - need + 1))
        texts.append(tokenizer.decode(ids[start : start + n - special], skip_special_tokens=True).strip())
    return texts


def build(source: str, name_of: str, work: Path, policies: list[str], max_len: int) -> dict[str, Path]:
    from exporter.checkpoint import load_model
    from exporter.onnx.export import build_onnx_engine
    from methods import make_policy

    out = {}
    for name in policies:
        target = work / f"{name_of}-{name}-{max_len}"
        if not target.exists():
            print(f"building {target.name} ...", file=sys.stderr, flush=True)
            build_onnx_engine(load_model(source), make_policy(name, **POLICIES[name]), target, max_input_len=max_len)
        out[name] = target
    return out


def serve_and_run(engine: Path, batching: str, kv_memory: int, new_tokens: int, step_tokens: int, work: Path,
                  run) -> list[dict]:
    from engines.triton_server import TritonServer
    from exporter.triton.repo import write_repository

    repo = write_repository({"pkv": engine}, Path(tempfile.mkdtemp(dir=work)) / "repo", batching=batching,
                            kv_memory=kv_memory, max_new_tokens=new_tokens, copy=False, max_batch_size=8,
                            step_tokens=step_tokens)
    with TritonServer(repo, log_file=work / f"triton-{engine.name}-{batching}-{step_tokens}.log") as server:
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


def label(row: dict) -> str:
    if row["batching"] != "inflight":
        return f"{row['policy']} static"
    return f"{row['policy']} " + (f"chunked {row['step_tokens']}" if row["step_tokens"] else "whole prefills")


def plot(closed: list[dict], poisson: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for key in sorted({label(r) for r in closed}):
        pts = sorted((r["clients"], r["tokens_per_s"]) for r in closed if label(r) == key)
        left.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=key,
                  linestyle="-" if "chunked" in key else "--")
    left.set_xscale("log", base=2)
    left.set_xlabel("concurrent clients (closed loop)")
    left.set_ylabel("output tokens/s")
    left.grid(alpha=0.3)
    left.legend(fontsize=8)
    if poisson:
        names = [label(r) for r in poisson]
        x = np.arange(len(names))
        for offset, (col, text) in zip((-0.3, -0.1, 0.1, 0.3), (("itl_p50_ms", "ITL p50"), ("itl_p99_ms", "ITL p99"),
                                                                  ("ttft_p50_ms", "TTFT p50"),
                                                                  ("ttft_p99_ms", "TTFT p99")), strict=True):
            right.bar(x + offset, [r[col] or 0 for r in poisson], width=0.2, label=text)
        right.set_yscale("log")
        right.set_xticks(x, names, rotation=20, fontsize=8, ha="right")
        right.set_ylabel("ms (log)")
        right.set_title("Poisson arrivals", fontsize=9)
        right.grid(alpha=0.3, axis="y")
        right.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main() -> int:
    from exporter.slot_plan import DEFAULT_STEP_TOKENS
    from pkv_cli.common import parse_size

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--policies", nargs="+", default=["full", "pyramidkv"], choices=list(POLICIES))
    parser.add_argument("--step-tokens", type=int, nargs="+", default=[0, DEFAULT_STEP_TOKENS],
                        help="In-flight configurations: the scheduler's --step-tokens (0: whole prefills).")
    parser.add_argument("--static-policies", nargs="*", default=[],
                        help="Also serve these with Triton's dynamic batcher (at the largest concurrency).")
    parser.add_argument("--kv-memory", default="72MiB")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--requests-per-client", type=int, default=1)
    parser.add_argument("--prompt-tokens", type=int, default=1000)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--rate", type=float, default=0.2, help="Poisson arrivals per second (0: skip).")
    parser.add_argument("--poisson-requests", type=int, default=12)
    parser.add_argument("--mix", type=int, nargs=2, default=[256, 2000], help="Poisson prompt lengths: lo hi.")
    parser.add_argument("--max-input-len", type=int, default=None,
                        help="Build the engines for this many prompt tokens [the longest prompt + 1]: slot sizes "
                             "(FullKV's) follow from it.")
    parser.add_argument("--work", type=Path, default=None, help="Keep checkpoint, engines and results here.")
    parser.add_argument("--model", default=None,
                        help="A preset or checkpoint instead of the synthetic benchmark model (smollm2-135m: the "
                             "real model; tiny-llama3: a smoke run).")
    parser.add_argument("--no-doc", action="store_true")
    parser.add_argument("--doc-section", default="bench-serving",
                        help="The docs/benchmarks.md section to write (another name keeps both runs).")
    parser.add_argument("--plot", type=Path, default=ROOT / "docs" / "img" / "serving_throughput.png")
    args = parser.parse_args()
    kv_memory = parse_size(args.kv_memory)
    work = args.work or Path(tempfile.mkdtemp(prefix="pkv-bench-serving-"))
    work.mkdir(parents=True, exist_ok=True)
    from bench_peers import make_checkpoint

    source = str(work / "checkpoint") if args.model is None else args.model
    if args.model is None and not (Path(source) / "model.safetensors").exists():  # absent, or a killed run's
        shutil.rmtree(source, ignore_errors=True)
        make_checkpoint(Path(source))
    from exporter.checkpoint import load_model

    loaded = load_model(source)
    tokenizer = loaded.tokenizer()
    what = SYNTHETIC if args.model is None else f"{args.model} ({loaded.spec.num_layers} layers, hidden " \
        f"{loaded.spec.hidden_size}, {loaded.spec.num_heads}/{loaded.spec.num_kv_heads} heads x {loaded.spec.head_dim})"
    max_len = args.max_input_len or max(args.prompt_tokens, args.mix[1] if args.rate > 0 else 0) + 1
    name_of = "synthetic" if args.model is None else Path(args.model).name
    engines = build(source, name_of, work, sorted(set(args.policies) | set(args.static_policies)), max_len)
    log = work / "results.jsonl"  # every measured row, written as it is measured: a rerun resumes from it
    done = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []

    def key_of(kind: str, name: str, batching: str, step: int | None, clients: int | None) -> dict:
        return {"kind": kind, "policy": name, "batching": batching, "step_tokens": step, "clients": clients,
                "model": name_of, "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens,
                "kv_memory": kv_memory, "max_len": max_len,
                **({"rate": args.rate, "requests": args.poisson_requests, "mix": args.mix} if kind == "poisson"
                   else {"per_client": args.requests_per_client})}

    def recorded(key: dict) -> dict | None:
        return next((r["row"] for r in done if r["key"] == key), None)

    rng = np.random.default_rng(1)
    poisson_prompts = prompt_texts(tokenizer, rng.integers(args.mix[0], args.mix[1] + 1,
                                                           size=args.poisson_requests).tolist(), seed=7)
    configs = [(name, "inflight", step) for name in args.policies for step in args.step_tokens]
    configs += [(name, "static", None) for name in args.static_policies]
    top = max(args.concurrency)
    rows = []
    for name, batching, step in configs:
        plan = [("closed", c) for c in (args.concurrency if batching == "inflight" else [top])]
        plan += [("poisson", None)] if args.rate > 0 and batching == "inflight" else []
        todo = []
        for kind, clients in plan:
            row = recorded(key_of(kind, name, batching, step, clients))
            if row is not None:
                rows.append(row)
            else:
                todo.append((kind, clients))
        if not todo:
            continue
        base = {"policy": name, "batching": batching, "step_tokens": step,
                **(slot_numbers(engines[name], kv_memory, args.new_tokens) if batching == "inflight" else {})}

        def run(url, decoupled, cpu, todo=todo, name=name, batching=batching, step=step, base=base):
            out = []
            for kind, clients in todo:
                if kind == "closed":
                    prompts = prompt_texts(tokenizer, [args.prompt_tokens] * (clients * args.requests_per_client),
                                           seed=clients)
                    result = run_load(url, "pkv", decoupled, prompts, args.new_tokens, cpu, clients=clients)
                else:
                    result = run_load(url, "pkv", decoupled, poisson_prompts, args.new_tokens, cpu, rate=args.rate)
                row = {**base, "kind": kind, "clients": clients, **result}
                done.append({"key": key_of(kind, name, batching, step, clients), "row": row})
                with log.open("a") as f:
                    f.write(json.dumps(done[-1]) + "\n")
                out.append(row)
                print(f"{label(row)} {kind} C={clients}: " + json.dumps({k: v for k, v in row.items()
                                                                         if k != "answers"}),
                      file=sys.stderr, flush=True)
            return out

        rows += serve_and_run(engines[name], batching, kv_memory, args.new_tokens, step or 0, work, run)
    mark_equal_answers(rows)
    closed = [r for r in rows if r["kind"] == "closed"]
    poisson = [r for r in rows if r["kind"] == "poisson"]
    report = {"model": what, "kv_memory": kv_memory, "prompt_tokens": args.prompt_tokens,
              "new_tokens": args.new_tokens, "closed_loop": [_public(r) for r in closed],
              "poisson": [_public(r) for r in poisson], "targets": evaluate(rows, top)}
    print(json.dumps(report, indent=2))
    text = markdown(report, args, max_len)
    print(text)
    if not args.no_doc:
        plot(closed, poisson, args.plot, f"{what}: {args.prompt_tokens}-token prompts, {args.new_tokens} new tokens, "
                                         f"{kv_memory / 2**20:.0f} MiB of KV")
        write_section(args.doc_section, text)
    return 0


def _public(row: dict) -> dict:
    return {k: v for k, v in row.items() if k != "answers"}


def mark_equal_answers(rows: list[dict]) -> None:
    """`answers_equal`: every answer of an in-flight run equals the same prompt's answer in the policy's
    whole-prefill run of the same load (None without one)."""
    for row in rows:
        whole = next((r for r in rows if r["batching"] == "inflight" and r["step_tokens"] == 0
                      and (r["policy"], r["kind"], r["clients"]) == (row["policy"], row["kind"], row["clients"])),
                     None)
        row["answers_equal"] = None if whole is None or row is whole else row["answers"] == whole["answers"]


def evaluate(rows: list[dict], top: int) -> dict:
    """Issue 34's targets, per policy with a chunked configuration (the first nonzero step budget)."""

    def find(policy, kind, step, clients=None):
        return next((r for r in rows if r["batching"] == "inflight" and (r["policy"], r["kind"], r["step_tokens"])
                     == (policy, kind, step) and (kind == "poisson" or r["clients"] == clients)), None)

    out = {}
    steps = sorted({r["step_tokens"] for r in rows if r["batching"] == "inflight" and r["step_tokens"]})
    for policy in sorted({r["policy"] for r in rows}):
        for step in steps:
            t = {}
            chunked, whole = find(policy, "poisson", step), find(policy, "poisson", 0)
            if chunked and chunked.get("decode_step_ms") and chunked.get("itl_p99_ms"):
                t["poisson_itl_p99_vs_decode_step"] = round(chunked["itl_p99_ms"] / chunked["decode_step_ms"], 2)
                t["itl_p99_within_3x_decode_step"] = t["poisson_itl_p99_vs_decode_step"] <= 3
            if chunked and whole:
                t["poisson_ttft_p99_chunked_vs_whole"] = round(chunked["ttft_p99_ms"] / whole["ttft_p99_ms"], 2)
                t["ttft_p99_no_worse"] = chunked["ttft_p99_ms"] <= whole["ttft_p99_ms"]
                t["poisson_itl_p99_chunked_vs_whole"] = round(chunked["itl_p99_ms"] / whole["itl_p99_ms"], 2)
            chunked, whole = find(policy, "closed", step, top), find(policy, "closed", 0, top)
            if chunked and whole:
                t[f"tokens_per_s_{top}_clients_chunked_vs_whole"] = round(chunked["tokens_per_s"]
                                                                          / whole["tokens_per_s"], 2)
                t["tokens_per_s_no_worse"] = chunked["tokens_per_s"] >= whole["tokens_per_s"]
                t[f"ttft_p99_{top}_clients_chunked_vs_whole"] = round(chunked["ttft_p99_ms"] / whole["ttft_p99_ms"], 2)
            if t:
                out[f"{policy} step {step}"] = t
    for step in [*steps, 0]:
        full, pyramid = find("full", "closed", step, top), find("pyramidkv", "closed", step, top)
        if full and pyramid:
            out[f"pyramidkv vs full, step {step}, {top} clients"] = {
                "slots_ratio": round(pyramid["slots"] / full["slots"], 2),
                "held_ratio": round(pyramid["held_max"] / max(full["held_max"], 1), 2),
                "tokens_per_s_ratio": round(pyramid["tokens_per_s"] / full["tokens_per_s"], 2)}
    return out


def markdown(report: dict, args, max_len: int) -> str:
    command = "python scripts/bench_serving.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    cols = ["policy", "batching", "step_tokens", "slots", "clients", "requests", "held_max", "tokens_per_s",
            "cpu_ms_per_token", "ttft_p50_ms", "ttft_p99_ms", "itl_p50_ms", "itl_p99_ms", "decode_step_ms",
            "mixed_step_ms", "answers_equal", "refused"]
    lines = [f"## Serving at a fixed KV memory, chunked prefill: {report['model']}, {report['prompt_tokens']}-token "
             f"prompts, {report['new_tokens']} new tokens", "",
             f"`{command.strip()}`", "",
             f"One tritonserver per configuration (python backend, CPU, 2 shared cores), KV memory "
             f"{report['kv_memory'] / 2**20:.0f} MiB for every policy (engines built for {max_len} tokens), closed "
             f"loop: {report['prompt_tokens']}-token prompts, {report['new_tokens']} new tokens each (ignore_eos), "
             f"{args.requests_per_client} request(s) per client, gRPC streams. `step_tokens`: the scheduler's "
             "budget per step (0: every prompt prefilled whole between two decode steps, as before chunked prefill); "
             "`slots`: what the memory holds; `held_max`: the most sequences held at once (status, sampled every "
             "0.2 s); `cpu_ms_per_token`: the server's CPU time per output token; ttft / itl: time to first token / "
             "between tokens (client side); `decode_step_ms` / `mixed_step_ms`: the server's mean loop step without / "
             "with prompt work during the run; `answers_equal`: every answer equals the whole-prefill run's for the "
             "same prompt.", "",
             markdown_table(cols, report["closed_loop"])]
    if report["poisson"]:
        lines += ["", f"Poisson arrivals ({args.rate}/s, {args.poisson_requests} requests, prompts "
                      f"{args.mix[0]}-{args.mix[1]} tokens):", "",
                  markdown_table(["policy", "step_tokens", "slots", "requests", "held_max", "queue_max",
                                  "tokens_per_s", "ttft_p50_ms", "ttft_p99_ms", "itl_p50_ms", "itl_p99_ms",
                                  "decode_step_ms", "mixed_step_ms", "answers_equal", "refused"],
                                 report["poisson"])]
    lines += ["", "Targets (issue 34; ratios from this run): " + json.dumps(report["targets"])]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
