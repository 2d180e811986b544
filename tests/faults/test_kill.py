"""kill -9 in the middle of build, validate and serve: nothing that looks finished is left, the old output is
intact, the next run cleans up what was provably abandoned and says so, and a killed server dies with it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from exporter.engine_dir import read_manifest
from tests.faults.conftest import cli, start_cli, wait_for

pytestmark = pytest.mark.slow  # killed processes: the real CLI in subprocesses

BUILD = ["build", "--model", "tiny-llama3", "--random-weights", "--num-layers", "24", "--policy", "snapkv",
         "--kv-budget", "24", "--window", "4", "--max-input-len", "512"]


def partials(parent: Path, name: str) -> list[Path]:
    return [p for p in parent.iterdir() if p.name.startswith(f".{name}.partial-")]


def kill_when(proc: subprocess.Popen, predicate, timeout: float = 120) -> None:
    assert wait_for(lambda: predicate() or proc.poll() is not None, timeout), "the command never got there"
    assert proc.poll() is None, f"finished before it could be killed: {proc.stderr.read().decode()}"
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def test_killed_build_leaves_no_engine_and_the_next_build_removes_the_leftover(tmp_path):
    out = tmp_path / "eng"
    proc = start_cli(*BUILD, "--out", str(out))
    kill_when(proc, lambda: bool(partials(tmp_path, "eng")) and (partials(tmp_path, "eng")[0] / "weights.bin")
              .exists())
    assert not out.exists(), "a killed build must leave nothing that looks like an engine"
    left = partials(tmp_path, "eng")
    assert len(left) == 1
    r = cli(*BUILD, "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert f"removed {left[0]}" in r.stderr and "interrupted process" in r.stderr
    assert not partials(tmp_path, "eng") and read_manifest(out)["policy"]["name"] == "snapkv"


def test_killed_force_rebuild_keeps_the_old_engine(tmp_path):
    out = tmp_path / "eng"
    old = [*BUILD[:5], "2", *BUILD[6:]]  # any engine will do as the old one: 2 layers; the killed rebuild has 24
    assert cli(*old, "--out", str(out)).returncode == 0
    before = read_manifest(out)
    assert before["model"]["num_layers"] == 2
    proc = start_cli(*BUILD[:-6], "--policy", "h2o", "--kv-budget", "24", "--window", "4", "--force", "--out",
                     str(out))
    kill_when(proc, lambda: bool(partials(tmp_path, "eng")))
    assert read_manifest(out) == before, "the old engine is replaced only once the new one is complete"


def test_killed_validate_resumes_to_the_same_report(tmp_path):
    args = ["validate", "--model", "tiny-llama3", "--policy", "pyramidkv", "--kv-budget", "24", "--window", "4",
            "--suite", "niah", "--lengths", "300", "--depths", "0,25,50,75,100", "--max-new-tokens", "6"]
    whole = tmp_path / "whole"
    assert cli(*args, "--out", str(whole)).returncode == 0
    cut = tmp_path / "cut"
    proc = start_cli(*args, "--out", str(cut))
    samples = cut / "samples.jsonl"
    kill_when(proc, lambda: samples.exists() and samples.read_bytes().count(b"\n") >= 2)
    r = cli(*args, "--out", str(cut), "--resume")
    assert r.returncode == 0, r.stderr
    a, b = (json.loads((d / "summary.json").read_text()) for d in (whole, cut))
    assert a["overall"] == b["overall"] and a["groups"] == b["groups"]


def _ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/health/ready", timeout=1) as r:
            return r.status == 200
    except OSError:
        return False


def _processes_mentioning(text: str) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if text in cmdline and int(entry.name) != os.getpid():
                pids.append(int(entry.name))
    return pids


def _stream_running(url: str):
    """A long streamed gRPC request: the client, and an event set once its first piece has arrived."""
    import threading

    import numpy as np
    import tritonclient.grpc as grpcclient

    client, first = grpcclient.InferenceServerClient(url), threading.Event()
    client.start_stream(callback=lambda result, error: first.set())
    text = grpcclient.InferInput("text_input", [1], "BYTES")
    text.set_data_from_numpy(np.array([b"the river runs past the old mill " * 6], dtype=np.object_))
    client.async_stream_infer("pkv", [text], parameters={"max_new_tokens": 500, "stream": True})
    return client, first


def _fake_stub(owner: int, name: str) -> subprocess.Popen:
    """A process laid out as a python backend stub of the server that process `owner` started (sleep, renamed)."""
    import shutil
    import tempfile

    path = Path(tempfile.gettempdir()) / f"pkv-triton-{owner}-{name}" / "backends" / "python"
    path.mkdir(parents=True)
    shutil.copy2(shutil.which("sleep"), path / "triton_python_backend_stub")
    return subprocess.Popen([str(path / "triton_python_backend_stub"), "600"])


def _describe(pid: int) -> str:
    """pid, state, parent and command line of a process (what a failed assertion shows)."""
    try:
        fields = (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()
        cmdline = (Path("/proc") / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return f"{pid} (gone)"
    return f"{pid} state {fields[0]} ppid {fields[1]}: {cmdline[:160]}"


def _program(pid: int) -> str:
    try:
        return os.path.basename((Path("/proc") / str(pid) / "cmdline").read_bytes().split(b"\0")[0].decode())
    except OSError:
        return ""


def test_killed_serve_takes_its_server_down_and_the_next_start_cleans_up(tmp_path):
    """Killed mid-stream, with tritonserver's shutdown cut short too (SIGKILL to both: what left a 1 GB stub running
    for minutes, issue 31 case 27): the stubs exit by themselves; the next start removes the temporary files and
    kills what a dead server left (a stand-in stub here), and nothing whose owner lives."""
    pytest.importorskip("pytriton", reason="the 'triton' extra is not installed")
    from engines.triton_server import free_ports

    engine = tmp_path / "eng"
    assert cli("build", "--model", "tiny-llama3", "--kv-budget", "24", "--window", "4", "--max-input-len", "256",
               "--out", str(engine)).returncode == 0
    ports = free_ports("127.0.0.1", 3)
    args = ["serve", "--engine", str(engine), "--http-port", str(ports[0]), "--grpc-port", str(ports[1]),
            "--metrics-port", str(ports[2])]
    proc = start_cli(*args)
    assert wait_for(lambda: _ready(ports[0]) or proc.poll() is not None, 180), "server never became ready"
    assert proc.poll() is None, proc.stderr.read().decode()
    marker = f"pkv-serve-{proc.pid}-"
    assert _processes_mentioning(marker), "tritonserver runs on the generated repository"
    client, first = _stream_running(f"127.0.0.1:{ports[1]}")
    assert first.wait(60), "the stream never started"
    server = [pid for pid in _processes_mentioning(marker) if _program(pid) == "tritonserver"]
    proc.send_signal(signal.SIGKILL)
    for pid in server:
        os.kill(pid, signal.SIGKILL)
    proc.wait()
    gone = wait_for(lambda: not _processes_mentioning(marker), 30) and not time.sleep(1)
    left = _processes_mentioning(marker)  # looked at again a second later: gone for good, not missed once
    assert gone and not left, f"tritonserver or a stub outlived serve: {[_describe(pid) for pid in left]}"
    client.stop_stream(cancel_requests=True)
    client.close()
    assert wait_for(lambda: not _ready(ports[0]), 10)
    import tempfile

    leftovers = [p for p in Path(tempfile.gettempdir()).iterdir() if p.name.startswith(
        (f"pkv-serve-{proc.pid}-", f"pkv-triton-{proc.pid}-"))]
    assert leftovers, "kill -9 leaves the temporary repository; the next start must remove it"
    orphan, alive = _fake_stub(proc.pid, "orphan"), _fake_stub(os.getpid(), "live")
    again = start_cli(*args)
    try:
        assert wait_for(lambda: _ready(ports[0]) or again.poll() is not None, 180)
        assert again.poll() is None
        assert wait_for(lambda: orphan.poll() is not None, 10) and alive.poll() is None
    finally:
        again.send_signal(signal.SIGTERM)
        _, err = again.communicate(timeout=60)
        for stub in (orphan, alive):
            stub.kill()
            stub.wait()
    assert again.returncode == 0, err.decode()
    assert all(not p.exists() for p in leftovers)
    assert all(f"removed {p}" in err.decode() for p in leftovers)
    assert f"killed process {orphan.pid}, a Triton server process left by interrupted process {proc.pid}" in \
        err.decode()
    # serve --engine references the engine in place: nothing of its size was copied
    assert not _processes_mentioning(f"pkv-serve-{again.pid}-")
