"""`pkv-export validate` end to end on tiny presets with tiny handmade data."""

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from pkv_cli import main
from tests import matrix

FIXTURES = Path(__file__).parent / "fixtures"
TINY = ["--model", "tiny-llama3", "--policy", "pyramidkv", "--kv-budget", "24", "--window", "4"]
NIAH = ["--suite", "niah", "--lengths", "400,600", "--depths", "0,50,100", "--max-new-tokens", "6"]


def run(*args):
    return CliRunner().invoke(main, ["validate", *args])


def summary(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())


def comparable(s: dict) -> dict:
    """The parts of a summary that must not depend on how the run was split or interrupted."""
    groups = [{k: v for k, v in g.items()} for g in s["groups"]]
    return {"overall": s["overall"], "groups": groups}


def test_niah_reference_vs_reference_agrees(tmp_path):
    out = tmp_path / "niah"
    r = run(*TINY, *NIAH, "--out", str(out), "--min-agreement", "1.0", "--json")
    assert r.exit_code == 0, r.output
    s = json.loads(r.stdout)
    assert s["overall"]["n"] == 6 and s["overall"]["agreement_rate"] == 1.0
    assert s["overall"]["index_agreement"] == 1.0 and s["overall"]["delta"] == 0
    assert {g["group"] for g in s["groups"]} == {f"L{n}-D{d}" for n in (400, 600) for d in (0, 50, 100)}
    records = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(records) == 6 and all(rec["tokens_agree"] for rec in records)
    assert all(rec["prompt_tokens"] <= rec["context_len"] for rec in records)
    png = (out / "niah_heatmap.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| L400-D0 |" in (out / "report.md").read_text()


def test_a_different_reference_policy_shows_disagreement(tmp_path):
    r = run(*TINY, *NIAH, "--reference-policy", "full", "--out", str(tmp_path / "o"), "--min-agreement", "1.0",
            "--json")
    assert r.exit_code == 1, r.output
    s = json.loads(r.stdout)
    assert s["overall"]["agreement_rate"] < 1.0
    assert "below --min-agreement" in r.stderr


def test_onnx_engine_on_niah(tmp_path):
    engine = tmp_path / "engine"
    assert CliRunner().invoke(main, ["build", *TINY[:2], *TINY[2:], "--out", str(engine),
                                     "--max-input-len", "1024"]).exit_code == 0
    r = run("--engine", str(engine), *NIAH, "--out", str(tmp_path / "o"), "--min-agreement", "1.0", "--json")
    assert r.exit_code == 0, r.output
    s = json.loads(r.stdout)
    assert s["overall"]["agreement_rate"] == 1.0 and s["overall"]["index_agreement"] == 1.0
    assert s["manifest"]["backend"] == "onnx"


def test_longbench_end_to_end(tmp_path):
    out = tmp_path / "lb"
    r = run(*TINY, "--suite", "longbench", "--data", str(FIXTURES), "--datasets", "hotpotqa,trec", "--limit", "2",
            "--out", str(out), "--json")
    assert r.exit_code == 0, r.output
    s = json.loads(r.stdout)
    assert [g["group"] for g in s["groups"]] == ["hotpotqa", "trec"]
    assert all(g["n"] == 2 and g["agreement_rate"] == 1.0 for g in s["groups"])
    assert all(0 <= g["engine_score"] <= 100 for g in s["groups"])


def test_resume_after_interruption_gives_the_same_report(tmp_path):
    full = tmp_path / "full"
    assert run(*TINY, *NIAH, "--out", str(full)).exit_code == 0
    part = tmp_path / "part"
    assert run(*TINY, *NIAH, "--out", str(part)).exit_code == 0
    lines = (part / "samples.jsonl").read_text().splitlines(keepends=True)
    (part / "samples.jsonl").write_text("".join(lines[:2]) + lines[2][:25])  # killed mid-write
    again = run(*TINY, *NIAH, "--out", str(part))
    assert again.exit_code == 2 and "--resume" in again.stderr
    r = run(*TINY, *NIAH, "--out", str(part), "--resume")
    assert r.exit_code == 0, r.output
    assert len((part / "samples.jsonl").read_text().splitlines()) == 6
    assert comparable(summary(part)) == comparable(summary(full))


def test_resume_refuses_a_different_run(tmp_path):
    out = tmp_path / "o"
    assert run(*TINY, *NIAH, "--out", str(out)).exit_code == 0
    r = run(*TINY, "--suite", "niah", "--lengths", "400", "--depths", "50", "--out", str(out), "--resume")
    assert r.exit_code == 2 and "different run" in r.stderr


def test_shards_merged_equal_a_single_run(tmp_path):
    single = tmp_path / "single"
    assert run(*TINY, *NIAH, "--out", str(single)).exit_code == 0
    for i in range(2):
        r = run(*TINY, *NIAH, "--shard", f"{i}/2", "--out", str(tmp_path / f"s{i}"))
        assert r.exit_code == 0, r.output
        assert summary(tmp_path / f"s{i}")["overall"]["n"] == 3
    r = run("--merge", str(tmp_path / "s0"), "--merge", str(tmp_path / "s1"), "--out", str(tmp_path / "merged"))
    assert r.exit_code == 0, r.output
    assert comparable(summary(tmp_path / "merged")) == comparable(summary(single))


def test_bad_data_stops_or_is_skipped(tmp_path):
    r = run(*TINY, "--suite", "longbench", "--data", str(FIXTURES / "bad"), "--out", str(tmp_path / "a"))
    assert r.exit_code == 2 and "hotpotqa.jsonl:" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "a" / "samples.jsonl").exists() or not (tmp_path / "a" / "samples.jsonl").read_text()
    r = run(*TINY, "--suite", "longbench", "--data", str(FIXTURES / "bad"), "--skip-bad", "--out",
            str(tmp_path / "b"), "--json")
    assert r.exit_code == 0, r.output
    s = json.loads(r.stdout)
    assert len(s["skipped_bad"]) == 2 and s["overall"]["n"] >= 1


@pytest.mark.parametrize("args,fragment", [
    ([*TINY, "--out", "X"], "--suite"),
    (["--suite", "niah", "--out", "X"], "either --engine DIR or --model"),
    ([*TINY, "--suite", "niah", "--lengths", "100,abc", "--out", "X"], "abc"),
    ([*TINY, "--suite", "niah", "--shard", "3/2", "--out", "X"], "--shard"),
    ([*TINY, "--suite", "longbench", "--out", "X"], "--data"),
    ([*TINY, "--suite", "niah", "--needle", "only a needle", "--out", "X"], "go together"),
])
def test_bad_usage(tmp_path, args, fragment):
    args = [str(tmp_path / "o") if a == "X" else a for a in args]
    r = run(*args)
    assert r.exit_code == 2, r.output
    assert fragment in r.stderr and "Traceback" not in r.stderr


def test_multi_query_niah_scores_both_ways(tmp_path):
    """One context per length with a needle at every depth; each question answered re-compressed and from the
    context compressed once, on the engine and the reference; the ORT engine agrees with the reference in both."""
    engine = tmp_path / "E"
    assert CliRunner().invoke(main, ["build", "--model", "tiny-llama3", "--kv-budget", "48", "--window", "4",
                                     "--max-input-len", "1024", "--out", str(engine)]).exit_code == 0
    out = tmp_path / "mq"
    r = run("--engine", str(engine), "--suite", "niah", "--multi-query", "--lengths", "500,700",
            "--depths", "10,50,90", "--max-new-tokens", "6", "--out", str(out), "--json")
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)
    assert summary["overall"]["n"] == 6  # 2 contexts x 3 questions
    assert summary["overall"]["agreement_rate"] == 1.0 and summary["overall"]["reuse_agreement_rate"] == 1.0
    assert {"engine_reuse_score", "reference_reuse_score"} <= set(summary["groups"][0])
    records = [json.loads(line) for line in (out / "samples.jsonl").open()]
    assert sorted(r["id"] for r in records) == sorted(f"niah-mq-L{n}-D{d}" for n in (500, 700) for d in (10, 50, 90))
    assert {r["answer"] for r in records} == {"eat a sandwich and sit in Dolores Park on a sunny day", "4817203",
                                              "swim in a warm lagoon under the northern lights"}
    assert all(r["prompt_tokens"] <= r["context_len"] for r in records)
    assert "compressed once" in (out / "report.md").read_text()
    # resume after losing the last context's records: only that context is run again
    lines = (out / "samples.jsonl").read_text().splitlines(keepends=True)
    (out / "samples.jsonl").write_text("".join(lines[:4]))
    r = run("--engine", str(engine), "--suite", "niah", "--multi-query", "--lengths", "500,700",
            "--depths", "10,50,90", "--max-new-tokens", "6", "--out", str(out), "--resume", "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["overall"]["n"] == 6
    ids = [json.loads(line)["id"] for line in (out / "samples.jsonl").open()]
    assert len(ids) == 6 == len(set(ids))  # the context re-run, only its 2 missing questions appended


@pytest.mark.parametrize("policy", ["pyramidkv", "kvzip"])
def test_multi_query_longbench_groups_samples_sharing_a_context(tmp_path, policy):
    """Rows with the same context become one compressed context asked each question; the recompress answers are
    exactly the ordinary run's (context + question = the official prompt), both ways agree with the reference."""
    tiny = ["--model", "tiny-llama3", "--policy", policy, *matrix.flags(policy, kv_budget=24)]
    data = ["--suite", "longbench", "--data", str(FIXTURES / "shared")]
    out = tmp_path / "mq"
    r = run(*tiny, *data, "--multi-query", "--out", str(out), "--json")
    assert r.exit_code == 0, r.output
    s = json.loads(r.stdout)
    assert s["overall"]["n"] == 3 and s["overall"]["agreement_rate"] == 1.0
    assert s["overall"]["reuse_agreement_rate"] == 1.0
    records = {r["id"]: r for r in map(json.loads, (out / "samples.jsonl").open())}
    assert set(records) == {"hotpotqa/hp-101", "hotpotqa/hp-102", "hotpotqa/hp-103"}
    a, b, c = (records[f"hotpotqa/hp-10{i}"] for i in (1, 2, 3))
    assert a["context_tokens"] == b["context_tokens"] > 24 and c["context_tokens"] != a["context_tokens"]
    assert all(r["prompt_tokens"] > r["context_tokens"] for r in records.values())  # the question is not shared
    plain = run(*tiny, *data, "--out", str(tmp_path / "plain"), "--json")
    assert plain.exit_code == 0, plain.output
    for line in (tmp_path / "plain" / "samples.jsonl").open():
        single = json.loads(line)
        assert records[single["id"]]["engine_answer"] == single["engine_answer"]
        assert records[single["id"]]["prompt_tokens"] == single["prompt_tokens"]


@pytest.mark.parametrize("args,fragment", [
    (["--suite", "niah", "--depths", "0,20,40,60,80,100"], "at most 5 depths"),
    (["--suite", "niah", "--needle", "n", "--question", "q", "--answer", "a"], "its own needles"),
])
def test_multi_query_bad_input(tmp_path, args, fragment):
    r = run("--model", "tiny-llama3", "--multi-query", *args, "--lengths", "500", "--out",
            str(tmp_path / "o"))
    assert r.exit_code == 2 and fragment in r.stderr, r.output
