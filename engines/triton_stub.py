"""Backend stubs (the processes Triton models run in) never outlive their tritonserver.

tritonserver starts one python backend stub per model instance and stops them when it shuts down. A server that
dies without shutting down (SIGKILL, a crash, a shutdown cut short) leaves its stubs to init, and a stub that was
answering a stream then does not notice: a thread of it sending a response to the dead server waits for it with
the interpreter's lock held (seen: a 1 GB stub left running for minutes after `kill -9` of `serve` mid-stream;
after SIGKILL of tritonserver mid-stream, most times). Two guards:

* `die_with_server`, called in the stub: a small watcher *process* (so that no lock of the stub can hold it) checks
  twice a second whether the stub's parent is still the server that started it, and SIGKILLs the stub through a
  pidfd (never another process that got its pid) once it is not; it exits with the stub. Not the parent-death
  signal `serve` gives tritonserver: that signal fires when the *thread* that forked the child exits, and
  tritonserver starts stubs from its model-loading threads.
* `reap_orphans`, in the next server start: kills what a dead pkv-export server left (a stub whose watcher could not
  run, a tritonserver or stub of an older pkv-export). They are recognised by their backend directory,
  `TMP/pkv-triton-OWNER-*/backends` (exporter.outputs.owned_tempdir, named after the process that started the
  server): only processes of this user, in this temporary directory, whose owner process is gone.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

POLL_SECONDS = 0.5
STUB = "triton_python_backend_stub"

# The watcher: its parent is the stub, argv[1] the server. A pidfd pins the stub (a pid reused after the stub exits is
# never signalled); the loop ends when the stub exits (the pidfd turns readable) or leaves the server.
WATCHER = f"""
import os, select, signal, sys
stub, server = os.getppid(), int(sys.argv[1])
fd = os.pidfd_open(stub)
if os.getppid() != stub:
    sys.exit(0)
while not select.select([fd], [], [], {POLL_SECONDS})[0]:
    try:
        parent = int(open(f"/proc/{{stub}}/stat").read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        break
    if parent != server:
        signal.pidfd_send_signal(fd, signal.SIGKILL)
        break
"""


_watcher: subprocess.Popen | None = None


def die_with_server() -> subprocess.Popen | None:
    """Make this stub process die as soon as its parent (tritonserver) is gone. Called in a model's `initialize`,
    which runs in the stub; starts the watcher once per stub (None when it already runs, or where Linux pidfds or a
    Python for it are missing: then `reap_orphans` at the next start is what is left)."""
    global _watcher
    if _watcher is not None and _watcher.poll() is None:
        return None
    python = sys.executable if sys.executable and os.path.isfile(sys.executable) else shutil.which("python3")
    if python is None or not hasattr(os, "pidfd_open"):
        return None
    _watcher = subprocess.Popen([python, "-S", "-c", WATCHER, str(os.getppid())], stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return _watcher


def _owner(pid: str, pattern: re.Pattern) -> int | None:
    """The owner pid of a tritonserver or stub process started by pkv-export in this temporary directory."""
    proc = Path("/proc") / pid
    try:
        if proc.stat().st_uid != os.getuid():
            return None
        argv = (proc / "cmdline").read_bytes().split(b"\0")
    except OSError:
        return None
    program = os.path.basename(argv[0].decode(errors="replace"))
    if program not in (STUB, "tritonserver"):
        return None
    for arg in argv:  # the stub's own path, or tritonserver's --backend-directory=
        m = pattern.search(arg.decode(errors="replace"))
        if m:
            return int(m.group(1))
    return None


def reap_orphans(notify: Callable[[str], None] | None = None) -> list[int]:
    """SIGKILL the tritonservers and stubs whose pkv-export owner is dead; return their pids."""
    from exporter.outputs import pid_alive

    root = re.escape(str(Path(tempfile.gettempdir())))
    pattern = re.compile(rf"(?:^|=){root}/pkv-triton-(\d+)-[^/]+/backends(?:/|$)")
    reaped = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        owner = _owner(entry.name, pattern)
        if owner is None or pid_alive(owner):
            continue
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(int(entry.name), signal.SIGKILL)
            reaped.append(int(entry.name))
            if notify:
                notify(f"killed process {entry.name}, a Triton server process left by interrupted process {owner}")
    return reaped
