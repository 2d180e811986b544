"""Validation runs lose nothing: inputs are checked before the run directory is touched, --force replaces a run
only when the new one is complete, resume does not depend on how the engine path is written, merges keep the
run's description, and runs that cannot produce a sample say so."""

from __future__ import annotations

import json
import os
import shutil
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


def test_merge_takes_every_shard_of_one_split_once_and_complete(tmp_path):
    """A merged report is never silently partial: a missing shard, the same shard twice, shards of different splits,
    an interrupted shard and a merged run as input are refused, and nothing is written (issue 31, case 16)."""
    shards = {name: tmp_path / name for name in ("s0", "s1", "whole")}
    for name, shard in (("s0", "0/2"), ("s1", "1/2"), ("whole", "0/1")):
        r = run(*TINY, *NIAH, "--shard", shard, "--out", str(shards[name]))
        assert r.exit_code == 0, r.output
    torn = tmp_path / "torn"  # shard 1/2 interrupted before its sample was written
    torn.mkdir()
    (torn / "run.json").write_text((shards["s1"] / "run.json").read_text())
    (torn / "samples.jsonl").write_text("")
    out = tmp_path / "m"
    for dirs, fragment in [
        (["s0"], "shard 1/2 missing"),
        (["s0", "s0"], "given twice"),
        (["s0", "whole"], "different splits"),
        (["s0", "torn"], "incomplete run (0 of 1 samples)"),
    ]:
        r = run(*[a for d in dirs for a in ("--merge", str(tmp_path / d))], "--out", str(out))
        assert r.exit_code == 2 and fragment in r.stderr and "Traceback" not in r.stderr, (dirs, r.output)
        assert not out.exists()
    r = run("--merge", str(shards["s0"]), "--merge", str(shards["s1"]), "--out", str(out), "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["overall"]["n"] == 2, r.output
    again = run("--merge", str(out), "--merge", str(shards["s1"]), "--out", str(tmp_path / "m2"))
    assert again.exit_code == 2 and "not a shard run" in again.stderr


def test_empty_needle_question_or_answer_is_refused_and_the_needle_recorded(tmp_path):
    """'' used to mean "the default needle", scored against its answer; run.json now records what was hidden and
    asked, and a resume with another needle is another run (issue 31, case 17)."""
    needle = ["--needle", "The magic number of Oslo is 4411.", "--question", "What is the magic number of Oslo?",
              "--answer", "4411"]
    for k in (1, 3, 5):
        args = list(needle)
        args[k] = "" if k != 3 else "   "
        r = run(*TINY, *NIAH, *args, "--out", str(tmp_path / "o"))
        assert r.exit_code == 2 and "must not be empty" in r.stderr, r.output
        assert not (tmp_path / "o").exists()
    r = run(*TINY, *NIAH, *needle, "--out", str(tmp_path / "o"))
    assert r.exit_code == 0, r.output
    config = json.loads((tmp_path / "o" / "run.json").read_text())["config"]
    assert config["needles"] == [{"needle": needle[1], "question": needle[3], "answer": "4411"}]
    r = run(*TINY, *NIAH, "--out", str(tmp_path / "o"), "--resume")  # the default needle: not the same run
    assert r.exit_code == 2 and "different run" in r.stderr


def test_duplicate_ids_are_refused_so_resume_equals_a_fresh_run(tmp_path):
    """Five rows, two of them repeating an _id: refused; with --skip-bad three samples, fresh and resumed alike
    (issue 31, case 15)."""
    data = tmp_path / "data"
    data.mkdir()
    rows = [json.dumps({"input": f"Question {i}?", "context": "Paris is the capital of France.", "answers": ["Paris"],
                        "_id": f"hp-{i % 3}"}) for i in range(5)]
    (data / "hotpotqa.jsonl").write_text("\n".join(rows) + "\n")
    args = [*TINY, "--suite", "longbench", "--data", str(data), "--reference", "none"]
    r = run(*args, "--out", str(tmp_path / "o"))
    assert r.exit_code == 2 and "hotpotqa.jsonl:4: duplicate _id 'hp-0'" in r.stderr
    assert not (tmp_path / "o").exists()
    r = run(*args, "--skip-bad", "--out", str(tmp_path / "o"), "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["overall"]["n"] == 3, r.output
    lines = (tmp_path / "o" / "samples.jsonl").read_text().splitlines(keepends=True)
    (tmp_path / "o" / "samples.jsonl").write_text(lines[0])  # interrupted after the first sample
    r = run(*args, "--skip-bad", "--out", str(tmp_path / "o"), "--resume", "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["overall"]["n"] == 3, r.output


def test_longbench_prompts_keep_room_for_the_new_tokens(tmp_path, tiny_llama_dir):
    """A row longer than the model's positions is cut in the middle to leave room for the dataset's new tokens
    (hotpotqa: 32), as LongBench does, instead of being refused once the run has started (issue 31, case 19)."""
    model = tmp_path / "model"  # tiny-llama3 with 256 positions: a default-built engine's max input
    shutil.copytree(tiny_llama_dir, model)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 256}))
    data = tmp_path / "data"
    data.mkdir()
    row = {"input": "Where is the mill?", "context": "The river runs past the old mill. " * 12, "answers": ["river"],
           "_id": "long"}  # 400 bytes: byte tokens
    (data / "hotpotqa.jsonl").write_text(json.dumps(row) + "\n")
    r = run("--model", str(model), "--policy", "full", "--suite", "longbench", "--data", str(data),
            "--out", str(tmp_path / "o"))
    assert r.exit_code == 0, r.output
    record = json.loads((tmp_path / "o" / "samples.jsonl").read_text())
    assert record["prompt_tokens"] == 256 - 32 + 1
