"""CLI commands for Triton Inference Server: triton (model repository), serve (local server), client."""

from __future__ import annotations

import shutil
import signal
import threading
from pathlib import Path

import click

from exporter.slot_plan import DEFAULT_STEP_TOKENS
from pkv_cli.common import check_text, emit_json, parse_size, printable
from pkv_core.errors import JobError, UserInputError

BATCHING_HELP = ("inflight: the model's own scheduler keeps every sequence in a fixed-size KV slot and advances "
                 "all of them one token per step, streaming tokens (onnxruntime-target engines; not KVzip or "
                 "PyramidInfer); static: Triton's dynamic batcher runs groups of requests to completion; auto: "
                 "inflight where the engine allows it")


def batching_options(fn):
    """--batching, --kv-memory, --max-new-tokens, --step-tokens: how a repository's models batch (shared by triton
    and serve)."""
    fn = click.option("--step-tokens", type=click.IntRange(min=0), default=DEFAULT_STEP_TOKENS, show_default=True,
                      help="In-flight: tokens per scheduler step, shared by the running sequences' decode tokens and "
                           "chunks of waiting prompts (a long prompt is prefilled over several steps while the "
                           "others keep streaming); 0 prefills every prompt whole.")(fn)
    fn = click.option("--max-new-tokens", "slot_new_tokens", type=int, default=512, show_default=True,
                      help="In-flight: the most new tokens a request may ask for (every KV slot is sized for it).")(fn)
    fn = click.option("--kv-memory", default="1GiB", show_default=True,
                      help="In-flight: bytes the KV slots may hold (e.g. 2GiB, 512MiB); admission waits while "
                           "they are taken and never over-commits.")(fn)
    return click.option("--batching", type=click.Choice(["auto", "inflight", "static"]), default="auto",
                        show_default=True, help=BATCHING_HELP)(fn)


@click.command()
@click.option("--engine", "engines", type=click.Path(path_type=Path), multiple=True, required=True,
              help="Engine directory (repeat to serve several engines from one repository).")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Model repository to create.")
@click.option("--model-name", "names", multiple=True,
              help="Triton model name per --engine [pkv, then pkv-2, ...].")
@click.option("--instances", type=click.IntRange(min=1), default=1, show_default=True, help="Model instances (CPU).")
@click.option("--max-batch-size", type=click.IntRange(min=1), default=8, show_default=True,
              help="Dynamic batching limit.")
@click.option("--default-max-new-tokens", type=click.IntRange(min=1), default=32, show_default=True,
              help="Tokens generated when a request does not say.")
@click.option("--force", is_flag=True,
              help="Replace --out if it is a pkv-export repository (once the new one is ready).")
@click.option("--link", is_flag=True,
              help="Reference the engines where they are instead of copying them (the repository then needs them).")
@batching_options
def triton(engines: tuple[Path, ...], out: Path, names: tuple[str, ...], instances: int, max_batch_size: int,
           default_max_new_tokens: int, force: bool, link: bool, batching: str, kv_memory: str,
           slot_new_tokens: int, step_tokens: int) -> None:
    """Write a Triton model repository (python backend) that serves engine directories."""
    repo = _write_repo(engines, out, names, instances, max_batch_size, default_max_new_tokens, force, copy=not link,
                       batching=batching, kv_memory=parse_size(kv_memory), max_new_tokens=slot_new_tokens,
                       step_tokens=step_tokens)
    click.echo(f"wrote {repo}")


def _write_repo(engines, out, names, instances, max_batch_size, default_new_tokens, force, copy=True,
                batching="static", kv_memory=1 << 30, max_new_tokens=512, step_tokens=DEFAULT_STEP_TOKENS) -> Path:
    from exporter.triton.repo import write_repository

    if names and len(names) != len(engines):
        raise UserInputError("give one --model-name per --engine (or none)")
    names = names or tuple("pkv" if i == 0 else f"pkv-{i + 1}" for i in range(len(engines)))
    if len(set(names)) != len(names):
        raise UserInputError("model names must be distinct")
    return write_repository(dict(zip(names, engines, strict=True)), out, instances=instances,
                            max_batch_size=max_batch_size, default_new_tokens=default_new_tokens, force=force,
                            copy=copy, batching=batching, kv_memory=kv_memory, max_new_tokens=max_new_tokens,
                            step_tokens=step_tokens)


@click.command()
@click.option("--engine", "engines", type=click.Path(path_type=Path), multiple=True,
              help="Serve this engine directory in place (a small temporary repository points at it).")
@click.option("--repo", type=click.Path(path_type=Path), default=None, help="Serve an existing model repository.")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind (loopback by default).")
@click.option("--http-port", type=click.IntRange(1, 65535), default=8000, show_default=True, help="HTTP port.")
@click.option("--grpc-port", type=click.IntRange(1, 65535), default=8001, show_default=True, help="gRPC port.")
@click.option("--metrics-port", type=click.IntRange(1, 65535), default=8002, show_default=True,
              help="Prometheus metrics port.")
@click.option("--instances", type=click.IntRange(min=1), default=1, show_default=True,
              help="With --engine: model instances.")
@click.option("--max-batch-size", type=click.IntRange(min=1), default=8, show_default=True,
              help="With --engine: batching limit.")
@click.option("--log-file", type=click.Path(path_type=Path), default=None, help="tritonserver's log [temporary].")
@batching_options
@click.option("--openai-port", type=click.IntRange(1, 65535), default=None,
              help="Also serve an OpenAI-compatible API (/v1/completions, /v1/chat/completions) on this port.")
@click.option("--openai-host", default="127.0.0.1", show_default=True, help="Address of the OpenAI API.")
def serve(engines, repo, host, http_port, grpc_port, metrics_port, instances, max_batch_size, log_file, batching,
          kv_memory, slot_new_tokens, step_tokens, openai_port, openai_host) -> None:
    """Run a real tritonserver on a model repository until Ctrl-C / SIGTERM (needs the 'triton' extra)."""
    from engines.triton_server import TritonServer, port_free, pytriton_dir

    if bool(engines) == (repo is not None):
        raise UserInputError("give either --engine DIR (repeatable) or --repo REPO")
    from exporter.outputs import owned_tempdir

    pytriton_dir()  # fail fast, before writing anything, when the extra is missing
    memory = parse_size(kv_memory)
    _check_ports({"--http-port": http_port, "--grpc-port": grpc_port, "--metrics-port": metrics_port,
                  "--openai-port": openai_port})
    if slot_new_tokens < 1:
        raise UserInputError("--max-new-tokens must be at least 1")
    if openai_port is not None:
        _require_openai_packages()
        if not port_free(openai_host, openai_port):
            raise UserInputError(f"--openai-port {openai_port} on {openai_host} is already in use")
    if engines:  # everything is checked before the temporary repository is written
        _check_kv_memory(memory * _inflight_count(engines, batching), f"--kv-memory {kv_memory}"
                         + (f" for each of {len(engines)} engines" if len(engines) > 1 else ""))
    else:
        _check_repo(repo)
    tmp = None
    if engines:
        tmp = owned_tempdir("pkv-serve")  # a few small files; swept at the next start if this process is killed
        try:
            repo = _write_repo(engines, tmp / "repo", (), instances, max_batch_size, 32, False, copy=False,
                               batching=batching, kv_memory=memory, max_new_tokens=slot_new_tokens,
                               step_tokens=step_tokens)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    elif not (repo / ".").is_dir():
        raise UserInputError(f"{repo}: no such model repository")
    served = _served_engines(repo) if openai_port is not None else {}
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    server = TritonServer(repo, host, http_port, grpc_port, metrics_port, log_file)
    click.echo(f"starting tritonserver on {host} (repository {repo}) ...", err=True)
    api = None
    try:
        server.start()
        click.echo(f"ready: HTTP http://{server.http_url}  gRPC {server.grpc_url}  metrics "
                   f"http://{host}:{server.metrics_port}/metrics  (Ctrl-C to stop)", err=True)
        if openai_port is not None:
            api = _start_openai(server.grpc_url, served, openai_host, openai_port)
            click.echo(f"OpenAI API: http://{openai_host}:{openai_port}/v1", err=True)
        while not stop.wait(0.5):
            if server.process.poll() is not None:
                raise JobError(f"tritonserver exited unexpectedly: {server.log_tail()}")
            if api is not None and not api.thread.is_alive():
                raise JobError("the OpenAI API server stopped unexpectedly")
    finally:
        if api is not None:
            api.stop()
        server.stop()
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    click.echo("stopped", err=True)


def _check_ports(ports: dict[str, int | None]) -> None:
    """Every server its own port (tritonserver would print its usage text; the OpenAI API would not start)."""
    seen: dict[int, str] = {}
    for option, port in ports.items():
        if port is None:
            continue
        if port in seen:
            raise UserInputError(f"{seen[port]} and {option} are both {port}: give each server its own port")
        seen[port] = option


def _check_repo(repo: Path) -> None:
    """`--repo` is a model repository whose pkv-export engines are intact: one line naming the model, the engine and
    the file otherwise, before tritonserver starts (it would print the model's Python frames instead)."""
    from exporter.engine_dir import read_manifest
    from exporter.triton.repo import MARKER, check_repository, inflight_kv_memory

    check_repository(repo)
    _check_kv_memory(sum(inflight_kv_memory(repo).values()),
                     f"the KV memory of the in-flight models of {repo} (kv_memory in config.pbtxt)")
    if not (repo / MARKER).is_file():
        return  # not written by pkv-export: tritonserver loads it, and says why not in one line per model
    for name, engine in _served_engines(repo).items():
        try:
            read_manifest(engine)
        except UserInputError as e:
            raise UserInputError(f"model '{name}' of {repo}: {e}") from None


def _inflight_count(engines: tuple[Path, ...], batching: str) -> int:
    """How many of `engines` run in-flight (each holds --kv-memory of slots) with this --batching."""
    from exporter.engine_dir import read_manifest
    from exporter.triton.repo import choose_batching

    return sum(choose_batching(read_manifest(engine), batching) == "inflight" for engine in engines)


def _check_kv_memory(total: int, what: str) -> None:
    """In-flight models allocate their KV slots when the server loads them: refuse, up front, more than this machine
    has available (it would fail with a MemoryError, or start and be killed once the slots fill)."""
    from engines.triton_server import available_memory
    from exporter.plan import human_bytes

    free = available_memory()
    if total and free is not None and total > free:
        raise UserInputError(f"{what}: {human_bytes(total)} is more than this machine's available memory "
                             f"({human_bytes(free)})")


def _require_openai_packages() -> None:
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise UserInputError("--openai-port needs fastapi and uvicorn: pip install 'pkv-export[triton]'") from None


def _served_engines(repo: Path) -> dict[str, Path]:
    """name -> engine directory of a pkv-export repository (what the OpenAI API loads tokenizers from)."""
    import json

    from exporter.triton.repo import MARKER

    try:
        marker = json.loads((repo / MARKER).read_text())
    except (OSError, ValueError):
        raise UserInputError(f"{repo}: --openai-port needs a repository written by pkv-export") from None
    return {name: Path(m["engine"]) if not m.get("copied") else repo / name / "1" / "engine"
            for name, m in marker["models"].items()}


class _ApiServer:
    def __init__(self, server, thread):
        self.server, self.thread = server, thread

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)


def _start_openai(grpc_url: str, engines: dict[str, Path], host: str, port: int) -> _ApiServer:
    """uvicorn serving engines.openai_api in a thread of this process (loopback unless --openai-host says)."""
    import time

    import uvicorn

    from engines.openai_api import make_app

    config = uvicorn.Config(make_app(grpc_url, engines), host=host, port=port, log_level="warning")
    server = uvicorn.Server(config)
    server.install_signal_handlers = lambda: None  # serve's own handlers stop both servers
    thread = threading.Thread(target=server.run, name="pkv-openai", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise JobError(f"the OpenAI API could not start on {host}:{port}")
        time.sleep(0.05)
    return _ApiServer(server, thread)


@click.command()
@click.option("--url", default="127.0.0.1:8000", show_default=True, help="host:port of the server.")
@click.option("--protocol", type=click.Choice(["http", "grpc"]), default="http", show_default=True,
              help="Protocol of --url (gRPC is usually port 8001).")
@click.option("--model-name", default="pkv", show_default=True, help="Triton model to ask.")
@click.option("--prompt", required=True, help="Prompt text.", callback=lambda c, p, v: check_text(v, "--prompt"))
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=None, help="[the model's default]")
@click.option("--stop", default=None, help="Cut the answer before this string.")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), default=300.0, show_default=True,
              help="Seconds to wait for the answer.")
@click.option("--context-id", default=None,
              help="Ask about the context stored under this id (or, with --store-context, store --prompt as it).")
@click.option("--store-context", is_flag=True, help="With --context-id: compress --prompt once and keep it.")
@click.option("--room", type=click.IntRange(min=1), default=None,
              help="With --store-context: question + answer tokens each later question may add [512].")
@click.option("--stream", is_flag=True, help="Print the answer piece by piece as it is generated (in-flight models).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON (text, token ids, timing).")
def client(url, protocol, model_name, prompt, max_new_tokens, stop, timeout, context_id, store_context, room,
           stream, as_json) -> None:
    """Send one prompt to a served engine with tritonclient and print the answer.

    Exit codes: 0 answered, 2 the server refused the request (its reason is printed), 1 the server failed or
    cannot be reached."""
    from engines.triton_client import TritonTextClient

    if (store_context or room is not None) and context_id is None:
        raise UserInputError("--store-context and --room need --context-id")
    show = None
    if stream and not as_json:
        def show(piece: str) -> None:
            click.echo(printable(piece), nl=False)
    with TritonTextClient(url, protocol, timeout) as c:
        result = c.generate(model_name, prompt, max_new_tokens=max_new_tokens, stop=stop, context_id=context_id,
                            store_context=store_context, room=room, stream=stream, on_piece=show)
    if as_json:
        emit_json({"model": model_name, "protocol": protocol, **result})
    elif stream:
        click.echo()
    else:
        click.echo(printable(result["text"]))
