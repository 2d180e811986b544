"""A real tritonserver (nvidia-pytriton's binary) serving a tiny ONNX engine: concurrency, bad requests,
health, shutdown. Skipped only when the 'triton' extra is not installed (CI installs it)."""

from __future__ import annotations

import json
import os
import tempfile
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
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException
except (UserInputError, ImportError):  # pragma: no cover
    pytest.skip("the 'triton' extra is not installed", allow_module_level=True)

PROMPTS = [f"Prompt number {i}: the river runs past the old mill and " + "x" * (i % 5) for i in range(32)]


@pytest.fixture(scope="module")
def engine_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("eng") / "engine"
    r = CliRunner().invoke(main, ["build", "--model", "tiny-llama3", "--policy", "pyramidkv", "--kv-budget", "32",
                                  "--window", "4", "--max-input-len", "256", "--out", str(out)])
    assert r.exit_code == 0, r.output
    return out


@pytest.fixture(scope="module")
def server(engine_dir, tmp_path_factory):
    repo = write_repository({"pkv": engine_dir}, tmp_path_factory.mktemp("repo") / "repo", instances=1,
                            max_batch_size=8, default_new_tokens=8)
    with TritonServer(repo) as s:
        yield s


def infer_http(url, prompt, params=None, name="text_input", dtype="BYTES", data=None):
    c = httpclient.InferenceServerClient(url)
    data = np.array([[prompt.encode()]], dtype=np.object_) if data is None else data
    inp = httpclient.InferInput(name, list(data.shape), dtype)
    inp.set_data_from_numpy(data)
    try:
        return c.infer("pkv", [inp], parameters=params)
    finally:
        c.close()


def test_repository_layout(server):
    config = (server.repo / "pkv" / "config.pbtxt").read_text()
    assert 'backend: "python"' in config and "dynamic_batching" in config and "max_batch_size: 8" in config
    assert (server.repo / "pkv" / "1" / "model.py").is_file()
    assert (server.repo / "pkv" / "1" / "engine" / "pkv-engine.json").is_file()


def test_health_and_readiness(server):
    c = httpclient.InferenceServerClient(server.http_url)
    assert c.is_server_live() and c.is_server_ready() and c.is_model_ready("pkv")
    meta = c.get_model_metadata("pkv")
    assert [i["name"] for i in meta["inputs"]] == ["text_input"]
    g = grpcclient.InferenceServerClient(server.grpc_url)
    assert g.is_server_ready() and g.is_model_ready("pkv")


def test_32_concurrent_requests_equal_the_engine(server, engine_dir):
    direct = OrtEngine(engine_dir)

    def ask(i):
        r = infer_http(server.http_url, PROMPTS[i], {"max_new_tokens": 6})
        return r.as_numpy("output_ids").reshape(-1).tolist(), r.as_numpy("text_output").reshape(-1)[0].decode()

    with ThreadPoolExecutor(32) as pool:
        answers = list(pool.map(ask, range(32)))
    for prompt, (ids, text) in zip(PROMPTS, answers, strict=True):
        want = direct.generate([prompt], 6)
        assert ids == want.tokens[0] and text == want.text[0]


def test_grpc_and_the_cli_client(server, engine_dir):
    want = OrtEngine(engine_dir).generate([PROMPTS[3]], 5)
    r = CliRunner().invoke(main, ["client", "--url", server.grpc_url, "--protocol", "grpc", "--prompt", PROMPTS[3],
                                  "--max-new-tokens", "5", "--json"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert d["output_ids"] == want.tokens[0] and d["text"] == want.text[0]


CONTEXT = "The river runs past the old mill, and the miller keeps his ledgers in the attic above the wheel. " * 2


def test_a_stored_context_answers_questions_without_a_new_prefill(server, engine_dir):
    """client --context-id --store-context compresses once; later questions with the id are answered from a copy
    of that cache, exactly as the engine's own compress_context + answer do."""
    direct = OrtEngine(engine_dir)
    cache = direct.compress_context(CONTEXT, room=64)
    base = ["client", "--url", server.http_url, "--context-id", "doc-1", "--json"]
    r = CliRunner().invoke(main, [*base, "--store-context", "--room", "64", "--prompt", CONTEXT])
    assert r.exit_code == 0, r.output
    stored = json.loads(json.loads(r.stdout)["text"])
    assert stored == {"context_id": "doc-1", "context_tokens": cache.length, "kv_bytes": cache.kv_bytes}
    for question in (" Where are the ledgers?", " Who keeps them?", " Where are the ledgers?"):
        r = CliRunner().invoke(main, [*base, "--prompt", question, "--max-new-tokens", "6"])
        assert r.exit_code == 0, r.output
        want = direct.answer(cache, question, 6)
        assert json.loads(r.stdout)["output_ids"] == want.tokens[0]


@pytest.mark.parametrize("params,fragment", [
    ({"context_id": "never-stored"}, "unknown context_id"),
    ({"context_id": "", "store_context": True}, "non-empty string"),
    ({"context_id": "x", "store_context": True, "room": 0}, "room must be"),
    ({"context_id": "long", "store_context": True, "room": 8}, "the engine accepts at most 256"),
])
def test_bad_context_requests_get_errors(server, params, fragment):
    text = CONTEXT * 3 if params["context_id"] == "long" else CONTEXT  # 3 x 200 tokens > max input 256
    with pytest.raises(InferenceServerException, match=fragment):
        infer_http(server.http_url, text, params)
    assert infer_http(server.http_url, "still serving", {"max_new_tokens": 2}).as_numpy("output_ids").size > 0


def test_a_question_longer_than_the_room_is_refused(server):
    infer_http(server.http_url, CONTEXT, {"context_id": "small-room", "store_context": True, "room": 4})
    with pytest.raises(InferenceServerException, match="room for 4"):
        infer_http(server.http_url, " A question far longer than four tokens?", {"context_id": "small-room"})


def test_stop_parameter_cuts_the_text(server, engine_dir):
    full = OrtEngine(engine_dir).generate([PROMPTS[1]], 8).text[0]
    stop = full[3:5]
    r = infer_http(server.http_url, PROMPTS[1], {"max_new_tokens": 8, "stop": stop})
    assert r.as_numpy("text_output").reshape(-1)[0].decode() == full[: full.index(stop)]


@pytest.mark.parametrize("case", ["missing-input", "wrong-dtype", "empty-prompt", "huge-max-new-tokens",
                                  "zero-max-new-tokens", "too-long-prompt", "bad-stop"])
def test_malformed_requests_get_errors_and_the_server_keeps_serving(server, case):
    with pytest.raises(InferenceServerException) as info:
        if case == "missing-input":
            infer_http(server.http_url, "hi", name="not_an_input")
        elif case == "wrong-dtype":
            infer_http(server.http_url, "", dtype="INT32", data=np.array([[7]], dtype=np.int32))
        elif case == "empty-prompt":
            infer_http(server.http_url, "   ")
        elif case == "huge-max-new-tokens":
            infer_http(server.http_url, "hello", {"max_new_tokens": 10**9})
        elif case == "zero-max-new-tokens":
            infer_http(server.http_url, "hello", {"max_new_tokens": 0})
        elif case == "too-long-prompt":
            infer_http(server.http_url, "y" * 1000)
        else:
            infer_http(server.http_url, "hello", {"stop": 5})
    assert info.value.message()
    r = infer_http(server.http_url, "still alive?", {"max_new_tokens": 2})
    assert len(r.as_numpy("output_ids").reshape(-1)) >= 1


def test_busy_port_is_one_clear_error(server):
    with pytest.raises(UserInputError, match=f"port {server.http_port} on 127.0.0.1 is already in use"):
        TritonServer(server.repo, http_port=server.http_port).start()


def test_clean_shutdown_leaves_no_process(engine_dir, tmp_path):
    repo = write_repository({"pkv": engine_dir}, tmp_path / "repo")
    s = TritonServer(repo).start()
    pgid = s.process.pid
    members = [p for p in os.listdir("/proc") if p.isdigit() and _pgid(p) == pgid]
    assert len(members) >= 2, "server and at least one python backend stub"
    s.stop()
    assert s.process.poll() is not None
    assert not [p for p in os.listdir("/proc") if p.isdigit() and _pgid(p) == pgid]


def _pgid(pid: str) -> int | None:
    try:
        return os.getpgid(int(pid))
    except (ProcessLookupError, PermissionError):
        return None


def test_broken_model_fails_fast_with_its_error(tmp_path, engine_dir):
    """A model that cannot load (what `serve --repo` cannot check up front: a repository it did not write) is one
    line naming the model and the reason: no Python frames, no GPU-less noise (issue 31, case 23)."""
    repo = write_repository({"pkv": engine_dir}, tmp_path / "repo")
    (repo / "pkv" / "1" / "engine" / "pkv-engine.json").unlink()
    (repo / "pkv-triton-repo.json").unlink()
    with pytest.raises(JobError) as info:
        TritonServer(repo, http_port=free_port()).start(timeout=120)
    message = str(info.value)
    assert message == (f"tritonserver could not load model 'pkv': {repo.resolve() / 'pkv' / '1' / 'engine'}: no "
                       "pkv-engine.json; not a finished pkv-export engine (was the build interrupted?)"), message


def test_serve_refuses_what_it_cannot_serve_up_front(tmp_path, engine_dir):
    """Before tritonserver starts, one line and exit code 2, nothing left behind (issue 31, cases 21-24): a KV memory
    the machine does not have (given, or in a repository's config), a directory that is no model repository (empty,
    an engine, a sub-directory without a config), a repository whose engine was edited (naming the model, the engine
    and the file), two servers on one port, and --max-new-tokens 0 named as itself."""
    tampered = write_repository({"pkv": engine_dir}, tmp_path / "tampered")
    weights = tampered / "pkv" / "1" / "engine" / "weights.bin"
    data = bytearray(weights.read_bytes())
    data[100] ^= 1
    weights.write_bytes(bytes(data))
    huge = tmp_path / "huge"
    assert CliRunner().invoke(main, ["triton", "--engine", str(engine_dir), "--out", str(huge), "--kv-memory",
                                     "100TiB"]).exit_code == 0  # a repository for a bigger machine is fine to write
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes" / "drafts").mkdir(parents=True)
    ports = [a for option, port in zip(("--http-port", "--grpc-port", "--metrics-port"), free_ports("127.0.0.1", 3),
                                       strict=True) for a in (option, str(port))]
    cases = [
        (["--engine", str(engine_dir), "--kv-memory", "100TiB"], "--kv-memory 100TiB: 100.0 TiB is more than this "
                                                                 "machine's available memory"),
        (["--repo", str(huge)], "kv_memory in config.pbtxt): 100.0 TiB is more than this machine's available memory"),
        (["--repo", str(tmp_path / "empty")], "holds no model"),
        (["--repo", str(engine_dir)], "is an engine directory, not a model repository: serve it with --engine"),
        (["--repo", str(tmp_path / "notes")], "drafts/ has no config.pbtxt"),
        (["--repo", str(tampered)], f"model 'pkv' of {tampered}: {tampered}/pkv/1/engine: engine file weights.bin "
                                    "does not match its sha256"),
        (["--engine", str(engine_dir), "--http-port", "8123", "--grpc-port", "8123"],
         "--http-port and --grpc-port are both 8123: give each server its own port"),
        (["--engine", str(engine_dir), "--metrics-port", "8124", "--openai-port", "8124"],
         "--metrics-port and --openai-port are both 8124"),
        (["--engine", str(engine_dir), "--max-new-tokens", "0"], "--max-new-tokens must be at least 1"),
    ]
    before = sorted(p.name for p in Path(tempfile.gettempdir()).iterdir() if p.name.startswith("pkv-"))
    for args, fragment in cases:
        r = CliRunner().invoke(main, ["serve", *ports, *args])
        assert r.exit_code == 2 and fragment in r.stderr, (args, r.output)
        assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr, r.stderr
    assert sorted(p.name for p in Path(tempfile.gettempdir()).iterdir() if p.name.startswith("pkv-")) == before


@pytest.mark.parametrize("args,fragment", [
    (["client", "--url", "nohost:99999", "--prompt", "hi"], "expected HOST:PORT"),
    (["client", "--url", "127.0.0.1", "--prompt", "hi"], "expected HOST:PORT"),
    (["serve", "--repo", ".", "--http-port", "70000"], "70000"),
    (["client", "--store-context", "--prompt", "a long context"], "need --context-id"),
])
def test_bad_urls_and_ports_are_usage_errors(args, fragment):
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 2, r.output
    assert fragment in r.stderr and "Traceback" not in r.stderr


def test_kvzip_and_pyramidinfer_serve_as_their_engines(tmp_path):
    """The two methods that run a pass after the prefill (KVzip) or compress while generating (PyramidInfer): one
    repository with both, requests and stored-context questions answered exactly as the engines do."""
    engines = {}
    for name, options in (("kvzip", ["--kv-budget", "32", "--score-chunk", "64"]),
                          ("pyramidinfer", ["--min-context", "8", "--recent-ratio", "0.05", "--update-interval", "3"])):
        out = tmp_path / name
        r = CliRunner().invoke(main, ["build", "--model", "tiny-llama3", "--policy", name, *options,
                                      "--max-input-len", "256", "--out", str(out)])
        assert r.exit_code == 0, r.output
        engines[name] = out
    repo = write_repository(engines, tmp_path / "repo", instances=1, max_batch_size=4, default_new_tokens=8)
    with TritonServer(repo) as server:
        for name, engine_dir in engines.items():
            direct = OrtEngine(engine_dir)
            c = httpclient.InferenceServerClient(server.http_url)
            try:
                data = np.array([[PROMPTS[5].encode() * 3]], dtype=np.object_)
                inp = httpclient.InferInput("text_input", list(data.shape), "BYTES")
                inp.set_data_from_numpy(data)
                got = c.infer(name, [inp], parameters={"max_new_tokens": 12}).as_numpy("output_ids").reshape(-1)
            finally:
                c.close()
            assert got.tolist() == direct.generate([PROMPTS[5] * 3], 12).tokens[0], name
            base = ["client", "--url", server.http_url, "--model-name", name, "--context-id", "doc", "--json"]
            r = CliRunner().invoke(main, [*base, "--store-context", "--room", "64", "--prompt", CONTEXT])
            assert r.exit_code == 0, r.output
            cache = direct.compress_context(CONTEXT, room=64)
            for question in (" Where are the ledgers?", " Who keeps them?"):
                r = CliRunner().invoke(main, [*base, "--prompt", question, "--max-new-tokens", "10"])
                assert r.exit_code == 0, r.output
                assert json.loads(r.stdout)["output_ids"] == direct.answer(cache, question, 10).tokens[0], name
