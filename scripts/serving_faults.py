"""Soak test of in-flight serving under load and faults: many concurrent streams, a fifth of them malformed,
cancelled mid-stream or sent by client processes killed mid-stream, on one real tritonserver.

Checks, and prints as JSON then Markdown: the server stayed up; every good answer equals the engine's direct
output for its prompt alone; every bad request got an error; every slot is free and the queue empty afterwards
(the model's status); the backend process's memory returned to its idle level (RSS after the load, once idle,
within --rss-slack of the RSS measured idle before it, after a warm-up). Exit code 1 when a check fails.

    python scripts/serving_faults.py [--streams 256] [--killed-processes 16] [--seconds 120] [--model tiny-llama3]

tests/engines/test_inflight_serving.py runs the same kinds of faults at a small scale in CI.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

KILLED_CLIENT = """
import sys, time, numpy as np, tritonclient.grpc as g
url, n = sys.argv[1], int(sys.argv[2])
clients = []
for k in range(n):
    c = g.InferenceServerClient(url)
    c.start_stream(callback=lambda result, error: print('piece', flush=True))
    i = g.InferInput('text_input', [1], 'BYTES')
    i.set_data_from_numpy(np.array([('killed client %d: the river runs past the mill ' % k).encode() * 4],
                                   dtype=object))
    c.async_stream_infer('pkv', [i], parameters={'max_new_tokens': 64, 'stream': True})
    clients.append(c)
time.sleep(600)
"""


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def backend_pids(server_pid: int) -> list[int]:
    """The python backend stub processes of the server (its session)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if os.getsid(int(entry.name)) == os.getsid(server_pid) and \
                        b"triton_python_backend_stub" in (entry / "cmdline").read_bytes():
                    pids.append(int(entry.name))
            except (OSError, ProcessLookupError):
                continue
    return pids


def stream(url: str, prompt: str, params: dict, cancel_after: int | None = None, deadline: float = 600) -> dict:
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(url)
    responses: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: responses.put((result, error)))
    inp = grpcclient.InferInput("text_input", [1], "BYTES")
    inp.set_data_from_numpy(np.array([prompt.encode()], dtype=np.object_))
    out = {"ids": [], "error": None, "responses": 0, "done": False}
    try:
        client.async_stream_infer("pkv", [inp], parameters=params, enable_empty_final_response=True)
        while True:
            result, error = responses.get(timeout=deadline)
            if error is not None:
                out["error"] = error.message()
                return out
            out["ids"] += result.as_numpy("output_ids").reshape(-1).tolist()
            out["responses"] += 1
            if result.get_response().parameters["triton_final_response"].bool_param:
                out["done"] = True
                return out
            if cancel_after is not None and out["responses"] >= cancel_after:
                return out
    except queue.Empty:
        out["error"] = "no response in time"
        return out
    finally:
        client.stop_stream(cancel_requests=True)
        client.close()


def status(url: str) -> dict:
    return json.loads(stream_text(url))


def stream_text(url: str) -> bytes:
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(url)
    responses: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: responses.put((result, error)))
    inp = grpcclient.InferInput("text_input", [1], "BYTES")
    inp.set_data_from_numpy(np.array([b"status"], dtype=np.object_))
    try:
        client.async_stream_infer("pkv", [inp], parameters={"status": True})
        result, error = responses.get(timeout=60)
        if error is not None:
            raise RuntimeError(error.message())
        return result.as_numpy("text_output").reshape(-1)[0]
    finally:
        client.stop_stream()
        client.close()


def wait_idle(url: str, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        s = status(url)
        if (s["slots_in_use"] == 0 and s["queue_length"] == 0) or time.monotonic() > deadline:
            return s
        time.sleep(0.2)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny-llama3")
    parser.add_argument("--policy", default="pyramidkv")
    parser.add_argument("--streams", type=int, default=256)
    parser.add_argument("--killed-processes", type=int, default=16, help="Client processes killed mid-stream.")
    parser.add_argument("--streams-per-killed", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=300, help="Bound on the whole load.")
    parser.add_argument("--new-tokens", type=int, default=24)
    parser.add_argument("--kv-memory", default="32MiB")
    parser.add_argument("--rss-slack", type=float, default=0.10, help="Allowed RSS growth after the load.")
    args = parser.parse_args()

    from engines.ort_engine import OrtEngine
    from engines.triton_server import TritonServer
    from exporter.checkpoint import load_model
    from exporter.onnx.export import build_onnx_engine
    from exporter.triton.repo import write_repository
    from methods import make_policy
    from pkv_cli.common import parse_size

    work = Path(tempfile.mkdtemp(prefix="pkv-serving-faults-"))
    options = {} if args.policy == "full" else {"kv_budget": 32, "window": 4}
    build_onnx_engine(load_model(args.model), make_policy(args.policy, **options), work / "engine", max_input_len=256)
    engine = OrtEngine(work / "engine")
    prompts = [f"Stream {i}: the river runs past the old mill and " + "word " * (i * 7 % 30) for i in range(64)]
    direct = {p: engine.generate([p], args.new_tokens).tokens[0] for p in prompts}
    repo = write_repository({"pkv": work / "engine"}, work / "repo", batching="inflight",
                            kv_memory=parse_size(args.kv_memory), max_new_tokens=64, copy=False)
    report: dict = {"streams": args.streams, "killed_processes": args.killed_processes}
    with TritonServer(repo) as server:
        url = server.grpc_url
        stubs = backend_pids(server.process.pid)
        for p in prompts[:8]:  # warm-up: decode batches of every small size bound once
            stream(url, p, {"max_new_tokens": args.new_tokens})
        wait_idle(url)
        idle_rss = sum(rss_kib(p) for p in stubs)
        report["slots_total"] = status(url)["slots_total"]
        killed = [subprocess.Popen([sys.executable, "-c", KILLED_CLIENT, url, str(args.streams_per_killed)],
                                   stdout=subprocess.PIPE) for _ in range(args.killed_processes)]
        jobs = []
        for i in range(args.streams):
            prompt = prompts[i % len(prompts)]
            kind = {1: "malformed", 3: "cancelled"}.get(i % 5, "good")
            if kind == "malformed":
                params = [{"max_new_tokens": -1}, {"stop": ""}, {"stream": "yes"}, {"max_new_tokens": 10**6}][i % 4]
            else:
                params = {"max_new_tokens": args.new_tokens if kind == "good" else 64, "stream": True}
            jobs.append((kind, prompt, params))
        t0 = time.monotonic()
        results = []
        with ThreadPoolExecutor(len(jobs)) as pool:
            futures = [pool.submit(stream, url, prompt, params, 3 if kind == "cancelled" else None, args.seconds)
                       for kind, prompt, params in jobs]
            for proc in killed:  # kill each client process once it is receiving tokens
                proc.stdout.readline()
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()
            results = [f.result() for f in futures]
        report["load_seconds"] = round(time.monotonic() - t0, 1)
        good = [(p, r) for (kind, p, _), r in zip(jobs, results, strict=True) if kind == "good"]
        bad = [r for (kind, _, _), r in zip(jobs, results, strict=True) if kind == "malformed"]
        report["good"] = len(good)
        report["good_equal_direct"] = sum(r["error"] is None and r["ids"] == direct[p] for p, r in good)
        report["malformed"] = len(bad)
        report["malformed_refused"] = sum(r["error"] is not None for r in bad)
        report["cancelled"] = sum(kind == "cancelled" for kind, _, _ in jobs)
        report["server_up"] = server.ready() and server.process.poll() is None
        after = wait_idle(url)
        report.update({f"after_{k}": after[k] for k in ("slots_in_use", "queue_length", "kv_bytes_held")})
        time.sleep(1)
        report["idle_rss_mib"], report["after_rss_mib"] = round(idle_rss / 1024, 1), round(
            sum(rss_kib(p) for p in stubs) / 1024, 1)
        report["still_answers"] = stream(url, prompts[0], {"max_new_tokens": args.new_tokens})["ids"] == \
            direct[prompts[0]]
    checks = {"server_up": report["server_up"], "good_answers_equal": report["good_equal_direct"] == report["good"],
              "malformed_refused": report["malformed_refused"] == report["malformed"],
              "slots_free": report["after_slots_in_use"] == 0 and report["after_queue_length"] == 0,
              "memory_back": report["after_rss_mib"] <= report["idle_rss_mib"] * (1 + args.rss_slack),
              "still_answers": report["still_answers"]}
    report["checks"] = checks
    print(json.dumps(report, indent=2))
    print("| check | result |\n|---|---|\n" + "\n".join(f"| {k} | {'pass' if v else 'FAIL'} |" for k, v in
                                                       checks.items()))
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
