"""Engine directories: built in a temporary sibling, renamed at the end, described by `pkv-engine.json`.

The manifest is written last, so a directory without one was never finished. Loading checks the format version
and that every listed file is there with its size (and, on request, its sha256).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

from exporter.errors import UserInputError

MANIFEST = "pkv-engine.json"
FORMAT_VERSION = 1


@contextlib.contextmanager
def staging_dir(out: Path, force: bool):
    """Yield a temporary directory next to `out`; on success it becomes `out` (replacing it only with force)."""
    out = Path(out)
    if out.exists() and not force:
        raise UserInputError(f"{out} already exists; pass --force to replace it")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserInputError(f"{out.parent}: cannot create the output's parent directory ({e.strerror})") from None
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        out.rename(old)
        shutil.rmtree(old, ignore_errors=True)
    tmp.rename(out)


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def write_manifest(directory: Path, data: dict[str, Any]) -> dict[str, Any]:
    files = sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST)
    data = {"format_version": FORMAT_VERSION, **data, "files": [
        {"path": str(p.relative_to(directory)), "bytes": p.stat().st_size, "sha256": sha256(p)} for p in files
    ]}
    (directory / MANIFEST).write_text(json.dumps(data, indent=2))
    return data


def read_manifest(directory: Path, verify_hashes: bool = False) -> dict[str, Any]:
    directory = Path(directory)
    if not directory.is_dir():
        raise UserInputError(f"{directory}: no such engine directory")
    path = directory / MANIFEST
    if not path.is_file():
        raise UserInputError(
            f"{directory}: no {MANIFEST}; not a finished pkv-export engine (was the build interrupted?)"
        )
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserInputError(f"{path}: corrupt manifest ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format_version") != FORMAT_VERSION:
        got = manifest.get("format_version") if isinstance(manifest, dict) else None
        raise UserInputError(f"{path}: manifest format version {got}, this pkv-export reads {FORMAT_VERSION}")
    for entry in manifest.get("files", []):
        f = directory / entry["path"]
        if not f.is_file():
            raise UserInputError(f"{directory}: engine file {entry['path']} is missing")
        if f.stat().st_size != entry["bytes"]:
            raise UserInputError(f"{directory}: engine file {entry['path']} has {f.stat().st_size} bytes, "
                                 f"manifest says {entry['bytes']} (truncated or modified)")
        if verify_hashes and sha256(f) != entry["sha256"]:
            raise UserInputError(f"{directory}: engine file {entry['path']} does not match its sha256")
    return manifest


def tool_versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {}
    for pkg in ("pkv-export", "torch", "transformers", "onnx", "onnxruntime"):
        with contextlib.suppress(md.PackageNotFoundError):
            out[pkg] = md.version(pkg)
    return out
