"""In-flight batching served by a real tritonserver (decoupled python-backend model, engines/triton_inflight.py):
streamed gRPC and HTTP answers equal the engine's direct output under concurrency, the status request and the
Prometheus gauges, cancellation and killed clients free their slots, bad requests get one clear error while the
server stays up, and the OpenAI-compatible endpoint answers the official `openai` client."""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from engines.ort_engine import OrtEngine
from engines.triton_server import TritonServer, free_port, free_ports, pytriton_dir
from exporter.triton.repo import write_repository
from pkv_cli import main
from pkv_core.errors import JobError, UserInputError

pytestmark = pytest.mark.slow  # a real tritonserver

try:
    pytriton_dir()
    import tritonclient.grpc as grpcclient
except (UserInputError, ImportError):  # pragma: no cover
    pytest.skip("the 'triton' extra is not installed", allow_module_level=True)

PROMPTS = [f"Request {i}: the river runs past the old mill and " + "word " * (i * 7 % 40) for i in range(24)]
NEW = 12


@pytest.fixture(scope="module")
def engine_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("eng") / "engine"
    r = CliRunner().invoke(main, ["build", "--model", "tiny-llama3", "--policy", "pyramidkv", "--kv-budget", "32",
                                  "--window", "4", "--max-input-len", "256", "--out", str(out)])
    assert r.exit_code == 0, r.output
    return out


@pytest.fixture(scope="module")
def direct(engine_dir):
    engine = OrtEngine(engine_dir)
    return {p: engine.generate([p], NEW).tokens[0] for p in PROMPTS}


@pytest.fixture(scope="module")
def server(engine_dir, tmp_path_factory):
    repo = write_repository({"pkv": engine_dir, "static": engine_dir}, tmp_path_factory.mktemp("repo") / "repo",
                            batching={"pkv": "inflight", "static": "static"}, kv_memory=8 << 20, max_new_tokens=32,
                            copy=False, step_tokens=32)  # one model of each kind in one server; prompts in chunks
    with TritonServer(repo) as s:
        yield s


def stream(url: str, prompt: str, params: dict, cancel_after: int | None = None) -> dict:
    """One streamed gRPC request: {'ids', 'text', 'reason', 'error', 'pieces'}."""
    client = grpcclient.InferenceServerClient(url)
    responses: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: responses.put((result, error)))
    inp = grpcclient.InferInput("text_input", [1], "BYTES")
    inp.set_data_from_numpy(np.array([prompt.encode()], dtype=np.object_))
    client.async_stream_infer("pkv", [inp], parameters=params, enable_empty_final_response=True)
    out = {"ids": [], "text": "", "reason": None, "error": None, "pieces": 0}
    try:
        while True:
            result, error = responses.get(timeout=60)
            if error is not None:
                out["error"] = error.message()
                return out
            out["ids"] += result.as_numpy("output_ids").reshape(-1).tolist()
            out["text"] += result.as_numpy("text_output").reshape(-1)[0].decode()
            out["pieces"] += 1
            if result.get_response().parameters["triton_final_response"].bool_param:
                out["reason"] = result.as_numpy("finish_reason").reshape(-1)[0].decode()
                return out
            if cancel_after is not None and out["pieces"] >= cancel_after:
                return out
    finally:
        client.stop_stream(cancel_requests=True)
        client.close()


def status(server) -> dict:
    return json.loads(stream(server.grpc_url, "status", {"status": True})["text"])


def wait_idle(server, timeout: float = 30) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        s = status(server)
        if (s["slots_in_use"] == 0 and s["queue_length"] == 0) or time.monotonic() > deadline:
            return s


def test_config_is_decoupled_without_triton_batching(server):
    config = (server.repo / "pkv" / "config.pbtxt").read_text()
    assert "decoupled: true" in config and "max_batch_size: 0" in config and "dynamic_batching" not in config
    assert 'key: "kv_memory"' in config and "engines.triton_inflight" in (server.repo / "pkv/1/model.py").read_text()
    assert 'key: "step_tokens" value: { string_value: "32" }' in config


def test_24_concurrent_streams_equal_the_engine_alone(server, direct):
    """With a budget of 32 tokens a step, most prompts (50-245 tokens) are prefilled in chunks beside the others'
    decode steps."""
    before = status(server)["prefill_tokens"]
    with ThreadPoolExecutor(24) as pool:
        results = list(pool.map(lambda p: stream(server.grpc_url, p, {"max_new_tokens": NEW, "stream": True}),
                                PROMPTS))
    for prompt, r in zip(PROMPTS, results, strict=True):
        assert r["error"] is None and r["ids"] == direct[prompt], prompt
        assert r["reason"] in ("eos", "length") and r["pieces"] >= 2  # streamed: several responses
    s = wait_idle(server)
    assert s["slots_in_use"] == 0 and s["kv_bytes_held"] == 0 and s["slots_total"] >= 1
    assert s["step_tokens"] == 32 and s["prefill_tokens"] - before >= sum(len(p) for p in PROMPTS)


def test_whole_answer_without_streaming_and_the_clients(server, direct):
    prompt = PROMPTS[5]
    r = stream(server.grpc_url, prompt, {"max_new_tokens": NEW})
    assert r["ids"] == direct[prompt] and r["pieces"] == 1
    for protocol, url in (("grpc", server.grpc_url), ("http", server.http_url)):
        got = CliRunner().invoke(main, ["client", "--url", url, "--protocol", protocol, "--prompt", prompt,
                                        "--max-new-tokens", str(NEW), "--stream", "--json"])
        assert got.exit_code == 0, got.output
        data = json.loads(got.stdout)
        assert data["output_ids"] == direct[prompt] and data["finish_reason"] in ("eos", "length")
        assert data["prompt_tokens"] > 0 and data["completion_tokens"] == len(direct[prompt])
    refused = CliRunner().invoke(main, ["client", "--url", server.http_url, "--model-name", "static", "--prompt",
                                        prompt, "--stream"])
    assert refused.exit_code == 2 and "--batching inflight" in refused.stderr


def test_status_and_prometheus_gauges(server):
    s = status(server)
    assert set(s) >= {"slots_total", "slots_in_use", "kv_bytes_held", "kv_bytes_limit", "queue_length"}
    assert s["kv_bytes_limit"] <= 8 << 20
    time.sleep(0.2)
    metrics = urllib.request.urlopen(f"http://{server.host}:{server.metrics_port}/metrics", timeout=10).read().decode()
    gauges = {line.split("{")[0]: float(line.split()[-1]) for line in metrics.splitlines() if line.startswith("pkv_")}
    assert gauges["pkv_slots_total"] == s["slots_total"] and gauges["pkv_kv_bytes_limit"] == s["kv_bytes_limit"]


@pytest.mark.parametrize("params,fragment", [
    ({"max_new_tokens": 0}, "max_new_tokens must be an integer in [1, 32]"),
    ({"max_new_tokens": 33}, "max_new_tokens must be an integer in [1, 32]"),
    ({"stop": ""}, "stop must be"),
    ({"stream": "yes"}, "stream must be true or false"),
    ({"ignore_eos": 1}, "ignore_eos must be true or false"),
    ({"context_id": "doc"}, "--batching static"),
])
def test_bad_requests_get_one_clear_error(server, params, fragment):
    r = stream(server.grpc_url, PROMPTS[0], params)
    assert r["error"] is not None and fragment in r["error"]
    empty = stream(server.grpc_url, "   ", {})
    assert "empty prompt" in empty["error"]
    too_long = stream(server.grpc_url, "x" * 400, {"max_new_tokens": 4})
    assert "the engine accepts at most 256" in too_long["error"]


def test_cancelled_and_killed_clients_free_their_slots(server, direct):
    """Under load: a fifth of the streams malformed, cancelled mid-stream, or sent by a client process killed
    mid-stream; every good answer equals the engine's, and every slot is free again afterwards."""
    script = (f"import sys, numpy as np, tritonclient.grpc as g\n"
              f"c = g.InferenceServerClient('{server.grpc_url}')\n"
              "c.start_stream(callback=lambda result, error: print('piece', flush=True))\n"
              "i = g.InferInput('text_input', [1], 'BYTES'); i.set_data_from_numpy(np.array([b'long'], dtype=object))\n"
              "c.async_stream_infer('pkv', [i], parameters={'max_new_tokens': 32, 'stream': True})\n"
              "import time; time.sleep(60)\n")
    killed = [subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE) for _ in range(2)]
    for proc in killed:
        assert proc.stdout.readline().startswith(b"piece")  # the stream is running: kill the client mid-answer
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    jobs = []
    for i, prompt in enumerate(PROMPTS):
        if i % 5 == 1:
            jobs.append(("bad", prompt, {"max_new_tokens": -1}))
        elif i % 5 == 3:
            jobs.append(("cancel", prompt, {"max_new_tokens": 32, "stream": True}))
        else:
            jobs.append(("good", prompt, {"max_new_tokens": NEW, "stream": True}))
    with ThreadPoolExecutor(len(jobs)) as pool:
        results = list(pool.map(lambda j: stream(server.grpc_url, j[1], j[2], 2 if j[0] == "cancel" else None),
                                jobs))
    for (kind, prompt, _), r in zip(jobs, results, strict=True):
        if kind == "good":
            assert r["error"] is None and r["ids"] == direct[prompt]
        elif kind == "bad":
            assert "max_new_tokens" in r["error"]
    s = wait_idle(server)
    assert s["slots_in_use"] == 0 and s["queue_length"] == 0 and s["kv_bytes_held"] == 0
    assert stream(server.grpc_url, PROMPTS[0], {"max_new_tokens": NEW})["ids"] == direct[PROMPTS[0]]


def test_openai_endpoint_with_the_official_client(server, engine_dir, direct):
    openai = pytest.importorskip("openai", reason="the openai client (dev extra) is not installed")
    from pkv_cli.triton import _start_openai

    port = free_port()
    api = _start_openai(server.grpc_url, {"pkv": engine_dir}, "127.0.0.1", port)
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused")
        assert [m.id for m in client.models.list().data] == ["pkv"]
        engine = OrtEngine(engine_dir)
        prompt = PROMPTS[2]
        want = engine.tokenizer.decode(direct[prompt], skip_special_tokens=True)
        r = client.completions.create(model="pkv", prompt=prompt, max_tokens=NEW)
        assert r.choices[0].text == want and r.choices[0].finish_reason in ("stop", "length")
        assert r.usage.prompt_tokens == len(engine.tokenizer(prompt)["input_ids"])
        assert r.usage.completion_tokens == len(direct[prompt])
        chunks = list(client.completions.create(model="pkv", prompt=prompt, max_tokens=NEW, stream=True))
        assert "".join(c.choices[0].text for c in chunks if c.choices) == want
        assert chunks[-1].choices[0].finish_reason in ("stop", "length")
        with pytest.raises(openai.NotFoundError, match="does not exist"):
            client.completions.create(model="nope", prompt="x", max_tokens=3)
        from engines.chat import chat_prompt_ids

        chat = client.chat.completions.create(model="pkv", messages=[{"role": "user", "content": prompt}],
                                              max_tokens=NEW)
        ids = engine.generate([chat_prompt_ids(engine.tokenizer, prompt)], NEW).tokens[0]
        assert chat.choices[0].message.content == engine.tokenizer.decode(ids, skip_special_tokens=True)
        assert chat.usage.prompt_tokens == len(chat_prompt_ids(engine.tokenizer, prompt))
        with pytest.raises(openai.BadRequestError, match="n must be 1"):
            client.completions.create(model="pkv", prompt="x", max_tokens=3, n=2)
    finally:
        api.stop()
    assert wait_idle(server)["slots_in_use"] == 0


def test_openai_endpoint_on_a_static_model(server, engine_dir):
    """KVzip, PyramidInfer and TensorRT engines are served by Triton's dynamic batcher: the endpoint answers them
    too (the whole answer as one piece), and a refused request is an HTTP error, streamed or not, never a 200 with
    an empty stream (issue 31, case 20)."""
    openai = pytest.importorskip("openai", reason="the openai client (dev extra) is not installed")
    from pkv_cli.triton import _start_openai

    port = free_port()
    api = _start_openai(server.grpc_url, {"static": engine_dir, "pkv": engine_dir}, "127.0.0.1", port)
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused")
        engine = OrtEngine(engine_dir)
        prompt = PROMPTS[4]
        want = engine.tokenizer.decode(engine.generate([prompt], 7).tokens[0], skip_special_tokens=True)
        r = client.completions.create(model="static", prompt=prompt, max_tokens=7)
        assert r.choices[0].text == want and r.choices[0].finish_reason == "length"
        assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(engine.tokenizer(prompt)["input_ids"]), 7)
        chunks = list(client.completions.create(model="static", prompt=prompt, max_tokens=7, stream=True))
        assert "".join(c.choices[0].text for c in chunks if c.choices) == want
        assert chunks[-1].choices[0].finish_reason == "length"
        chat = client.chat.completions.create(model="static", messages=[{"role": "user", "content": prompt}],
                                              max_tokens=7)
        from engines.chat import chat_prompt_ids

        ids = engine.generate([chat_prompt_ids(engine.tokenizer, prompt)], 7).tokens[0]  # templated: no second BOS
        assert chat.choices[0].message.content == engine.tokenizer.decode(ids, skip_special_tokens=True)
        cut = want[2:4]
        stopped = client.completions.create(model="static", prompt=prompt, max_tokens=7, stop=["\x00\x01", cut])
        assert stopped.choices[0].text == want[: want.index(cut)] and stopped.choices[0].finish_reason == "stop"
        for model in ("static", "pkv"):
            with pytest.raises(openai.BadRequestError, match="the engine accepts at most 256"):
                list(client.completions.create(model=model, prompt="x" * 400, max_tokens=3, stream=True))
        request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", data=b'{"model": ', method="POST")
        with pytest.raises(urllib.error.HTTPError) as info:  # the endpoint reads its JSON itself: 400, not 500
            urllib.request.urlopen(request, timeout=30)
        assert info.value.code == 400 and "not JSON" in info.value.read().decode()
    finally:
        api.stop()


def test_the_client_prints_the_servers_reason_and_exits_2_for_a_refused_request(server):
    """Over HTTP (generate_stream's error event) and gRPC alike: the server's own message, exit code 2; a bad value
    the client can see itself is refused before anything is sent (issue 31, case 25)."""
    for protocol, url in (("http", server.http_url), ("grpc", server.grpc_url)):
        for args, fragment in ((["--max-new-tokens", "33"], "max_new_tokens must be an integer in [1, 32] (got 33)"),
                               (["--model-name", "nope"], "unknown model"),
                               (["--model-name", "static", "--stop", ""], "stop must be a non-empty string")):
            r = CliRunner().invoke(main, ["client", "--url", url, "--protocol", protocol, "--prompt", "hello", *args])
            assert r.exit_code == 2, (protocol, args, r.output)
            assert r.stderr.startswith("error: the server refused the request: ") and fragment in r.stderr, r.stderr
    r = CliRunner().invoke(main, ["client", "--url", server.http_url, "--prompt", "hello", "--max-new-tokens", "0"])
    assert r.exit_code == 2 and "0 is not in the range x>=1" in r.stderr


def test_generate_stream_answers_400_where_the_model_decides(server):
    """Every request the models refuse is HTTP 400 with their message (a flag that is not true/false no longer runs a
    generation), on both kinds of model. What tritonserver itself refuses before any model sees it, a body that is
    not a JSON object or a `text_input` that is not a string, it answers 500 with its own message: documented in the
    README, asserted here so that a Triton that changes it is noticed (issue 31, case 26)."""
    def post(model: str, body: bytes, endpoint: str = "generate_stream") -> tuple[int, str]:
        request = urllib.request.Request(f"http://{server.http_url}/v2/models/{model}/{endpoint}", data=body,
                                         method="POST")
        try:
            with urllib.request.urlopen(request, timeout=60) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()

    for model, endpoint in (("pkv", "generate_stream"), ("static", "generate")):
        for body, fragment in ((b'{"text_input": "hi", "status": "x"}', "status must be true or false"),
                               (b'{"text_input": "hi", "stream": 1}', "stream must be true or false"),
                               (b'{"text_input": "hi", "add_special_tokens": "no"}', "add_special_tokens must be"),
                               (b'{"text_input": "hi", "max_new_tokens": 1.5}', "max_new_tokens must be an integer"),
                               (b'{"text_input": "hi", "stop": ""}', "stop must be a non-empty string"),
                               (b'{"text_input": "   "}', "empty prompt"),
                               (b'{"text_input": "hi", "stop": ["a"]}', "parameter 'stop' has invalid type")):
            if model == "static" and (b'"stream"' in body or b'"status"' in body):
                continue  # in-flight parameters: the static model answers in one piece and has no status request
            code, text = post(model, body, endpoint)
            assert code == 400 and fragment in text, (model, body, code, text)
    for body, status, fragment in ((b'{"text_input": "hi", ', 500, "failed to parse the request JSON buffer"),
                                   (b"[1, 2]", 500, "attempt to get members for non-object"),
                                   (b'{"text_input": 5}', 500, "Unable to parse JSON bytes array"),
                                   (b'{"text_input": "hi", "max_new_tokens": null}', 400, "has invalid type"),
                                   (b'{"max_new_tokens": 3}', 400, "missing required input(s) ['text_input']")):
        code, text = post("pkv", body)
        assert code == status and fragment in text, (body, code, text)


def test_openai_chat_streams_with_the_template(tmp_path):
    """tiny-retriever has a chat template: `serve --openai-port` end to end (a process of its own), chat streamed
    with usage, Ctrl-C stops both servers."""
    openai = pytest.importorskip("openai", reason="the openai client (dev extra) is not installed")
    engine = tmp_path / "retriever"
    r = CliRunner().invoke(main, ["build", "--model", "tiny-retriever", "--policy", "pyramidkv", "--kv-budget", "64",
                                  "--window", "8", "--max-input-len", "512", "--out", str(engine)])
    assert r.exit_code == 0, r.output
    ports = free_ports("127.0.0.1", 4)  # distinct: one free_port() after another may repeat
    proc = subprocess.Popen([sys.executable, "-c", "import sys; from pkv_cli import main; sys.argv[0] = 'pkv-export';"
                             " main()", "serve", "--engine", str(engine), "--http-port", str(ports[0]), "--grpc-port",
                             str(ports[1]), "--metrics-port", str(ports[2]), "--openai-port", str(ports[3]),
                             "--kv-memory", "32MiB", "--max-new-tokens", "48"], stderr=subprocess.PIPE, text=True)
    try:
        line = ""
        while "OpenAI API" not in line:
            line = proc.stderr.readline()
            assert line, "serve exited before the OpenAI API was up"
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{ports[3]}/v1", api_key="unused")
        question = "The magic number for Winnipeg is 90316. What is the magic number for Winnipeg?"
        chunks = list(client.chat.completions.create(
            model="pkv", messages=[{"role": "user", "content": question}], max_tokens=24, stream=True,
            stream_options={"include_usage": True}))
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert "90316" in text
        assert chunks[-1].usage.completion_tokens >= 5 and chunks[-1].usage.prompt_tokens > 20
    finally:
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0 and "stopped" in err


def test_inflight_refusals_are_one_line(tmp_path, engine_dir):
    for args, fragment in [
        (["--batching", "inflight", "--kv-memory", "1KiB"], "holds no slot"),
        (["--batching", "inflight", "--instances", "2"], "one model instance"),
        (["--kv-memory", "lots"], "expected a size"),
    ]:
        r = CliRunner().invoke(main, ["triton", "--engine", str(engine_dir), "--out", str(tmp_path / "repo"), *args])
        assert r.exit_code == 2 and fragment in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.output
        assert not (tmp_path / "repo").exists()
    kvzip = tmp_path / "kvzip"
    assert CliRunner().invoke(main, ["build", "--model", "tiny-llama3", "--policy", "kvzip", "--kv-budget", "32",
                                     "--max-input-len", "128", "--out", str(kvzip)]).exit_code == 0
    r = CliRunner().invoke(main, ["triton", "--engine", str(kvzip), "--out", str(tmp_path / "r"), "--batching",
                                  "inflight"])
    assert r.exit_code == 2 and "cannot run kvzip" in r.stderr
    auto = CliRunner().invoke(main, ["triton", "--engine", str(kvzip), "--out", str(tmp_path / "r")])
    assert auto.exit_code == 0 and "dynamic_batching" in (tmp_path / "r" / "pkv" / "config.pbtxt").read_text()
    with pytest.raises(JobError):  # nothing listens there
        from engines.triton_client import TritonTextClient

        with TritonTextClient(f"127.0.0.1:{free_port()}", "grpc", 5) as c:
            c.generate("pkv", "hi", stream=True)
