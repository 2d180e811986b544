"""Engine directories: built aside and renamed at the end (`exporter.outputs`), described by `pkv-engine.json`.

The manifest is written last, so a directory without one was never finished. It carries a digest of its own
content, so an edited manifest is refused, and the sha256 of every file, which every open verifies (cheaply,
through `exporter.hash_cache`): a truncated, edited or swapped file fails with one line before anything runs.
Every field the runtime reads is type- and range-checked (`check_manifest`), whatever its digest says.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
from pathlib import Path, PurePosixPath
from typing import Any

from exporter.hash_cache import HashCache
from pkv_core.errors import UserInputError

MANIFEST = "pkv-engine.json"
FORMAT_VERSION = 3
DIGEST_FIELD = "manifest_sha256"
DTYPES = ("fp32", "fp16", "bf16")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


def _digest(data: dict[str, Any]) -> str:
    body = {k: v for k, v in data.items() if k != DIGEST_FIELD}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def write_manifest(directory: Path, data: dict[str, Any]) -> dict[str, Any]:
    """List every file with size and sha256, seal the manifest with its digest, write it last."""
    cache = HashCache()
    files = sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST)
    entries = []
    for p in files:
        digest = cache.sha256(p)  # hashed once here; the rename into place keeps the file's identity
        entries.append({"path": p.relative_to(directory).as_posix(), "bytes": p.stat().st_size, "sha256": digest})
    cache.save()
    data = {"format_version": FORMAT_VERSION, **data, "files": entries}
    data[DIGEST_FIELD] = _digest(data)
    (directory / MANIFEST).write_text(json.dumps(data, indent=2))
    return data


def read_manifest(directory: Path, verify_hashes: bool = True) -> dict[str, Any]:
    """The checked manifest of a finished engine; every listed file is verified (size, and sha256 unless
    `verify_hashes` is False). Any problem is one UserInputError naming the engine and what is wrong."""
    directory = Path(directory)
    if not directory.is_dir():
        raise UserInputError(f"{directory}: no such engine directory")
    path = directory / MANIFEST
    if not path.is_file():
        raise UserInputError(
            f"{directory}: no {MANIFEST}; not a finished pkv-export engine (was the build interrupted?)"
        )
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserInputError(f"{path}: corrupt manifest ({e})") from None
    except OSError as e:
        raise UserInputError(f"{path}: cannot read ({e.strerror})") from None
    if not isinstance(manifest, dict) or manifest.get("format_version") != FORMAT_VERSION:
        got = manifest.get("format_version") if isinstance(manifest, dict) else None
        raise UserInputError(f"{path}: manifest format version {got}, this pkv-export reads {FORMAT_VERSION} "
                             "(rebuild the engine with this version)")
    if manifest.get(DIGEST_FIELD) != _digest(manifest):
        raise UserInputError(f"{path}: the manifest was edited after the build (its digest does not match); "
                             "rebuild the engine instead of editing it")
    check_manifest(manifest, directory)
    verify_files(directory, manifest["files"], verify_hashes)
    return manifest


def verify_files(directory: Path, files: list[dict[str, Any]], verify_hashes: bool = True) -> None:
    cache = HashCache()
    try:
        for entry in files:
            f = directory / entry["path"]
            if not f.is_file():
                raise UserInputError(f"{directory}: engine file {entry['path']} is missing")
            size = f.stat().st_size
            if size != entry["bytes"]:
                raise UserInputError(f"{directory}: engine file {entry['path']} has {size} bytes, the manifest says "
                                     f"{entry['bytes']} (truncated or modified)")
            if verify_hashes and cache.sha256(f) != entry["sha256"]:
                raise UserInputError(f"{directory}: engine file {entry['path']} does not match its sha256 "
                                     "(modified after the build); rebuild the engine")
    finally:
        cache.save()


def _field(manifest: dict, path: str, types: type | tuple[type, ...], check=None, why: str = "") -> Any:
    """manifest[a][b]... with a type check (bool is not an int here) and an optional predicate."""
    value: Any = manifest
    for part in path.split("."):
        if not isinstance(value, dict) or part not in value:
            raise UserInputError(f"{MANIFEST}: field '{path}' is missing")
        value = value[part]
    if isinstance(value, bool) and bool not in (types if isinstance(types, tuple) else (types,)):
        ok = False
    else:
        ok = isinstance(value, types) and (check is None or check(value))
    if not ok:
        raise UserInputError(f"{MANIFEST}: field '{path}' has a bad value {value!r}{f' ({why})' if why else ''}")
    return value


def _relative_inside(p: str) -> bool:
    pp = PurePosixPath(p)
    return bool(p) and not pp.is_absolute() and ".." not in pp.parts


def check_manifest(manifest: dict[str, Any], directory: Path) -> None:
    """Type and range of every field the runtimes read; the model spec and the policy by their own checks."""
    from exporter.specs import ModelSpec
    from methods import check_policy_record

    _field(manifest, "backend", str)
    _field(manifest, "model", dict)
    try:
        spec = ModelSpec.from_dict(manifest["model"], strict=True)
    except UserInputError as e:
        raise UserInputError(f"{MANIFEST}: field 'model': {e}") from None
    policy_record = _field(manifest, "policy", dict)
    try:
        policy = check_policy_record(policy_record)
    except UserInputError as e:
        raise UserInputError(f"{MANIFEST}: field 'policy': {e}") from None
    _field(manifest, "dtype", str, lambda v: v in DTYPES, f"one of {', '.join(DTYPES)}")
    _field(manifest, "max_input_len", int, lambda v: 1 <= v <= spec.max_position_embeddings,
           f"1..{spec.max_position_embeddings}")
    heads = spec.num_heads if policy.cache_heads_are_query_heads else spec.num_kv_heads
    _field(manifest, "cache_heads", int, lambda v: v == heads, f"the policy's cache heads are {heads}")
    _field(manifest, "tokenizer", str, _relative_inside, "a relative path inside the engine")
    if not (directory / manifest["tokenizer"]).is_dir():
        raise UserInputError(f"{directory}: tokenizer directory {manifest['tokenizer']} is missing")
    files = _field(manifest, "files", list)
    for i, entry in enumerate(files):
        if not (isinstance(entry, dict) and isinstance(entry.get("path"), str) and _relative_inside(entry["path"])
                and isinstance(entry.get("bytes"), int) and not isinstance(entry["bytes"], bool)
                and entry["bytes"] >= 0 and isinstance(entry.get("sha256"), str) and _HEX64.match(entry["sha256"])):
            raise UserInputError(f"{MANIFEST}: files[{i}] has a bad value {entry!r}")
    listed = {e["path"] for e in files}
    if manifest["backend"] == "trtllm":
        for name in _field(manifest, "trtllm.ranks", list, lambda v: all(isinstance(p, str) for p in v)) + [
                _field(manifest, "trtllm.config", str)]:
            if name not in listed:
                raise UserInputError(f"{MANIFEST}: TensorRT-LLM file {name!r} is not among the engine's files")
    if manifest["backend"] == "tensorrt":
        for name in _field(manifest, "tensorrt.plans", list, lambda v: all(isinstance(p, str) for p in v)):
            if name not in listed:
                raise UserInputError(f"{MANIFEST}: TensorRT plan {name!r} is not among the engine's files")
        _field(manifest, "tensorrt.max_batch", int, lambda v: v >= 1, ">= 1")
        _field(manifest, "tensorrt.max_new_tokens", int, lambda v: v >= 1, ">= 1")
    if manifest["backend"] == "onnx":
        from exporter.onnx.targets import TARGETS

        _field(manifest, "onnx.target", str, lambda v: v in TARGETS, f"one of {', '.join(TARGETS)}")
        graphs = _field(manifest, "onnx.graphs", list, lambda v: all(isinstance(g, str) for g in v))
        for name in [*graphs, _field(manifest, "onnx.weights", str)]:
            if name not in listed:
                raise UserInputError(f"{MANIFEST}: onnx file {name!r} is not among the engine's files")
        if "shared_prefill" in manifest:  # the capture graph of a sweep's shared prefill
            _field(manifest, "shared_prefill.graph", str, lambda v: v in graphs, "one of the engine's graphs")
            _field(manifest, "shared_prefill.scores", list, lambda v: all(
                isinstance(k, list) and len(k) == 2 and k[0] in ("window", "all") and isinstance(k[1], int)
                and not isinstance(k[1], bool) and k[1] >= 0 for k in v), "[observe, window] pairs")


def tool_versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {}
    for pkg in ("pkv-export", "torch", "transformers", "onnx", "onnxruntime"):
        with contextlib.suppress(md.PackageNotFoundError):
            out[pkg] = md.version(pkg)
    return out
