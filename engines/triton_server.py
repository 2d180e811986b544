"""Start, watch and stop a real `tritonserver` process: the binary bundled in the nvidia-pytriton wheel.

That wheel carries tritonserver with the python backend and one backend stub per Python version. The stub
embeds libpython, so the server needs the running interpreter's libpython directory on LD_LIBRARY_PATH, and
the stub needs numpy < 2 (it is built against numpy 1.x). The model's imports are pointed at this environment through
PKV_SITE_PACKAGES (read by the generated model.py).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
import urllib.request
from pathlib import Path

from engines.triton_stub import reap_orphans
from exporter.outputs import owned_tempdir
from pkv_core.errors import JobError, UserInputError

EXTRA_HINT = "pip install 'pkv-export[triton]'"
# tritonserver's log lines that say nothing about the failure on a machine without a GPU
NOISE = ("NVML", "DCGM")
LOAD_FAILURE = re.compile(r"failed to load '([^']+)' version \d+: (.*?)(?:\\n\\nAt:|\"$)")


def load_reason(reason: str) -> str:
    """A model's load failure in one line: without the Python frames ("At: ...") Triton appends, the error class of
    pkv-export's own one-line errors, or Triton's "Internal:" prefix."""
    reason = re.split(r"\n\s*\n?At:|\\n\\nAt:", reason, maxsplit=1)[0].strip()
    reason = re.sub(r"^(Internal|Unknown): ", "", reason)
    return re.sub(r"^(UserInputError|JobError|RequestRefused): ", "", reason).replace("\\n", " ").strip()


def pytriton_dir() -> Path:
    """The tritonserver tree inside the installed nvidia-pytriton wheel."""
    try:
        import importlib.util

        spec = importlib.util.find_spec("pytriton")
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise UserInputError(f"serving needs the 'triton' extra (nvidia-pytriton's tritonserver): {EXTRA_HINT}")
    root = Path(list(spec.submodule_search_locations)[0]) / "tritonserver"
    if not (root / "bin" / "tritonserver").is_file():
        raise UserInputError(f"{root}: no tritonserver binary in the installed nvidia-pytriton ({EXTRA_HINT})")
    return root


def check_numpy() -> None:
    import numpy

    if int(numpy.__version__.split(".")[0]) >= 2:
        raise UserInputError(f"Triton's python backend stub needs numpy<2, this environment has {numpy.__version__}")


def port_free(host: str, port: int) -> bool:
    """Whether a server could listen on the port now. SO_REUSEADDR as servers set it: connections of a server
    stopped a moment ago (TIME_WAIT) do not make the port busy, a listening socket does."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def available_memory() -> int | None:
    """Bytes this machine can still give processes without swapping (Linux MemAvailable), None where unknown."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    with contextlib.suppress(ValueError, OSError, AttributeError):
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return None


def free_ports(host: str, count: int, taken: set = frozenset()) -> list[int]:
    """`count` distinct ports free now (sockets held together while they are chosen), none of them in `taken`."""
    with contextlib.ExitStack() as stack:
        ports: list[int] = []
        while len(ports) < count:
            s = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            s.bind((host, 0))
            if s.getsockname()[1] not in taken:
                ports.append(s.getsockname()[1])
        return ports


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _backend_dir(root: Path, workdir: Path) -> Path:
    """The python backend plus the stub built for this interpreter's Python version."""
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = root / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.is_file():
        raise UserInputError(f"nvidia-pytriton has no python backend stub for Python {version}")
    backends = workdir / "backends"
    shutil.copytree(root / "backends", backends)
    shutil.copy2(stub, backends / "python" / "triton_python_backend_stub")
    return backends


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    """Linux: the server gets SIGTERM when the process that started it dies, even by kill -9, so a killed
    `serve` never leaves tritonserver (and, through its own shutdown, the backend stubs) on the ports."""
    import ctypes

    pr_set_pdeathsig = 1
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


def _could_not_load(failed: dict[str, str]) -> str:
    return "tritonserver could not load " + "; ".join(f"model '{n}': {r}" for n, r in failed.items())


class TritonServer:
    """A tritonserver child process on `host` (127.0.0.1 by default). Use as a context manager."""

    def __init__(self, repo: Path, host: str = "127.0.0.1", http_port: int | None = None,
                 grpc_port: int | None = None, metrics_port: int | None = None, log_file: Path | None = None,
                 die_with_parent: bool = True):
        self.repo, self.host = Path(repo).resolve(), host
        # Ports left to choose are taken together: one free_port() after another may hand out the same port twice,
        # and tritonserver answers two servers on one port with its usage text.
        given = (http_port, grpc_port, metrics_port)
        spare = iter(free_ports(host, sum(not p for p in given), set(given)))
        self.http_port, self.grpc_port, self.metrics_port = (p or next(spare) for p in given)
        self.log_file = log_file
        self.die_with_parent = die_with_parent
        self.process: subprocess.Popen | None = None
        self._workdir: Path | None = None

    @property
    def http_url(self) -> str:
        return f"{self.host}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{self.host}:{self.grpc_port}"

    def start(self, timeout: float = 180.0) -> TritonServer:
        root = pytriton_dir()
        check_numpy()
        ports = {"HTTP": self.http_port, "gRPC": self.grpc_port, "metrics": self.metrics_port}
        if len(set(ports.values())) < len(ports):
            given = ", ".join(map(str, ports.values()))
            raise UserInputError(f"the HTTP, gRPC and metrics ports must differ (got {given})")
        for name, port in ports.items():
            if not port_free(self.host, port):
                raise UserInputError(f"{name} port {port} on {self.host} is already in use")
        reap_orphans(lambda message: print(f"note: {message}", file=sys.stderr))  # before their directories go
        self._workdir = owned_tempdir("pkv-triton")
        backends = _backend_dir(root, self._workdir)
        env = dict(os.environ)
        libdir = sysconfig.get_config_var("LIBDIR") or ""
        # The copied stub loses its $ORIGIN-relative path to the wheel's bundled libraries: add them explicitly.
        bundled = str(root.parent.parent / "nvidia_pytriton.libs")
        env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (libdir, bundled, env.get("LD_LIBRARY_PATH", "")) if p)
        # The stub embeds libpython without a program name, so Python finds its "executable" on PATH: with this
        # environment's bin first, it detects the virtual environment (pyvenv.cfg) and imports this
        # environment's packages (numpy<2 above all) instead of the base interpreter's.
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
        env["PKV_SITE_PACKAGES"] = sysconfig.get_paths()["purelib"]
        # The models run the pkv-export that starts the server (a checkout on PYTHONPATH too: the stub ignores it).
        env["PKV_SOURCE_ROOT"] = str(Path(__file__).resolve().parent.parent)
        log = self.log_file or (self._workdir / "tritonserver.log")
        args = [str(root / "bin" / "tritonserver"), f"--model-repository={self.repo}",
                f"--backend-directory={backends}", f"--http-address={self.host}", f"--http-port={self.http_port}",
                f"--grpc-address={self.host}", f"--grpc-port={self.grpc_port}",
                f"--metrics-address={self.host}", f"--metrics-port={self.metrics_port}",
                "--exit-on-error=true", "--strict-readiness=true", "--log-verbose=0", "--exit-timeout-secs=10",
                f"--cache-directory={self._workdir / 'cache'}"]
        self._log = open(log, "wb")  # noqa: SIM115 - closed in stop()
        self.log_path = log
        self.process = subprocess.Popen(args, stdout=self._log, stderr=subprocess.STDOUT, env=env,
                                        start_new_session=True,
                                        preexec_fn=_die_with_parent if self.die_with_parent else None)
        self._wait_ready(timeout)
        return self

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                failed, tail = self.load_failures(), self.log_tail()
                self.stop()
                if failed:
                    raise JobError(_could_not_load(failed))
                raise JobError(f"tritonserver exited with code {self.process.returncode}: {tail}")
            if self.ready():
                return
            failed = self.unavailable_models()
            if failed:
                self.stop()
                raise JobError(_could_not_load(failed))
            time.sleep(0.25)
        tail = self.log_tail()
        self.stop()
        raise JobError(f"tritonserver was not ready after {timeout:.0f} s: {tail}")

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://{self.http_url}/v2/health/ready", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def unavailable_models(self) -> dict[str, str]:
        """Models the server gave up loading, with the reason (from the repository index)."""
        request = urllib.request.Request(f"http://{self.http_url}/v2/repository/index", data=b"{}", method="POST")
        try:
            with urllib.request.urlopen(request, timeout=2) as r:
                index = json.loads(r.read())
        except (OSError, ValueError):
            return {}
        return {m["name"]: load_reason(m.get("reason", "")) for m in index if m.get("state") == "UNAVAILABLE"}

    def _log_lines(self) -> list[str]:
        try:
            text = self.log_path.read_text(errors="replace").strip().splitlines()
        except OSError:
            return []
        return [line for line in text if not any(word in line for word in NOISE)]

    def load_failures(self) -> dict[str, str]:
        """Models the log says failed to load, with the reason in one line."""
        return {m.group(1): load_reason(m.group(2)) for line in self._log_lines()
                for m in [LOAD_FAILURE.search(line)] if m}

    def log_tail(self, lines: int = 5) -> str:
        text = self._log_lines()
        errors = [line for line in text if " E" in line[:3] or "error" in line.lower()]
        return " | ".join((errors or text)[-lines:])

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM the server's process group (server and backend stubs), SIGKILL what is left after timeout."""
        if self.process is not None and self.process.poll() is None:
            try:
                os.killpg(self.process.pid, signal.SIGTERM)
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
            except ProcessLookupError:
                pass
        if self.process is not None:
            try:  # stubs are in the same session; make sure none outlives the server
                os.killpg(self.process.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:  # orphaned stubs are reaped by init, not by us: wait for it
                try:
                    os.killpg(self.process.pid, 0)
                except (ProcessLookupError, PermissionError):
                    break
                time.sleep(0.1)
        if getattr(self, "_log", None):
            self._log.close()
        if self._workdir is not None and self.log_file is None:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None

    def __enter__(self) -> TritonServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
