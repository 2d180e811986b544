"""scripts/study.py end to end on a tiny grid of the tiny model: every step's sweep, the generated results page, and
the step clock that keeps counting across a resumed run."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # seven sweeps in processes of their own

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "study.py"
GRID = ["--model", "tiny-llama3", "--budgets", "32,48", "--window", "8", "--niah-lengths", "320", "--depths", "50",
        "--ruler-lengths", "2048", "--ruler-new-tokens", "4", "--int4-lengths", "320", "--int4-depths", "50",
        "--windows", "4", "16", "--window-budgets", "12,32", "--window-lengths", "320", "--max-input-len", "2048"]


def study(out: Path, doc: Path) -> dict:
    proc = subprocess.run([sys.executable, str(SCRIPT), "--out", str(out), "--doc", str(doc), *GRID],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


def test_every_step_then_a_resume_that_keeps_the_time(tmp_path):
    out, doc = tmp_path / "study", tmp_path / "docs" / "results.md"
    first = study(out, doc)
    steps = ["niah", "ruler", "niah-int4", "window-4", "window-16"]
    assert list(first) == steps
    assert set(first["niah"]["cells"]) == {"full", "pyramidinfer",
                                           *(f"{m}-C{b}" for m in ("streamingllm", "h2o", "snapkv", "pyramidkv",
                                                                   "chunkkv", "kvzip") for b in (32, 48))}
    assert set(first["window-16"]["cells"]) == {"snapkv-C32", "pyramidkv-C32"}  # budgets above the window only
    clock = json.loads((out / "study-time.json").read_text())
    assert set(clock) == set(steps) and all(clock[s] == first[s]["seconds"] > 0 for s in steps)
    text = doc.read_text()
    for heading in ("## niah:", "## ruler:", "## niah-int4:", "## int4 weights beside fp32", "## Observation window",
                    "## Time per step"):
        assert heading in text
    assert "| method (fp32 / int4) | C=32 | C=48 |" in text and "| 16 | - |" in text  # no C=12 under w=16
    assert (doc.parent / "img" / "study" / "niah-score_vs_kv.png").read_bytes()[:4] == b"\x89PNG"

    again = study(out, doc)  # every sweep resumes, finished: same scores, the clock adds this run's seconds
    for s in steps:
        assert again[s]["cells"] == first[s]["cells"]
        assert again[s]["seconds"] > first[s]["seconds"]
    assert json.loads((out / "study-time.json").read_text()) == {s: again[s]["seconds"] for s in steps}


def test_bad_usage_exits_2_and_writes_nothing(tmp_path):
    for args in (["--out", str(tmp_path / "new"), "--steps", "niah", "nope"], ["--out", str(tmp_path / "file")]):
        (tmp_path / "file").write_text("not a directory")
        proc = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=60)
        assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].startswith("study.py: error: ")
        assert not (tmp_path / "new").exists() and (tmp_path / "file").read_text() == "not a directory"
