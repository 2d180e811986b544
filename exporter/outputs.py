"""Outputs that never cost the user data: checked before any work, built aside, swapped in by one rename.

Every command that writes a directory (an engine, a Triton repository, a validation run) goes through here:

* `check_output` runs before anything is loaded or written: `--out` must not be a file, must not be (or
  contain) an input of the same command nor lie inside one, and `--force` replaces only an output of the same
  kind;
* `staging_dir` builds into a hidden sibling `.NAME.partial-PID` and renames it over `--out` at the end, so an
  interrupted run leaves the old output intact and nothing that looks finished;
* partial directories whose process is gone are provably abandoned: the next run into the same place removes
  them and says so (one whose process still runs is left alone and mentioned).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import sys
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from pkv_core.errors import UserInputError

Notify = Callable[[str], None]


def _stderr(message: str) -> None:
    print(f"note: {message}", file=sys.stderr)


def _has_file(name: str) -> Callable[[Path], bool]:
    return lambda d: (d / name).is_file()


# kind -> (what to call it, how to recognise one). One place, so a new output kind is one line.
OUTPUT_KINDS: dict[str, tuple[str, Callable[[Path], bool]]] = {
    "engine": ("a pkv-export engine", _has_file("pkv-engine.json")),
    "triton-repo": ("a pkv-export Triton model repository", _has_file("pkv-triton-repo.json")),
    "validation-run": ("a pkv-export validation run", lambda d: (d / "run.json").is_file()
                       or (d / "samples.jsonl").is_file()),
    "sweep": ("a pkv-export sweep", _has_file("sweep-config.json")),
    "inspect-page": ("a pkv-export inspect page", _has_file("kept.json")),
}


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists (on this machine)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def dir_bytes(path: Path) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, f)).st_size
    return total


def _inside(child: Path, parent: Path) -> bool:
    return child == parent or parent in child.parents


def check_output(out: Path, kind: str, force: bool, inputs: Iterable[Path | str | None] = ()) -> None:
    """Refuse, before any work, an `--out` that this command may not create or replace.

    `inputs` are the paths the command reads (checkpoint, engine, data directories): the output may be neither
    one of them nor a directory holding one, since replacing it would delete an input, nor lie inside one, since
    writing it would change the input while it is read (a repository copied into its own engine recursed).
    """
    label, recognise = OUTPUT_KINDS[kind]
    out = Path(out)
    target = out.resolve()
    for src in inputs:
        if src is None:
            continue
        src_path = Path(src).resolve()
        if _inside(src_path, target):
            raise UserInputError(f"--out {out} is (or contains) {src}, an input of this command; "
                                 "choose another output location")
        if _inside(target, src_path):  # writing there would change the input while it is read (triton recursed)
            raise UserInputError(f"--out {out} is inside {src}, an input of this command; "
                                 "choose an output location outside it")
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise UserInputError(f"--out {out} exists and is not a directory; it is not replaced")
    if not out.exists():
        return
    if not force:
        raise UserInputError(f"{out} already exists; pass --force to replace it")
    if any(out.iterdir()) and not recognise(out):
        raise UserInputError(f"--force replaces only {label}, and {out} is not one; "
                             "remove it yourself or choose another --out")


def sweep_abandoned(out: Path, notify: Notify | None = _stderr) -> list[Path]:
    """Remove `.NAME.partial-PID` / `.NAME.old-PID` siblings of `out` whose process is gone; return them."""
    out = Path(out)
    pattern = re.compile(rf"^\.{re.escape(out.name)}\.(partial|old)-(\d+)$")
    removed = []
    with contextlib.suppress(OSError):
        for entry in out.parent.iterdir():
            m = pattern.match(entry.name)
            if not m or not entry.is_dir() or entry.is_symlink():
                continue
            pid = int(m.group(2))
            if pid == os.getpid():
                continue
            if pid_alive(pid):
                if notify:
                    notify(f"{entry} belongs to running process {pid}; left alone")
                continue
            size = dir_bytes(entry)
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
            if notify:
                notify(f"removed {entry}, left by interrupted process {pid} ({size / 2**20:.1f} MiB)")
    return removed


@contextlib.contextmanager
def staging_dir(out: Path, kind: str, force: bool, inputs: Iterable[Path | str | None] = (),
                notify: Notify | None = _stderr) -> Iterator[Path]:
    """Yield an empty hidden sibling of `out`; when the block succeeds it replaces `out` by rename.

    The old output (if any, and only with force) is moved aside first and deleted only after the new one is
    in place; if the final rename fails it is put back. On any error the partial directory is removed.
    """
    out = Path(out)
    check_output(out, kind, force, inputs)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserInputError(f"cannot create {out.parent} ({e.strerror})") from None
    sweep_abandoned(out, notify)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
    except OSError as e:
        raise UserInputError(f"cannot write under {out.parent} ({e.strerror})") from None
    try:
        yield tmp
        _swap_in(tmp, out, kind, force)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _swap_in(tmp: Path, out: Path, kind: str, force: bool) -> None:
    check_output(out, kind, force)  # the world may have changed during a long build
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        shutil.rmtree(old, ignore_errors=True)
        out.rename(old)
    try:
        tmp.rename(out)
    except OSError:
        if old is not None:
            old.rename(out)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def owned_tempdir(prefix: str, notify: Notify | None = _stderr) -> Path:
    """A temporary directory named after this process (`PREFIX-PID-XXXX`); abandoned ones are swept first.

    Used for what a server needs only while it runs (a generated repository, the backend copy): if the
    process is killed, the next start with the same prefix removes what it left.
    """
    import tempfile

    root = Path(tempfile.gettempdir())
    pattern = re.compile(rf"^{re.escape(prefix)}-(\d+)-")
    with contextlib.suppress(OSError):
        for entry in root.iterdir():
            m = pattern.match(entry.name)
            if m and entry.is_dir() and not entry.is_symlink() and not pid_alive(int(m.group(1))):
                shutil.rmtree(entry, ignore_errors=True)
                if notify:
                    notify(f"removed {entry}, left by interrupted process {m.group(1)}")
    return Path(tempfile.mkdtemp(prefix=f"{prefix}-{os.getpid()}-", dir=root))


def atomic_write_text(path: Path, text: str) -> None:
    """Write a small file by rename, so a reader never sees half of it."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
