"""Tampered and edited engines fail with one line wherever an engine is used; verification is cached safely."""

from __future__ import annotations

import json
import os
import shutil

import pytest
from click.testing import CliRunner

from exporter import engine_dir as ed
from exporter import hash_cache
from exporter.checkpoint import load_model
from exporter.engine_dir import DIGEST_FIELD, MANIFEST, read_manifest
from exporter.onnx.export import build_onnx_engine
from methods import make_policy
from pkv_cli import main
from pkv_core.errors import UserInputError


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    out = tmp_path_factory.mktemp("e") / "eng"
    build_onnx_engine(load_model("tiny-llama3"), make_policy("pyramidkv", kv_budget=24, window=4), out,
                      max_input_len=256)
    return out


def copy(engine, tmp_path):
    d = tmp_path / "copy"
    shutil.copytree(engine, d)
    return d


def flip_byte(path, offset=-1, keep_mtime=True):
    st = path.stat()
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))
    if keep_mtime:  # a careful edit: same size, same mtime; only the content (and ctime) differ
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def cli_error(*args):
    r = CliRunner().invoke(main, list(args))
    assert r.exit_code == 2, r.output
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    return r.stderr


@pytest.mark.parametrize("target", ["weights.bin", "prefill.onnx", "decode.onnx", "tokenizer/tokenizer.json"])
def test_same_size_edit_with_restored_mtime_is_caught_everywhere(engine, tmp_path, target):
    d = copy(engine, tmp_path)
    read_manifest(d)  # verified and cached before the edit: the cache must not vouch for the edited file
    flip_byte(d / target, offset=len((d / target).read_bytes()) // 2)
    for args in (["generate", "--engine", str(d), "--prompt", "hi"],
                 ["compare", "--engine", str(d), "--prompt", "hi"],
                 ["validate", "--engine", str(d), "--suite", "niah", "--out", str(tmp_path / "run")],
                 ["triton", "--engine", str(d), "--out", str(tmp_path / "repo")]):
        assert f"engine file {target} does not match its sha256" in cli_error(*args)
    assert not (tmp_path / "run").exists() and not (tmp_path / "repo").exists()


def test_serve_refuses_a_tampered_engine_before_starting(engine, tmp_path):
    pytest.importorskip("pytriton", reason="the 'triton' extra is not installed")
    d = copy(engine, tmp_path)
    flip_byte(d / "weights.bin")
    assert "does not match its sha256" in cli_error("serve", "--engine", str(d), "--http-port", "1")


def test_added_removed_and_resized_files(engine, tmp_path):
    d = copy(engine, tmp_path)
    (d / "decode.onnx").unlink()
    assert "decode.onnx is missing" in cli_error("generate", "--engine", str(d), "--prompt", "hi")
    d2 = tmp_path / "copy2"
    shutil.copytree(engine, d2)
    with (d2 / "weights.bin").open("ab") as f:
        f.write(b"\0")
    assert "truncated or modified" in cli_error("generate", "--engine", str(d2), "--prompt", "hi")


@pytest.mark.parametrize("field,value", [
    ("dtype", "fp16"), ("max_input_len", 100), ("policy.kv_budget", 64), ("model.num_layers", 3),
])
def test_an_edited_manifest_is_refused(engine, tmp_path, field, value):
    d = copy(engine, tmp_path)
    m = json.loads((d / MANIFEST).read_text())
    node, *path = field.split(".")
    (m[node] if path else m).__setitem__(path[0] if path else node, value)
    (d / MANIFEST).write_text(json.dumps(m))
    assert "edited after the build" in cli_error("generate", "--engine", str(d), "--prompt", "hi")


def reseal(m):
    m[DIGEST_FIELD] = ed._digest(m)
    return m


@pytest.mark.parametrize("field,value,fragment", [
    ("dtype", "int4", "'dtype'"),
    ("max_input_len", 0, "'max_input_len'"),
    ("max_input_len", "256", "'max_input_len'"),
    ("max_input_len", 10**9, "'max_input_len'"),
    ("cache_heads", 3, "'cache_heads'"),
    ("backend", None, "'backend'"),
    ("tokenizer", "../elsewhere", "'tokenizer'"),
    ("tokenizer", "/etc", "'tokenizer'"),
    ("model.num_heads", 0, "num_heads"),
    ("model.num_kv_heads", 3, "num_heads"),
    ("model.head_dim", -16, "head_dim"),
    ("model.vocab_size", "259", "vocab_size"),
    ("model.arch", "gpt2", "arch"),
    ("model.rope_scaling", {"rope_type": "dynamic"}, "rope_scaling"),
    ("model", None, "'model'"),
    ("policy.name", "magic", "unknown policy"),
    ("policy.kv_budget", "24", "kv-budget"),
    ("policy.kv_budget", 2, "must exceed --window"),
    ("policy.window", True, "window"),
    ("policy.pooling", "median", "pooling"),
    ("policy.extra", 1, "hyperparameters"),
    ("files", {"a": 1}, "'files'"),
    ("files.0.path", "../../etc/passwd", "files[0]"),
    ("files.0.bytes", -1, "files[0]"),
    ("files.0.sha256", "abc", "files[0]"),
    ("onnx.graphs", ["nope.onnx"], "not among the engine's files"),
    ("shared_prefill", {"graph": "nope.onnx", "scores": []}, "'shared_prefill.graph'"),  # a sweep's capture graph
    ("shared_prefill", {"graph": "prefill.onnx", "scores": [["sideways", 4]]}, "'shared_prefill.scores'"),
])
def test_malformed_manifest_values_are_one_line(engine, tmp_path, field, value, fragment):
    d = copy(engine, tmp_path)
    m = json.loads((d / MANIFEST).read_text())
    parts = field.split(".")
    node = m
    for p in parts[:-1]:
        node = node[int(p)] if isinstance(node, list) else node[p]
    key = parts[-1]
    if isinstance(node, list):
        node[int(key)] = value
    else:
        node[key] = value
    (d / MANIFEST).write_text(json.dumps(reseal(m)))
    with pytest.raises(UserInputError, match=None) as e:
        read_manifest(d)
    assert fragment in str(e.value)
    assert fragment in cli_error("generate", "--engine", str(d), "--prompt", "hi")


def test_verification_is_cached_by_file_identity(engine, tmp_path, monkeypatch):
    d = copy(engine, tmp_path)
    calls = []
    real = hash_cache.sha256_file
    monkeypatch.setattr(hash_cache, "sha256_file", lambda p: calls.append(p) or real(p))
    read_manifest(d)
    first = len(calls)
    assert first == len(read_manifest(d, verify_hashes=False)["files"])
    read_manifest(d)
    assert len(calls) == first, "an unchanged engine is not hashed again"
    os.utime(d / "weights.bin")  # a touch changes the identity: hashed again, and still valid
    read_manifest(d)
    assert len(calls) == first + 1


def test_a_build_seeds_the_cache(tmp_path, monkeypatch):
    out = tmp_path / "eng"
    build_onnx_engine(load_model("tiny-llama3"), make_policy("snapkv", kv_budget=24, window=4), out)
    calls = []
    monkeypatch.setattr(hash_cache, "sha256_file", lambda p: calls.append(p))
    read_manifest(out)
    assert calls == [], "files hashed by the build are not hashed again when the engine is first opened"


@pytest.mark.parametrize("field,value,fragment", [
    ("model.num_layers", 8, "it says 8 layers, prefill.onnx has 4"),
    ("model.num_layers", 3, "it says 3 layers, prefill.onnx has 4"),
    ("model.num_layers", 10**6, "num_layers = 1000000: must be at most 1024"),
    ("model.vocab_size", 300, "logits has 259 vocab_size, the manifest says 300"),
    ("model.head_dim", 8, "has 16 head_dim, the manifest says 8"),
])
def test_manifest_resealed_with_other_sizes_is_checked_against_the_graphs(engine, tmp_path, field, value, fragment):
    """Issue 31 case 6: a manifest edited (num_layers 8 / 3 / 1e6) with its digest recomputed gave KeyError
    `kept_indices.4` or onnxruntime's "Missing Input": its sizes are checked against the graphs' declared inputs
    and outputs when the engine opens."""
    d = copy(engine, tmp_path)
    m = json.loads((d / MANIFEST).read_text())
    section, key = field.split(".")
    m[section][key] = value
    (d / MANIFEST).write_text(json.dumps(reseal(m)))
    assert fragment in cli_error("generate", "--engine", str(d), "--prompt", "hi")
