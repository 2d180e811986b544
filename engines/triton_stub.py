"""Backend stubs (the processes Triton models run in) never outlive their tritonserver.

tritonserver starts one python backend stub per model instance and stops them when it shuts down. A server that
dies without shutting down (SIGKILL, a crash, a shutdown cut short) leaves its stubs to init, and a stub busy with
an in-flight scheduler does not notice for minutes (seen: a 1 GB stub left running after `kill -9` of `serve`
mid-stream; after SIGKILL of tritonserver mid-stream, every time). Two guards:

* `die_with_server`, in the stub: each model watches its stub's parent, and once the process that started the stub
  is gone the stub exits at once (its server is gone, and so are its clients). A watcher, not the parent-death
  signal `serve` gives tritonserver: that signal fires when the *thread* that forked the child exits, and
  tritonserver starts stubs from its model-loading threads.
* `reap_orphans`, in the next server start: kills what a dead pkv-export server left (a stub that could not run its
  watcher, a tritonserver or stub of an older pkv-export). They are recognised by their backend directory,
  `TMP/pkv-triton-OWNER-*/backends` (exporter.outputs.owned_tempdir, named after the process that started the
  server): only processes of this user, in this temporary directory, whose owner process is gone.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

POLL_SECONDS = 0.5
STUB = "triton_python_backend_stub"


def die_with_server() -> None:
    """Exit this stub process as soon as its parent (tritonserver) is gone. Called in a model's `initialize`, which
    runs in the stub; the first call starts the watcher, later ones (other models in the stub) do nothing."""
    if any(t.name == "pkv-die-with-server" for t in threading.enumerate()):
        return
    parent = os.getppid()

    def watch() -> None:
        stop = threading.Event()
        while not stop.wait(POLL_SECONDS):
            if os.getppid() != parent:  # reparented: the server died without stopping this stub
                os._exit(1)  # no cleanup to wait for: nobody is left to answer, and a busy thread must not hold it

    threading.Thread(target=watch, name="pkv-die-with-server", daemon=True).start()


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
