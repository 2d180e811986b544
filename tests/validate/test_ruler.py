"""RULER's synthetic tasks: what the generated prompts hold, their sizes, determinism, RULER's metric, the CLI."""

from __future__ import annotations

import json
import random
import re
import shutil
from collections import Counter
from pathlib import Path

import pytest
from click.testing import CliRunner

from exporter.tokenizer import byte_level_tokenizer
from pkv_cli import main
from pkv_core.errors import UserInputError
from validate import ruler, ruler_tasks

NEEDLE = re.compile(r"One of the special magic numbers for ([a-z]+-[a-z]+) is: (\d{7})\.")
LENGTH = 2400  # bytes: the byte-level tokenizer needs up to about 2100 for cwe (its solved example), 1700 for vt


@pytest.fixture(scope="module")
def tok():
    return byte_level_tokenizer()


@pytest.fixture(scope="module")
def samples(tok) -> dict[str, list[ruler.RulerSample]]:
    got = ruler.ruler_samples(tok, [LENGTH], list(ruler.TASKS), 2, None, True, seed=7)
    return {name: [s for s in got if s.task == name] for name in ruler.TASKS}


def user_text(tok, sample: ruler.RulerSample) -> str:
    """The user message of a chat prompt (the byte-level template: '<|user|>\\n' ... '\\n<|assistant|>\\n')."""
    return tok.decode(sample.ids).split("<|user|>\n", 1)[1].rsplit("\n<|assistant|>\n", 1)[0]


def test_every_task_fills_its_length_and_leaves_room_for_its_answer(tok, samples):
    for name, mine in samples.items():
        assert [s.id for s in mine] == [f"ruler-{name}-L{LENGTH}-{i}" for i in range(2)]
        for s in mine:
            assert s.max_new_tokens == ruler.TASKS[name].tokens_to_generate
            assert len(s.ids) + s.max_new_tokens <= LENGTH
            # the largest size that fits: one more sentence or word would not
            more = ruler.encode(tok, ruler.TASKS[name].make(random.Random(f"ruler:7:{name}:{LENGTH}:{s.id[-1]}"),
                                                            s.size + 1, _setup(tok, name)), True)
            assert len(more) + s.max_new_tokens > LENGTH or name == "cwe" and s.size == len(ruler_tasks.cwe_pool())


def _setup(tok, name: str) -> ruler.Setup:
    from validate.niah import generated_sentences

    sentences = ruler._Sentences(generated_sentences(0))
    setup = ruler.Setup(sentences, LENGTH, ruler.TASKS[name].tokens_to_generate)
    if name == "vt":
        setup.example = ruler._vt_example(tok, sentences, LENGTH, 7)
    return setup


@pytest.mark.parametrize("name,keys,values,queries", [("niah_multikey", 4, 1, 1), ("niah_multivalue", 1, 4, 1),
                                                      ("niah_multiquery", 4, 1, 4)])
def test_niah_holds_every_needle_and_asks_for_the_right_values(tok, samples, name, keys, values, queries):
    for s in samples[name]:
        text = user_text(tok, s)
        needles = NEEDLE.findall(text)
        assert len(needles) == keys * values
        by_key: dict[str, list[str]] = {}
        for key, value in needles:
            by_key.setdefault(key, []).append(value)
        assert len(by_key) == keys and all(len(v) == values for v in by_key.values())
        assert len({v for _, v in needles}) == keys * values  # every value once: the answer is unique
        question = text.rsplit("\n", 1)[1]
        asked = re.findall(r"[a-z]+-[a-z]+", question)
        assert len(asked) == queries and set(asked) <= set(by_key)
        assert sorted(s.answers) == sorted(v for key in asked for v in by_key[key])
        if values == 1:  # in the order asked
            assert s.answers == [by_key[key][0] for key in asked]
        prompt = tok.decode(s.ids)
        if queries * values == 1:  # RULER's singular wording
            assert text.startswith("A special magic number is hidden") and question.startswith("What is the")
            assert prompt.endswith(f"<|assistant|>\n The special magic number for {asked[0]} mentioned in the "
                                   "provided text is")
        else:
            assert text.startswith("Some special magic numbers are hidden")
            assert question.startswith("What are all the special magic numbers for ")
            assert prompt.endswith(" mentioned in the provided text are")
        assert "The old fisherman" in text or "According to" in text  # the NIAH suite's generated haystack


def test_vt_holds_the_chain_of_its_answer_after_a_solved_example(tok, samples):
    for s in samples["vt"]:
        text = user_text(tok, s)
        example, task = text.split("\n\nMemorize and track", 1)
        value = re.search(r"assigned the value (\d{5}) in the text above\.$", task)[1]
        assignments = dict(re.findall(r"VAR ([A-Z]{5}) = (VAR [A-Z]{5}|\d{5})\.", task))
        assert len(assignments) == 5 and set(assignments) == set(s.answers)
        chain = [s.answers[0]]
        assert assignments[chain[0]] == value
        for name in s.answers[1:]:  # each answer is assigned the previous one: the chain from the value
            assert assignments[name] == f"VAR {chain[-1]}"
            chain.append(name)
        shown = re.findall(r"VAR ([A-Z]{3}) = ", example)
        assert len(shown) == 5 and example.rstrip().endswith(" ".join(shown))  # solved: its answer follows it
        assert value not in example and not set(shown) & set(s.answers)
        assert tok.decode(s.ids).endswith(f"5 variables are assigned the value {value}, they are: ")


def _listed(block: str) -> list[str]:
    words = re.findall(r"(\d+)\. ([a-z]+)", block)
    assert [int(n) for n, _ in words] == list(range(1, len(words) + 1))  # numbered 1..n
    return [w for _, w in words]


def test_cwe_answer_words_are_the_most_common(tok, samples):
    for s in samples["cwe"]:
        example, task = user_text(tok, s).split("\nBelow is a numbered list", 1)
        counts = Counter(_listed(task.split("\n")[1]))
        assert set(s.answers) == {w for w, n in counts.items() if n == 6} and len(s.answers) == 10
        assert set(counts.values()) == {6, 1} and len(counts) == s.size  # below 4096 tokens: 6x against 1x
        shot_list, shot_answer = example.split("\n")[1], example.split("most often in the list are: ")[1]
        shot = Counter(_listed(shot_list))
        assert sorted(_listed(shot_answer)) == sorted(w for w, n in shot.items() if n == 3)
    long = ruler_tasks.cwe(random.Random(1), 40, long=True)  # from 4096 tokens on: RULER's 30x against 3x
    counts = Counter(_listed(long.content.split("\n")[-2]))
    assert sorted(counts.values()) == [3] * 30 + [30] * 10 and {w for w, n in counts.items() if n == 30} == \
        set(long.answers)


def test_fwe_answer_words_are_the_three_most_frequent(tok, samples):
    for s in samples["fwe"]:
        coded = user_text(tok, s).split("coded words. ", 1)[1].split("\nQuestion:")[0].split()
        counts = Counter(coded).most_common()
        assert counts[0][0] == "..." and {w for w, _ in counts[1:4]} == set(s.answers)
        assert counts[3][1] > counts[4][1]  # the three are strictly more frequent than every other word


@pytest.mark.parametrize("chat", [True, False])
def test_deterministic_per_seed_and_seeds_differ(tok, chat):
    def build(seed):
        return [s.ids for s in ruler.ruler_samples(tok, [LENGTH], list(ruler.TASKS), 1, None, chat, seed)]

    first, again, other = build(3), build(3), build(4)
    assert first == again
    assert all(a != b for a, b in zip(first, other, strict=True))
    if not chat:  # BOS, the task's text, its answer prefix
        assert all(tok.decode(ids).startswith("<|begin_of_text|>") and "<|user|>" not in tok.decode(ids)
                   for ids in first)


def test_a_length_too_small_or_an_unknown_task_is_one_line(tok):
    with pytest.raises(UserInputError, match="RULER niah_multikey: length 300 is too small"):
        ruler.ruler_samples(tok, [300], ["niah_multikey"], 1, None, True, 0)
    with pytest.raises(UserInputError, match="--tasks: unknown nope"):
        ruler.parse_tasks("cwe,nope")
    assert ruler.parse_tasks("vt, cwe,vt") == ["vt", "cwe"]


def test_string_match_all_is_rulers_metric():
    """Hand-worked: RULER's string_match_all is the mean over samples of the share of references found,
    lowercased, in the prediction stripped and with control characters as newlines; times 100, two decimals."""
    predictions = ["The numbers are 1234567 and 7654321.", "nothing here", " ABC\tdef ", "QZJ"]
    references = [["1234567", "7654321"], ["42"], ["abc", "DEF", "ghi"], ["qzj", "xyz", "q", "z"]]
    per_sample = [ruler.string_match_all(p, r) for p, r in zip(predictions, references, strict=True)]
    assert per_sample == [1.0, 0.0, 2 / 3, 0.75]
    assert ruler.task_score(predictions, references) == 60.42  # (1 + 0 + 2/3 + 3/4) / 4 = 0.604166...
    assert ruler.postprocess(" a\x00b\x1fc\n ") == "a\nb\nc"
    assert ruler.string_match_all("art", ["start"]) == 0.0 and ruler.string_match_all("start", ["art"]) == 1.0


@pytest.mark.parametrize("start", [1, 5, 37, 90, 400])
@pytest.mark.parametrize("hi", [None, 50])
def test_largest_fitting_equals_a_linear_scan(start, hi):
    cost = [3 + 2 * n + (n % 3) for n in range(1000)]  # grows with the size, not evenly
    for budget in (3, 40, 77, 150):
        want = max((n for n in range(0, (hi or 999) + 1) if cost[n] <= budget), default=None)
        assert ruler.largest_fitting(cost.__getitem__, budget, 0, hi, start) == want
    assert ruler.largest_fitting(cost.__getitem__, 2, 0, hi, start) is None


# --- the CLI on tiny-llama3 -----------------------------------------------------------------------------------------

TINY = ["--model", "tiny-llama3", "--policy", "snapkv", "--kv-budget", "24", "--window", "4"]
RULER = ["--suite", "ruler", "--tasks", "niah_multivalue,fwe", "--lengths", "800", "--limit", "2",
         "--max-new-tokens", "3", "--reference", "none"]


def run(*args):
    return CliRunner().invoke(main, ["validate", *args])


def summary(out: Path) -> dict:
    s = json.loads((out / "summary.json").read_text())
    return {"overall": s["overall"], "tasks": s["tasks"], "groups": s["groups"]}


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ruler") / "single"
    r = run(*TINY, *RULER, "--out", str(out), "--json")
    assert r.exit_code == 0, r.output
    return out


def test_cli_groups_by_task_and_length(single):
    s = json.loads((single / "summary.json").read_text())
    assert s["overall"]["n"] == 4
    assert [g["group"] for g in s["groups"]] == ["niah_multivalue/L800", "fwe/L800"]
    assert [(t["task"], t["n"], t["lengths"]) for t in s["tasks"]] == [("niah_multivalue", 2, [800]),
                                                                       ("fwe", 2, [800])]
    records = [json.loads(line) for line in (single / "samples.jsonl").open()]
    assert all(r["prompt_tokens"] + 3 <= r["context_len"] == 800 for r in records)
    assert [len(r["answers"]) for r in records] == [4, 4, 3, 3]
    for r in records:  # each record scored with RULER's metric, reported x100
        assert r["engine_score"] == ruler.string_match_all(r["engine_answer"], r["answers"])
    assert s["tasks"][1]["engine_score"] == ruler.task_score([r["engine_answer"] for r in records[2:]],
                                                             [r["answers"] for r in records[2:]])
    report = (single / "report.md").read_text()
    assert "| task | n | lengths | engine_score |" in report and "| fwe/L800 | 2 |" in report


def test_cli_resume_and_shards_give_the_same_report(single, tmp_path):
    part = tmp_path / "part"
    shutil.copytree(single, part)
    lines = (part / "samples.jsonl").read_text().splitlines(keepends=True)
    (part / "samples.jsonl").write_text(lines[0] + lines[1][:20])  # killed mid-write
    r = run(*TINY, *RULER, "--out", str(part), "--resume")
    assert r.exit_code == 0, r.output
    assert summary(part) == summary(single)
    r = run(*TINY, *RULER, "--seed", "1", "--out", str(part), "--resume")
    assert r.exit_code == 2 and "different run" in r.stderr
    for i in range(2):
        r = run(*TINY, *RULER, "--shard", f"{i}/2", "--out", str(tmp_path / f"s{i}"))
        assert r.exit_code == 0, r.output
    r = run("--merge", str(tmp_path / "s0"), "--merge", str(tmp_path / "s1"), "--out", str(tmp_path / "merged"))
    assert r.exit_code == 0, r.output
    assert summary(tmp_path / "merged") == summary(single)


@pytest.mark.parametrize("args,fragment", [
    (["--suite", "ruler", "--depths", "50"], "--depths is for --suite niah, not ruler"),
    (["--suite", "ruler", "--multi-query"], "--multi-query is for --suite niah or longbench"),
    (["--suite", "niah", "--tasks", "cwe"], "--tasks is for --suite ruler, not niah"),
    (["--suite", "ruler", "--tasks", "cwe,nope"], "--tasks: unknown nope"),
    (["--suite", "ruler", "--tasks", "cwe", "--lengths", "300"], "RULER cwe: length 300 is too small"),
])
def test_cli_bad_usage_is_one_line(tmp_path, args, fragment):
    r = run(*TINY, *args, "--out", str(tmp_path / "o"))
    assert r.exit_code == 2 and fragment in r.stderr and "Traceback" not in r.output, r.output
    assert not (tmp_path / "o").exists()


def test_sweep_reports_each_task(tmp_path):
    out = tmp_path / "sweep"
    r = CliRunner().invoke(main, ["sweep", "--model", "tiny-llama3", "--policies", "full,snapkv", "--budgets", "24",
                                  "--window", "4", "--engine-backend", "reference", "--suite", "ruler", "--tasks",
                                  "fwe,niah_multikey", "--lengths", "800", "--limit", "1", "--max-new-tokens", "2",
                                  "--out", str(out), "--json"])
    assert r.exit_code == 0, r.output
    cells = {c["cell"]: c for c in json.loads(r.stdout)["cells"]}
    assert set(cells) == {"full", "snapkv-C24"}
    assert all(list(c["tasks"]) == ["niah_multikey", "fwe"] and c["n"] == 2 for c in cells.values())
    assert cells["snapkv-C24"]["kv_matches_plan"] and cells["snapkv-C24"]["kv_ratio"] < 0.1
    report = (out / "report.md").read_text()
    assert any(line.startswith("| cell |") and line.endswith("| niah_multikey | fwe |") for line in report.splitlines())
    assert (out / "score_vs_kv.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
