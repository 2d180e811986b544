"""The trained preset retrieves, so accuracy against cache size means something (issue 12).

The numbers asserted are the ones observed on the shipped deterministic weights (README, "Accuracy on the
trained preset"); they change only when the weights do.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from pkv_cli import main

ANSWER = "eat a sandwich and sit in Dolores Park on a sunny day"


def run(*args):
    return CliRunner().invoke(main, list(args))


def test_fullkv_over_the_default_grid(tmp_path):
    """The NIAH default grid (4 lengths up to 4032 tokens x 5 depths, the default needle and answer length): every
    needle up to 1008 tokens is found whole (the model often goes on with the first word of the sentence after
    the needle, which the score ignores); beyond, it loses its place among thousands of haystack bytes (0.765
    overall, not the issue's 0.95; README "Limits")."""
    out = tmp_path / "niah"
    r = run("validate", "--model", "tiny-retriever", "--policy", "full", "--suite", "niah", "--reference", "none",
            "--out", str(out), "--json")
    assert r.exit_code == 0, r.output
    rows = [json.loads(line) for line in (out / "samples.jsonl").open()]
    assert sorted({row["context_len"] for row in rows}) == [512, 1008, 2016, 4032] and len(rows) == 20
    short = [row for row in rows if row["context_len"] <= 1008]
    assert all(row["engine_answer"].startswith(ANSWER) for row in short), [row["engine_answer"] for row in short]
    assert [row["engine_score"] for row in short] == [1.0] * 10
    overall = json.loads((out / "summary.json").read_text())["overall"]["engine_score"]
    assert overall == pytest.approx(0.765, abs=0.02)


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
    and loses every needle (0.1: one answer word that is also a haystack word); SnapKV and PyramidKV keep the
    answer's first words (0.2); KVzip, which scores pairs by how well they reconstruct the context, keeps the
    needles at depths 25 and 50 whole; FullKV answers whole."""
    cells = small_budget_sweep
    scores = {name: cells[name]["score"] for name in cells}
    assert scores == pytest.approx({"full": 1.0, "streamingllm-C256": 0.1, "snapkv-C256": 0.2,
                                    "pyramidkv-C256": 0.2, "kvzip-C256": 0.7}, abs=0.01)
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


def test_an_engine_built_from_the_preset_keeps_its_chat_template(tmp_path):
    """Engines carry the checkpoint's chat template (chat_template.jinja), so `validate --engine` asks in the
    format the model was trained on, as the reference does, and finds the needle."""
    engine = tmp_path / "engine"
    r = run("build", "--model", "tiny-retriever", "--policy", "full", "--out", str(engine))
    assert r.exit_code == 0, r.output
    assert (engine / "tokenizer" / "chat_template.jinja").is_file()
    out = tmp_path / "niah"
    r = run("validate", "--engine", str(engine), "--suite", "niah", "--lengths", "512", "--depths", "50",
            "--reference", "none", "--out", str(out))
    assert r.exit_code == 0, r.output
    [row] = [json.loads(line) for line in (out / "samples.jsonl").open()]
    assert row["engine_answer"].startswith(ANSWER) and row["engine_score"] == 1.0
