"""CLI commands for Triton Inference Server: triton (model repository), serve (local server), client."""

from __future__ import annotations

import shutil
import signal
import threading
from pathlib import Path

import click

from exporter.errors import JobError, UserInputError
from pkv_cli.common import check_text, emit_json, printable


@click.command()
@click.option("--engine", "engines", type=click.Path(path_type=Path), multiple=True, required=True,
              help="Engine directory (repeat to serve several engines from one repository).")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Model repository to create.")
@click.option("--model-name", "names", multiple=True,
              help="Triton model name per --engine [pkv, then pkv-2, ...].")
@click.option("--instances", type=int, default=1, show_default=True, help="Model instances (CPU).")
@click.option("--max-batch-size", type=int, default=8, show_default=True, help="Dynamic batching limit.")
@click.option("--default-max-new-tokens", type=int, default=32, show_default=True,
              help="Tokens generated when a request does not say.")
@click.option("--force", is_flag=True,
              help="Replace --out if it is a pkv-export repository (once the new one is ready).")
@click.option("--link", is_flag=True,
              help="Reference the engines where they are instead of copying them (the repository then needs them).")
def triton(engines: tuple[Path, ...], out: Path, names: tuple[str, ...], instances: int, max_batch_size: int,
           default_max_new_tokens: int, force: bool, link: bool) -> None:
    """Write a Triton model repository (python backend) that serves engine directories."""
    repo = _write_repo(engines, out, names, instances, max_batch_size, default_max_new_tokens, force, copy=not link)
    click.echo(f"wrote {repo}")


def _write_repo(engines, out, names, instances, max_batch_size, default_new_tokens, force, copy=True) -> Path:
    from exporter.triton.repo import write_repository

    if names and len(names) != len(engines):
        raise UserInputError("give one --model-name per --engine (or none)")
    names = names or tuple("pkv" if i == 0 else f"pkv-{i + 1}" for i in range(len(engines)))
    if len(set(names)) != len(names):
        raise UserInputError("model names must be distinct")
    return write_repository(dict(zip(names, engines, strict=True)), out, instances=instances,
                            max_batch_size=max_batch_size, default_new_tokens=default_new_tokens, force=force,
                            copy=copy)


@click.command()
@click.option("--engine", "engines", type=click.Path(path_type=Path), multiple=True,
              help="Serve this engine directory in place (a small temporary repository points at it).")
@click.option("--repo", type=click.Path(path_type=Path), default=None, help="Serve an existing model repository.")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind (loopback by default).")
@click.option("--http-port", type=click.IntRange(1, 65535), default=8000, show_default=True, help="HTTP port.")
@click.option("--grpc-port", type=click.IntRange(1, 65535), default=8001, show_default=True, help="gRPC port.")
@click.option("--metrics-port", type=click.IntRange(1, 65535), default=8002, show_default=True,
              help="Prometheus metrics port.")
@click.option("--instances", type=int, default=1, show_default=True, help="With --engine: model instances.")
@click.option("--max-batch-size", type=int, default=8, show_default=True, help="With --engine: batching limit.")
@click.option("--log-file", type=click.Path(path_type=Path), default=None, help="tritonserver's log [temporary].")
def serve(engines, repo, host, http_port, grpc_port, metrics_port, instances, max_batch_size, log_file) -> None:
    """Run a real tritonserver on a model repository until Ctrl-C / SIGTERM (needs the 'triton' extra)."""
    from engines.triton_server import TritonServer, pytriton_dir

    if bool(engines) == (repo is not None):
        raise UserInputError("give either --engine DIR (repeatable) or --repo REPO")
    from exporter.outputs import owned_tempdir

    pytriton_dir()  # fail fast, before writing anything, when the extra is missing
    tmp = None
    if engines:
        tmp = owned_tempdir("pkv-serve")  # a few small files; swept at the next start if this process is killed
        try:
            repo = _write_repo(engines, tmp / "repo", (), instances, max_batch_size, 32, False, copy=False)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    elif not (repo / ".").is_dir():
        raise UserInputError(f"{repo}: no such model repository")
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    server = TritonServer(repo, host, http_port, grpc_port, metrics_port, log_file)
    click.echo(f"starting tritonserver on {host} (repository {repo}) ...", err=True)
    try:
        server.start()
        click.echo(f"ready: HTTP http://{server.http_url}  gRPC {server.grpc_url}  metrics "
                   f"http://{host}:{server.metrics_port}/metrics  (Ctrl-C to stop)", err=True)
        while not stop.wait(0.5):
            if server.process.poll() is not None:
                raise JobError(f"tritonserver exited unexpectedly: {server.log_tail()}")
    finally:
        server.stop()
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    click.echo("stopped", err=True)


@click.command()
@click.option("--url", default="127.0.0.1:8000", show_default=True, help="host:port of the server.")
@click.option("--protocol", type=click.Choice(["http", "grpc"]), default="http", show_default=True,
              help="Protocol of --url (gRPC is usually port 8001).")
@click.option("--model-name", default="pkv", show_default=True, help="Triton model to ask.")
@click.option("--prompt", required=True, help="Prompt text.", callback=lambda c, p, v: check_text(v, "--prompt"))
@click.option("--max-new-tokens", type=int, default=None, help="[the model's default]")
@click.option("--stop", default=None, help="Cut the answer before this string.")
@click.option("--timeout", type=float, default=300.0, show_default=True, help="Seconds to wait for the answer.")
@click.option("--context-id", default=None,
              help="Ask about the context stored under this id (or, with --store-context, store --prompt as it).")
@click.option("--store-context", is_flag=True, help="With --context-id: compress --prompt once and keep it.")
@click.option("--room", type=int, default=None,
              help="With --store-context: question + answer tokens each later question may add [512].")
@click.option("--json", "as_json", is_flag=True, help="Print JSON (text, token ids, timing).")
def client(url, protocol, model_name, prompt, max_new_tokens, stop, timeout, context_id, store_context, room,
           as_json) -> None:
    """Send one prompt to a served engine with tritonclient and print the answer."""
    from engines.triton_client import TritonTextClient

    if (store_context or room is not None) and context_id is None:
        raise UserInputError("--store-context and --room need --context-id")
    with TritonTextClient(url, protocol, timeout) as c:
        result = c.generate(model_name, prompt, max_new_tokens=max_new_tokens, stop=stop, context_id=context_id,
                            store_context=store_context, room=room)
    if as_json:
        emit_json({"model": model_name, "protocol": protocol, **result})
    else:
        click.echo(printable(result["text"]))
