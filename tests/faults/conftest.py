"""Fault injection: the real CLI in a subprocess, killed with SIGKILL, pointed at read-only and full places.

Read-only and full locations are real filesystems (tmpfs mounts) when the tests run as root, as on CI; as an
ordinary user a read-only location is a chmod 555 directory and the full-disk cases are skipped.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

CLI = [sys.executable, "-c", "import sys; from pkv_cli import main; sys.argv[0] = 'pkv-export'; main()"]


def cli(*args: str | bytes, input: bytes | None = None, timeout: float = 600, env: dict | None = None,
        preexec_fn=None) -> subprocess.CompletedProcess:
    """Run `pkv-export ARGS` as a user would (its own process, real argv bytes); stdout/stderr as text."""
    r = subprocess.run([*CLI, *args], input=input, capture_output=True, timeout=timeout,
                       env={**os.environ, **(env or {})}, preexec_fn=preexec_fn)
    r.stdout, r.stderr = r.stdout.decode(errors="replace"), r.stderr.decode(errors="replace")
    return r


def start_cli(*args: str, **kw) -> subprocess.Popen:
    return subprocess.Popen([*CLI, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kw)


def one_line_error(r: subprocess.CompletedProcess) -> str:
    """The error line of a failed command; asserts there is exactly one and no traceback."""
    assert "Traceback" not in r.stderr, r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, r.stderr
    return errors[0]


def wait_for(predicate, timeout: float, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


def _mount_tmpfs(target: Path, options: str) -> bool:
    if os.geteuid() != 0:
        return False
    target.mkdir(parents=True, exist_ok=True)
    return subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(target)],
                          capture_output=True).returncode == 0


def _umount(target: Path) -> None:
    subprocess.run(["umount", "-l", str(target)], capture_output=True)


@pytest.fixture
def readonly_dir(tmp_path) -> Path:
    """A directory nothing can be written under: a read-only tmpfs (root), or chmod 555 (ordinary user)."""
    target = tmp_path / "readonly"
    if _mount_tmpfs(target, "ro,size=1m"):
        yield target
        _umount(target)
        return
    if os.geteuid() == 0:
        pytest.skip("running as root without permission to mount a read-only tmpfs")
    target.mkdir()
    target.chmod(0o555)
    yield target
    target.chmod(0o755)


@pytest.fixture
def full_dir(tmp_path):
    """Factory: a directory on a filesystem of `size` (e.g. '400k'); skipped where tmpfs cannot be mounted."""
    mounts = []

    def make(size: str) -> Path:
        target = tmp_path / f"full-{len(mounts)}"
        if not _mount_tmpfs(target, f"size={size}"):
            pytest.skip("mounting a small tmpfs (a full disk) needs root")
        mounts.append(target)
        return target

    yield make
    for m in mounts:
        _umount(m)
