"""Pieces shared by the CLI commands: policy options, error handling, progress and JSON output."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from typing import Any

import click

from exporter.errors import JobError, UserInputError
from exporter.policies import POLICIES, KVPolicy, make_policy


class PkvGroup(click.Group):
    """Turns the product's errors into one line on stderr and an exit code; never a traceback for bad input."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (UserInputError, JobError) as e:
            click.echo(f"error: {e}", err=True)
            ctx.exit(e.exit_code)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            ctx.exit(130)


def policy_options(fn: Callable) -> Callable:
    """--policy and its hyperparameters. Unset options fall back to the policy's own defaults."""
    options = [
        click.option("--policy", type=click.Choice(list(POLICIES)), default="pyramidkv", show_default=True,
                     help="KV-cache compression policy."),
        click.option("--kv-budget", type=int, default=None,
                     help="Average per-layer cache length C including the window (the paper's KV size) [128]."),
        click.option("--window", type=int, default=None,
                     help="Observation window w: last prompt tokens, always kept [8]."),
        click.option("--kernel", type=int, default=None, help="Pooling width along keys, odd [7]."),
        click.option("--pooling", type=click.Choice(["max", "avg"]), default=None, help="Score pooling [max]."),
        click.option("--granularity", type=click.Choice(["kv-head", "query-head"]), default=None,
                     help="Select per KV head (mean over its query group) or per query head [kv-head]."),
        click.option("--beta", type=int, default=None, help="PyramidKV: min budget = (C - w) // beta [20]."),
        click.option("--schedule", type=click.Choice(["paper", "mean"]), default=None,
                     help="PyramidKV budgets: the paper's integer rule, or mean-preserving [paper]."),
        click.option("--sinks", type=int, default=None, help="StreamingLLM: attention-sink tokens kept [4]."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def policy_from_options(kwargs: dict[str, Any]) -> KVPolicy:
    """Pop the policy options out of a command's kwargs and build the policy."""
    names = ("kv_budget", "window", "kernel", "pooling", "granularity", "beta", "schedule", "sinks")
    hyper = {n: kwargs.pop(n) for n in names}
    return make_policy(kwargs.pop("policy"), **hyper)


def emit_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, default=str))


def progress_bar(description: str, total: int):
    """A rich progress bar on stderr (silent when stderr is not a terminal)."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    console = Console(stderr=True)
    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                        console=console, transient=True, disable=not console.is_terminal)
    task = progress.add_task(description, total=total)

    def update(done: int, total_: int) -> None:
        progress.update(task, completed=done, total=total_)

    return progress, update


def read_prompts(prompts: tuple[str, ...], prompt_file: str | None) -> list[str]:
    out = list(prompts)
    if prompt_file:
        try:
            text = sys.stdin.read() if prompt_file == "-" else open(prompt_file, encoding="utf-8").read()
        except OSError as e:
            raise UserInputError(f"{prompt_file}: cannot read ({e.strerror})") from None
        except UnicodeDecodeError:
            raise UserInputError(f"{prompt_file}: not UTF-8 text") from None
        out.append(text)
    if not out:
        raise UserInputError("give a prompt with --prompt TEXT or --prompt-file FILE")
    if any(not p for p in out):
        raise UserInputError("empty prompt")
    return out


