"""Pieces shared by the CLI commands: policy options, error handling, progress and JSON output."""

from __future__ import annotations

import errno
import json
import sys
import time
from collections.abc import Callable
from typing import Any

import click

from exporter.plan import human_bytes
from exporter.specs import DEFAULT_MODEL
from methods import POLICIES, KVPolicy, make_policy
from methods.options import cli_options, flag
from pkv_core.errors import JobError, UserInputError

# Environment failures that mean "this location cannot be used as given": the user's to fix (exit 2).
_USER_ERRNOS = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOENT, errno.ENOTDIR, errno.EISDIR, errno.EEXIST,
                errno.ENAMETOOLONG, errno.ELOOP}


def os_error_line(e: OSError) -> tuple[str, int]:
    """One line for an OSError, and its exit code: 2 for a location the user gave that cannot be used, 1 for the
    machine failing the job (disk full, file too large, I/O error)."""
    where = f"{e.filename}: " if e.filename else ""
    what = e.strerror or str(e)
    if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        what += " (nothing was replaced; free space and run again)"
    return f"{where}{what}", 2 if e.errno in _USER_ERRNOS else 1


class PkvGroup(click.Group):
    """Turns the product's errors into one line on stderr and an exit code; never a traceback for bad input.

    Click's own usage errors are one line too (`error: ... (see 'pkv-export CMD --help')`), exit code 2.
    """

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (UserInputError, JobError) as e:
            click.echo(f"error: {e}", err=True)
            ctx.exit(e.exit_code)
        except OSError as e:
            if e.errno == errno.EPIPE:  # `pkv-export ... | head`: not an error
                ctx.exit(0)
            line, code = os_error_line(e)
            click.echo(f"error: {line}", err=True)
            ctx.exit(code)
        except MemoryError:
            click.echo("error: out of memory (try a shorter prompt, a smaller batch or --max-input-len)", err=True)
            ctx.exit(1)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            ctx.exit(130)

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode, **extra)
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.UsageError as e:
            hint = f" (see '{e.ctx.command_path} --help')" if e.ctx is not None else ""
            click.echo(f"error: {e.format_message()}{hint}", err=True)
            sys.exit(e.exit_code)
        except click.ClickException as e:
            click.echo(f"error: {e.format_message()}", err=True)
            sys.exit(e.exit_code)
        except click.Abort:
            click.echo("aborted", err=True)
            sys.exit(1)
        sys.exit(rv if isinstance(rv, int) else 0)


class PolicyChoice(click.Choice):
    """--policy's choices: the registered methods at the time the command runs (a method registered later, a test's
    toy, is a choice too)."""

    def __init__(self) -> None:
        super().__init__(())

    @property
    def choices(self) -> tuple[str, ...]:
        return tuple(POLICIES)

    @choices.setter
    def choices(self, value) -> None:  # click.Choice.__init__ assigns it; the registry is the source
        pass


class PolicyCommand(click.Command):
    """A command that takes a policy: after its `--policy` come the options of every registered method, generated
    from their dataclass fields (methods.options) when the command runs, with their help and their defaults per
    method. A value a method checks (odd, positive, a range) is checked by the method: one line, exit code 2."""

    _generated: tuple[tuple, list[click.Option]] = ((), [])

    def get_params(self, ctx: click.Context) -> list[click.Parameter]:
        params = super().get_params(ctx)
        at = next((i + 1 for i, p in enumerate(params) if p.name == "policy"), None)
        return params if at is None else params[:at] + self.policy_params() + params[at:]

    @classmethod
    def policy_params(cls) -> list[click.Option]:
        key = tuple(POLICIES.items())
        if cls._generated[0] != key:
            options = [click.Option([flag(o.name)], type=click.Choice(o.choices) if o.choices else o.type,
                                    default=None, help=o.help_text()) for o in cli_options(POLICIES)]
            PolicyCommand._generated = (key, options)
        return cls._generated[1]


MODEL_ENV = "PKV_EXPORT_MODEL"
MODEL_HELP = ("Preset name (`pkv-export presets`), local Hugging Face checkpoint directory, GGUF file (or a directory "
              "holding one), or hub id in the local HF cache.")


def model_option(fn: Callable) -> Callable:
    """--model, defaulting to $PKV_EXPORT_MODEL or the real default model (SmolLM2-135M-Instruct)."""
    return click.option("--model", default=DEFAULT_MODEL, envvar=MODEL_ENV, show_default=True, show_envvar=True,
                        help=MODEL_HELP)(fn)


def policy_options(fn: Callable) -> Callable:
    """--policy (the command must be a PolicyCommand: it adds every method's options after it). Unset options fall
    back to the chosen policy's own defaults; an option the chosen policy does not have is refused."""
    return click.option("--policy", type=PolicyChoice(), default="pyramidkv", show_default=True,
                        help="KV-cache compression policy (method); its options follow.")(fn)


def policy_from_options(kwargs: dict[str, Any]) -> KVPolicy:
    """Pop --policy and every method option out of a command's kwargs and build the policy (options given on the
    command line that the policy lacks: one line, exit code 2)."""
    given = {o.name: kwargs.pop(o.name, None) for o in cli_options(POLICIES)}
    return make_policy(kwargs.pop("policy"), **given)


def given_options(ctx: click.Context, names: list[str]) -> list[str]:
    """The flags of the options among `names` (parameter names) given on the command line (not defaults, and not
    the environment: $PKV_EXPORT_MODEL set in a shell is no request aimed at this command)."""
    from click.core import ParameterSource

    return [param.opts[0] for param in ctx.command.get_params(ctx)
            if param.name in names and ctx.get_parameter_source(param.name) == ParameterSource.COMMANDLINE]


def policy_option_names() -> list[str]:
    """--policy and every registered method's options, as parameter names."""
    return ["policy", *(o.name for o in cli_options(POLICIES))]


def refuse_with_engine(ctx: click.Context, names: list[str]) -> None:
    """With --engine, the options among `names` the user set are refused: the engine's model, dtype and KV method
    were fixed when it was built, and are never silently replaced by its own (nor checked against defaults)."""
    fixed = given_options(ctx, names)
    if fixed:
        raise UserInputError(f"{', '.join(fixed)} cannot be given with --engine: the engine's model, dtype and KV "
                             "method were fixed when it was built (see its pkv-engine.json); rebuild it to change "
                             "them, or run the reference with --model")


def emit_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, default=str))


def progress_bar(description: str, total: int, lines: bool = False):
    """A rich progress bar on stderr. When stderr is not a terminal the bar is silent, unless `lines`: then a
    plain progress line goes to stderr at most every 10 s and at the end (long runs under nohup, CI, a pipe).
    The returned update(done, total, nbytes=None) takes the bytes written so far, shown in those lines."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    console = Console(stderr=True)
    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                        console=console, transient=True, disable=not console.is_terminal)
    task = progress.add_task(description, total=total)
    plain = lines and not console.is_terminal
    last = [0.0]
    started = time.monotonic()

    def update(done: int, total_: int, nbytes: int | None = None) -> None:
        progress.update(task, completed=done, total=total_)
        now = time.monotonic()
        if plain and (done >= total_ or now - last[0] >= 10.0):
            last[0] = now
            written = "" if nbytes is None else f", {human_bytes(nbytes)} written"
            print(f"{description}: {done}/{total_}{written} ({now - started:.0f} s)", file=sys.stderr, flush=True)

    return progress, update


def printable(text: str) -> str:
    """Text safe to write to a terminal: control characters other than newline and tab escaped (random-weight
    models produce raw bytes that would otherwise drive the terminal)."""
    return "".join(c if c in "\n\t" or (c.isprintable() and c != "\x7f") else c.encode("unicode_escape").decode()
                   for c in text)


def check_run_counts(limit: int | None, max_new_tokens: int | None) -> None:
    """--limit and --max-new-tokens of the commands that run samples (validate, sweep)."""
    if limit is not None and limit < 1:
        raise UserInputError("--limit must be at least 1")
    if max_new_tokens is not None and max_new_tokens < 1:
        raise UserInputError("--max-new-tokens must be at least 1")


def check_positions(samples, max_positions: int) -> None:
    """Every validation sample's prompt (a multi-query context with its longest question) and the tokens it may
    generate fit the model's positions: checked before a run writes anything, not when the sample comes up."""
    def need(s) -> int:
        longest_question = max((len(q) for q in s.meta.get("questions", [])), default=0)
        return len(s.ids) + longest_question + s.max_new_tokens - 1

    worst = max(samples, key=need, default=None)
    if worst is not None and need(worst) > max_positions:
        raise UserInputError(f"sample {worst.id}: its prompt and {worst.max_new_tokens} new tokens need "
                             f"{need(worst)} positions, the model has {max_positions}; lower --max-new-tokens "
                             "(or the context lengths)")


def check_text(text: str, where: str) -> str:
    """A prompt must be valid Unicode; arguments that were not UTF-8 arrive with lone surrogates."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise UserInputError(f"{where} is not valid UTF-8 text") from None
    return text


def read_prompts(prompts: tuple[str, ...], prompt_file: str | None) -> list[str]:
    out = [check_text(p, "--prompt") for p in prompts]
    if prompt_file:
        try:
            raw = sys.stdin.buffer.read() if prompt_file == "-" else open(prompt_file, "rb").read()
            text = raw.decode("utf-8")
        except OSError as e:
            raise UserInputError(f"{prompt_file}: cannot read ({e.strerror})") from None
        except UnicodeDecodeError:
            raise UserInputError(f"{'stdin' if prompt_file == '-' else prompt_file}: not UTF-8 text") from None
        out.append(text)
    if not out:
        raise UserInputError("give a prompt with --prompt TEXT or --prompt-file FILE")
    if any(not p for p in out):
        raise UserInputError("empty prompt")
    return out


SIZE_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
              "k": 1 << 10, "kib": 1 << 10, "m": 1 << 20, "mib": 1 << 20, "g": 1 << 30, "gib": 1 << 30,
              "t": 1 << 40, "tib": 1 << 40}


def parse_size(text: str, where: str = "--kv-memory") -> int:
    """Bytes from '2GiB', '512MiB', '1.5GB', '1000000' (K/M/G/T alone are binary, KB/MB/GB/TB decimal)."""
    import re

    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*", text or "")
    if not match or match.group(2).lower() not in SIZE_UNITS:
        raise UserInputError(f"{where} {text!r}: expected a size such as 2GiB, 512MiB, 1.5GB or a byte count")
    size = int(float(match.group(1)) * SIZE_UNITS[match.group(2).lower()])
    if size < 1:
        raise UserInputError(f"{where} must be at least 1 byte")
    return size


def weight_options(fn: Callable) -> Callable:
    """`--weights`, `--block-size`, `--symmetric/--asymmetric`, `--accuracy-level` (build and plan): read with
    `weights_from_options`."""
    fn = click.option("--accuracy-level", type=click.Choice(["0", "4"]), default=None,
                      help="--weights int8/int4, target onnxruntime: 0 computes in float (equal to the reference "
                           "to float error), 4 quantizes activations to int8 (faster on CPU) [0].")(fn)
    fn = click.option("--symmetric/--asymmetric", default=True, show_default=True,
                      help="--weights int8/int4: zero point fixed at the middle, or one per block.")(fn)
    fn = click.option("--block-size", type=click.Choice(["32", "64", "128"]), default=None,
                      help="--weights int8/int4: input rows sharing one scale [32].")(fn)
    return click.option("--weights", "weight_format", type=click.Choice(["fp", "int8", "int4"]), default="fp",
                        show_default=True,
                        help="Weight-only quantization of the decoder's linear layers (fp: in --dtype).")(fn)


def weights_from_options(weight_format: str, block_size: str | None, symmetric: bool, accuracy_level: str | None):
    """The options of `weight_options` -> exporter.quantize.WeightQuant, or None for fp weights."""
    from exporter.quantize import parse_weights

    if weight_format == "fp":
        if block_size is not None or not symmetric or accuracy_level is not None:
            raise UserInputError("--block-size, --asymmetric and --accuracy-level apply to --weights int8 or int4")
        return None
    return parse_weights(weight_format, int(block_size or 32), symmetric, int(accuracy_level or 0))
