"""Backend stubs never outlive their server (engines/triton_stub.py), with real processes and no tritonserver: a
process that called `die_with_server` exits once its parent is killed, even while a thread of it is busy, and
`reap_orphans` kills exactly the Triton processes a dead owner left in this temporary directory (issue 31, case 27;
the same with a real server and a stream: tests/faults/test_kill.py)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from engines.triton_stub import STUB, reap_orphans

ROOT = Path(__file__).resolve().parents[2]


def gone(pid: int, timeout: float = 30) -> bool:
    """Whether the process has exited (a zombie waiting for init counts as gone) within `timeout`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            return True
        if state == "Z":
            return True
        time.sleep(0.05)
    return False


def test_a_stub_exits_when_its_server_is_killed():
    """The parent (tritonserver's stand-in) starts a child that calls die_with_server, then holds the interpreter's
    lock in a thread for good, as a stub does that sends a response to a dead server; SIGKILL of the parent makes
    the child exit all the same (its watcher is a process of its own), and the watcher exits with it."""
    child = ("import sys, threading; sys.path.insert(0, sys.argv[1])\n"
             "from engines.triton_stub import die_with_server\n"
             "print(die_with_server().pid, flush=True)\n"
             "threading.Thread(target=lambda: sum(range(10 ** 15))).start()  # C code: never gives up the lock\n")
    parent = ("import subprocess, sys\n"
              f"p = subprocess.Popen([sys.executable, '-c', {child!r}, sys.argv[1]], stdout=subprocess.PIPE)\n"
              "print(p.pid, p.stdout.readline().decode().strip(), flush=True)\n"
              "p.wait()\n")
    proc = subprocess.Popen([sys.executable, "-c", parent, str(ROOT)], stdout=subprocess.PIPE, text=True)
    stub, watcher = (int(x) for x in proc.stdout.readline().split())
    time.sleep(0.2)  # let the child's thread take the lock
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    try:
        assert gone(stub), "the stub outlived its server"
        assert gone(watcher), "the watcher outlived the stub"
    finally:
        for pid in (stub, watcher):
            if not gone(pid, 0):
                os.kill(pid, signal.SIGKILL)


def test_the_watcher_leaves_a_stub_whose_server_lives_and_ends_with_it():
    """A stub that exits on its own (a server shutting down cleanly) takes its watcher with it."""
    child = ("import sys, time; sys.path.insert(0, sys.argv[1])\n"
             "from engines.triton_stub import die_with_server\n"
             "w = die_with_server(); assert die_with_server() is None  # one watcher per stub\n"
             "print(w.pid, flush=True); time.sleep(1.5)\n")
    proc = subprocess.Popen([sys.executable, "-c", child, str(ROOT)], stdout=subprocess.PIPE, text=True)
    watcher = int(proc.stdout.readline())
    assert proc.wait() == 0  # alive for 1.5 s: three of the watcher's checks passed it by
    assert gone(watcher), "the watcher outlived its stub"


def fake_stub(owner: int, name: str) -> subprocess.Popen:
    """A process laid out as a backend stub of the server started by `owner` (sleep, under the stub's name)."""
    path = Path(tempfile.gettempdir()) / f"pkv-triton-{owner}-{name}" / "backends" / "python" / STUB
    path.parent.mkdir(parents=True)
    shutil.copy2(shutil.which("sleep"), path)
    return subprocess.Popen([str(path), "600"])


def test_orphans_of_a_dead_owner_are_reaped_and_nothing_else(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # this test's leftovers only, never another run's
    dead = subprocess.Popen(["true"])
    dead.wait()  # its pid names a finished process: the owner of an orphan
    orphan, mine = fake_stub(dead.pid, "orphan"), fake_stub(os.getpid(), "live")
    plain = subprocess.Popen(["sleep", "600"])  # not a Triton process at all
    notes: list[str] = []
    try:
        reaped = reap_orphans(notes.append)
        assert reaped == [orphan.pid] and gone(orphan.pid)
        assert notes == [f"killed process {orphan.pid}, a Triton server process left by interrupted process "
                         f"{dead.pid}"]
        assert mine.poll() is None and plain.poll() is None  # a live owner's stub, and someone else's process
    finally:
        for proc in (orphan, mine, plain):
            proc.kill()
            proc.wait()
