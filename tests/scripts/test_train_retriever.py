"""scripts/train_retriever.py: deterministic, and what it writes is a checkpoint `--model` takes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from exporter.checkpoint import load_model

pytestmark = pytest.mark.slow  # two training runs

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "train_retriever.py"
TINY = ["--phases", "2:2:96:160:1.0:0,2:1:400:480:0.0:1.0", "--eval-every", "0"]  # a copy phase, a needle phase


def script(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=600)


def train(out: Path) -> list[dict]:
    """The printed curve, without its wall-clock column."""
    done = script("--out", str(out), *TINY)
    assert done.returncode == 0, done.stderr
    rows = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    return [{k: v for k, v in row.items() if k != "minutes"} for row in rows]


def test_same_seed_same_weights_and_a_loadable_checkpoint(tmp_path):
    curve = train(tmp_path / "a")
    assert train(tmp_path / "b") == curve
    assert curve[-1]["step"] == 4 and curve[-1]["task"] == "needle" and curve[-1]["answer_loss"] > 0
    first, second = ((tmp_path / d / "model.safetensors").read_bytes() for d in "ab")
    assert first == second
    loaded = load_model(str(tmp_path / "a"))
    assert not loaded.random_weights and loaded.spec.num_layers == 4 and loaded.spec.rope_theta == 500000.0
    assert "Steps: 4, seed 0" in (tmp_path / "a" / "README.md").read_text()


@pytest.fixture(scope="module")
def trainer():
    """The script as a module: its argument checks run in this process (they come before any training)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("train_retriever_under_test", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("args", [["--phases", "3:2"], ["--phases", "3:2:500:100"], ["--phases", "1:1:96:160:2"],
                                  ["--init", "no-such-dir"]])
def test_bad_arguments_are_one_line_and_write_nothing(tmp_path, args, trainer, monkeypatch, capsys):
    monkeypatch.setattr("sys.argv", [str(SCRIPT), "--out", str(tmp_path / "out"), *args])
    with pytest.raises(SystemExit) as exit_:
        trainer.main()
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("train_retriever.py: error:")
    assert not (tmp_path / "out").exists()
