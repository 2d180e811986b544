"""The trained preset retrieves, so accuracy against cache size means something (issue 12).

The numbers asserted are the ones observed on the shipped deterministic weights (README, "Accuracy on the
trained preset"); they change only when the weights do. The long grids run on the preset's FullKV ONNX engine
(equal to the reference: tests/engines/test_ort_engine.py; ten times faster at 4k tokens); the reference runs
the chat-template and small-budget sweep tests below.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from pkv_cli import main

pytestmark = pytest.mark.slow  # the trained preset over NIAH grids up to 4k tokens

ANSWER = "eat a sandwich and sit in Dolores Park on a sunny day"


def run(*args):
    return CliRunner().invoke(main, list(args))


@pytest.fixture(scope="module")
def engine(tmp_path_factory) -> Path:
    """tiny-retriever's FullKV ONNX engine, built once for the tests of this module."""
    out = tmp_path_factory.mktemp("retriever") / "engine"
    r = run("build", "--model", "tiny-retriever", "--policy", "full", "--out", str(out))
    assert r.exit_code == 0, r.output
    return out


def test_fullkv_over_the_default_grid(engine, tmp_path):
    """The NIAH default grid (4 lengths up to 4032 tokens x 5 depths, the default needle and answer length): every
    needle up to 2016 tokens is found whole (the model often goes on with a few letters or words after the
    answer, which the score ignores); at 4032 tokens it loses a word or four at depths 0-50: 0.97 overall, above
    the issue's 0.95."""
    out = tmp_path / "niah"
    r = run("validate", "--engine", str(engine), "--suite", "niah", "--reference", "none", "--out", str(out), "--json")
    assert r.exit_code == 0, r.output
    rows = [json.loads(line) for line in (out / "samples.jsonl").open()]
    assert sorted({row["context_len"] for row in rows}) == [512, 1008, 2016, 4032] and len(rows) == 20
    short = [row for row in rows if row["context_len"] <= 2016]
    assert all(row["engine_answer"].startswith(ANSWER) for row in short), [row["engine_answer"] for row in short]
    assert [row["engine_score"] for row in short] == [1.0] * 15
    overall = json.loads((out / "summary.json").read_text())["overall"]["engine_score"]
    assert overall >= 0.95 and overall == pytest.approx(0.97, abs=0.01)


def test_key_value_lookup_among_distractors(engine, tmp_path):
    """A magic number hidden in the haystack is read back digit for digit, near and 4k tokens away."""
    out = tmp_path / "kv"
    r = run("validate", "--engine", str(engine), "--suite", "niah", "--reference", "none",
            "--needle", "The magic number of Winnipeg is 90316.", "--question", "What is the magic number of Winnipeg?",
            "--answer", "90316", "--lengths", "1008,4032", "--depths", "0,50,100", "--out", str(out), "--json")
    assert r.exit_code == 0, r.output
    rows = [json.loads(line) for line in (out / "samples.jsonl").open()]
    assert len(rows) == 6 and all(row["engine_answer"].startswith("90316") for row in rows), rows
    assert [row["engine_score"] for row in rows] == [1.0] * 6


@pytest.fixture(scope="module")
def small_budget_sweep(tmp_path_factory) -> dict[str, dict]:
    out: Path = tmp_path_factory.mktemp("sweep") / "retriever"
    r = run("sweep", "--model", "tiny-retriever", "--policies", "full,streamingllm,snapkv,pyramidkv,kvzip",
            "--budgets", "256", "--window", "32", "--suite", "niah", "--lengths", "1008", "--depths", "25,50,75",
            "--out", str(out), "--json")
    assert r.exit_code == 0, r.output
    return {c["cell"]: c for c in json.loads((out / "sweep.json").read_text())["cells"]}


def test_small_budgets_cost_what_the_methods_predict(small_budget_sweep):
    """256 of 1008 tokens (27 % of the bytes), needles in the middle: StreamingLLM keeps the sinks and the end
    and loses every needle (0.0); SnapKV keeps the answer's first word (0.1: "eat") and PyramidKV nothing (0.0):
    the window's attention does not point at the needle's bytes (README, "Differs").
    KVzip, which scores pairs by how well they reconstruct the context, keeps every needle whole, as FullKV does."""
    cells = small_budget_sweep
    scores = {name: cells[name]["score"] for name in cells}
    assert scores == pytest.approx({"full": 1.0, "streamingllm-C256": 0.0, "snapkv-C256": 0.1,
                                    "pyramidkv-C256": 0.0, "kvzip-C256": 1.0}, abs=0.01)
    assert all(c["kv_matches_plan"] for c in cells.values())
    assert all(cells[name]["kv_ratio"] == pytest.approx(0.27, abs=0.01) for name in cells if name != "full")


QUESTION = ("Question: What is the best thing to do in San Francisco? Answer in one sentence based only on the text "
            "above.")


@pytest.fixture(scope="module")
def needle_context(tmp_path_factory) -> Path:
    """About 1000 bytes of the generated haystack with the default needle in the middle."""
    from validate.niah import DEFAULT_NEEDLE, generated_sentences

    sentences = [s for s, _ in zip(generated_sentences(3), range(12), strict=False)]
    sentences.insert(6, DEFAULT_NEEDLE.needle)
    path = tmp_path_factory.mktemp("context") / "context.txt"
    path.write_text(" ".join(sentences))
    return path


@pytest.mark.parametrize("mode", ["context", "prompt"])
def test_generate_with_the_chat_template_answers(needle_context, mode):
    """`generate --chat` wraps the text as the user turn the preset was trained on: it answers whole, from a
    context compressed once (--context/--question) or from one prompt; without --chat it does not."""
    text = needle_context.read_text()
    ask = (["--context", str(needle_context), "--question", QUESTION] if mode == "context"
           else ["--prompt", f"{text}\n\n{QUESTION}"])
    base = ["generate", "--model", "tiny-retriever", "--policy", "full", "--max-new-tokens", "64", *ask]
    r = run(*base, "--chat")
    assert r.exit_code == 0, r.output
    assert r.stdout.strip().splitlines()[-1].removeprefix("A: ").startswith(ANSWER)
    r = run(*base)
    assert r.exit_code == 0, r.output
    assert ANSWER not in r.stdout


def test_an_engine_built_from_the_preset_keeps_its_chat_template(engine, tmp_path):
    """Engines carry the checkpoint's chat template (chat_template.jinja), so `validate --engine` asks in the
    format the model was trained on, as the reference does, and finds the needle."""
    assert (engine / "tokenizer" / "chat_template.jinja").is_file()
    out = tmp_path / "niah"
    r = run("validate", "--engine", str(engine), "--suite", "niah", "--lengths", "512", "--depths", "50",
            "--reference", "none", "--out", str(out))
    assert r.exit_code == 0, r.output
    [row] = [json.loads(line) for line in (out / "samples.jsonl").open()]
    assert row["engine_answer"].startswith(ANSWER) and row["engine_score"] == 1.0
