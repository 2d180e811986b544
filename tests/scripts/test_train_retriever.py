"""scripts/train_retriever.py: deterministic, and what it writes is a checkpoint `--model` takes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from exporter.checkpoint import load_model

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "train_retriever.py"
TINY = ["--phases", "2:2:96:160:1.0:0,2:1:400:480:0.0:1.0", "--eval-every", "0"]  # a copy phase, a needle phase


def train(out: Path) -> list[dict]:
    done = subprocess.run([sys.executable, str(SCRIPT), "--out", str(out), *TINY], capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr
    return [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]


def test_same_seed_same_weights_and_a_loadable_checkpoint(tmp_path):
    train(tmp_path / "a")
    train(tmp_path / "b")
    first, second = ((tmp_path / d / "model.safetensors").read_bytes() for d in "ab")
    assert first == second
    loaded = load_model(str(tmp_path / "a"))
    assert not loaded.random_weights and loaded.spec.num_layers == 4 and loaded.spec.rope_theta == 500000.0
    assert "Steps: 4, seed 0" in (tmp_path / "a" / "README.md").read_text()
