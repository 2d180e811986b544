"""Outputs on read-only and full filesystems, and writes that fail half-way: one line, a meaningful exit code,
no partial directory left, and an existing output untouched."""

from __future__ import annotations

import json
import resource
import shutil
from pathlib import Path

import pytest

from exporter.engine_dir import read_manifest
from tests.faults.conftest import cli, one_line_error

pytestmark = pytest.mark.slow  # the real CLI in subprocesses on read-only and full filesystems

TINY = ["--model", "tiny-llama3", "--policy", "snapkv", "--kv-budget", "24", "--window", "4"]
NIAH = ["--suite", "niah", "--lengths", "300", "--depths", "0,100", "--max-new-tokens", "4"]


@pytest.fixture(scope="module")
def engine(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("e") / "eng"
    r = cli("build", *TINY, "--max-input-len", "512", "--out", str(out))
    assert r.returncode == 0, r.stderr
    return out


def _no_leftovers(parent: Path) -> None:
    assert not [p for p in parent.iterdir() if ".partial-" in p.name or ".old-" in p.name]


@pytest.mark.parametrize("command", ["build", "validate", "triton"])
def test_read_only_output_location(command, readonly_dir, engine):
    out = readonly_dir / "out"
    args = {"build": ["build", *TINY, "--out", str(out)],
            "validate": ["validate", "--engine", str(engine), *NIAH, "--out", str(out)],
            "triton": ["triton", "--engine", str(engine), "--out", str(out)]}[command]
    r = cli(*args)
    assert r.returncode == 2, r.stderr
    line = one_line_error(r)
    assert str(readonly_dir) in line and ("Read-only" in line or "Permission denied" in line)
    assert list(readonly_dir.iterdir()) == []


def test_build_on_a_disk_too_small_is_refused_before_writing(full_dir):
    where = full_dir("300k")
    r = cli("build", *TINY, "--out", str(where / "eng"))
    assert r.returncode == 2 and "not enough disk space" in one_line_error(r)
    assert list(where.iterdir()) == []


def _file_size_limit(nbytes: int):
    # A write past the limit fails with EFBIG (Python ignores SIGXFSZ): a disk that fills up during the build.
    return lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, nbytes))


def test_build_failing_half_way_keeps_the_old_engine(tmp_path, engine):
    out = tmp_path / "eng"
    shutil.copytree(engine, out)
    before = read_manifest(out)
    r = cli("build", *TINY, "--policy", "h2o", "--force", "--out", str(out), preexec_fn=_file_size_limit(200_000))
    assert r.returncode == 1, r.stderr
    assert "File too large" in one_line_error(r)
    assert read_manifest(out) == before
    _no_leftovers(tmp_path)


def test_validate_on_a_full_disk_is_one_line_and_the_old_run_survives_force(tmp_path, full_dir, engine):
    where = full_dir("24k")
    r = cli("validate", "--engine", str(engine), "--reference", "none", *NIAH, "--out", str(where / "run"))
    assert r.returncode == 1, r.stderr
    assert "No space left on device" in one_line_error(r)
    run = tmp_path / "run"
    assert cli("validate", "--engine", str(engine), "--reference", "none", *NIAH, "--out", str(run)).returncode == 0
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    r = cli("validate", "--engine", str(engine), "--reference", "none", *NIAH, "--force", "--out", str(run),
            preexec_fn=_file_size_limit(2_000))
    assert r.returncode == 1 and "File too large" in one_line_error(r)
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before
    _no_leftovers(tmp_path)


def test_triton_repository_on_a_full_disk(full_dir, engine):
    where = full_dir("400k")
    r = cli("triton", "--engine", str(engine), "--out", str(where / "repo"))
    assert r.returncode == 1 and "No space left on device" in one_line_error(r)
    assert list(where.iterdir()) == []


def test_unreadable_hash_cache_location_is_not_an_error(tmp_path, engine, readonly_dir):
    r = cli("generate", "--engine", str(engine), "--prompt", "hello", "--max-new-tokens", "2", "--json",
            env={"PKV_EXPORT_CACHE_DIR": str(readonly_dir / "cache")})
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["tokens"]
