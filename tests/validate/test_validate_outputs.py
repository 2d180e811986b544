"""Validation runs lose nothing: inputs are checked before the run directory is touched, --force replaces a run
only when the new one is complete, resume does not depend on how the engine path is written, merges keep the
run's description, and runs that cannot produce a sample say so."""

from __future__ import annotations

import json
import os
from pathlib import Path

from click.testing import CliRunner

from pkv_cli import main

FIXTURES = Path(__file__).parent / "fixtures"
TINY = ["--model", "tiny-llama3", "--policy", "pyramidkv", "--kv-budget", "24", "--window", "4"]
NIAH = ["--suite", "niah", "--lengths", "300", "--depths", "0,100", "--max-new-tokens", "4"]


def run(*args):
    return CliRunner().invoke(main, ["validate", *args])


def tree(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir()) if p.is_file()}


def test_bad_input_with_force_leaves_the_previous_run_intact(tmp_path):
    out = tmp_path / "run"
    assert run(*TINY, *NIAH, "--out", str(out)).exit_code == 0
    before = tree(out)
    for args in (["--suite", "longbench", "--data", "/nonexistent"], ["--suite", "niah", "--lengths", "x"],
                 ["--suite", "niah", "--lengths", "99999999"], ["--suite", "niah", "--needle", "n"]):
        r = run(*TINY, *args, "--out", str(out), "--force")
        assert r.exit_code == 2 and "Traceback" not in r.stderr, r.output
        assert tree(out) == before
    r = run(*TINY, *NIAH, "--depths", "50", "--out", str(out), "--force")
    assert r.exit_code == 0 and json.loads((out / "summary.json").read_text())["overall"]["n"] == 1
    assert not [p for p in tmp_path.iterdir() if ".partial-" in p.name or ".old-" in p.name]


def test_a_non_empty_directory_that_is_not_a_run_is_refused(tmp_path):
    out = tmp_path / "docs"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    r = run(*TINY, *NIAH, "--out", str(out))
    assert r.exit_code == 2 and "holds no validation run" in r.stderr
    assert tree(out) == {"notes.txt": b"mine"}
    empty = tmp_path / "empty"
    empty.mkdir()
    assert run(*TINY, *NIAH, "--out", str(empty)).exit_code == 0


def test_resume_with_the_engine_named_another_way(tmp_path):
    engine = tmp_path / "eng"
    assert CliRunner().invoke(main, ["build", *TINY, "--max-input-len", "512", "--out", str(engine)]).exit_code == 0
    out = tmp_path / "run"
    assert run("--engine", str(engine), *NIAH, "--out", str(out)).exit_code == 0
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        r = run("--engine", "./eng/", *NIAH, "--out", "run", "--resume")
    finally:
        os.chdir(cwd)
    assert r.exit_code == 0, r.output


def test_empty_data_is_an_input_error_not_a_passing_run(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "hotpotqa.jsonl").write_text("")
    r = run(*TINY, "--suite", "longbench", "--data", str(data), "--out", str(tmp_path / "o"), "--min-agreement", "1")
    assert r.exit_code == 2 and "no samples to run" in r.stderr
    assert not (tmp_path / "o").exists()


def test_more_shards_than_samples(tmp_path):
    r = run(*TINY, *NIAH, "--shard", "5/6", "--out", str(tmp_path / "o"))
    assert r.exit_code == 2 and "holds no samples" in r.stderr


def test_merge_keeps_the_manifest_and_skipped_lines(tmp_path):
    engine = tmp_path / "eng"
    assert CliRunner().invoke(main, ["build", *TINY, "--max-input-len", "4096", "--out", str(engine)]).exit_code == 0
    args = ["--engine", str(engine), "--suite", "longbench", "--data", str(FIXTURES / "bad"), "--skip-bad"]
    for i in range(2):
        r = run(*args, "--shard", f"{i}/2", "--out", str(tmp_path / f"s{i}"))
        assert r.exit_code == 0, r.output
    single = tmp_path / "single"
    assert run(*args, "--out", str(single)).exit_code == 0
    r = run("--merge", str(tmp_path / "s0"), "--merge", str(tmp_path / "s1"), "--out", str(tmp_path / "m"), "--json")
    assert r.exit_code == 0, r.output
    merged = json.loads(r.stdout)
    want = json.loads((single / "summary.json").read_text())
    assert merged["manifest"] == want["manifest"] and merged["manifest"]["backend"] == "onnx"
    assert merged["skipped_bad"] == want["skipped_bad"] and len(merged["skipped_bad"]) == 2
    r = run("--merge", str(tmp_path / "s0"), "--out", str(tmp_path / "s0"), "--force")
    assert r.exit_code == 2 and "an input of this command" in r.stderr


def test_progress_lines_when_stderr_is_not_a_terminal(tmp_path):
    r = run(*TINY, *NIAH, "--out", str(tmp_path / "o"))
    assert r.exit_code == 0
    assert "niah 0/1: 2/2" in r.stderr
