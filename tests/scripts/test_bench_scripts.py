"""The benchmark scripts run end to end on tiny sizes and print JSON then a Markdown table (no timing asserted)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"


def run_script(name: str, *args: str) -> tuple[object, str]:
    proc = subprocess.run([sys.executable, str(SCRIPTS / name), *args, "--no-doc"], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    data, _, table = proc.stdout.partition("\n\n|")
    return json.loads(data), "|" + table


def test_bench_engine_smoke():
    data, table = run_script("bench_engine.py", "--contexts", "300", "--batches", "1", "--new-tokens", "3",
                             "--repeats", "1")
    rows = data["rows"]
    assert {r["backend"] for r in rows} == {"onnxruntime", "torch-reference"}
    ort = next(r for r in rows if r["backend"] == "onnxruntime")
    assert ort["kv_held_equals_plan"] is True and ort["kv_bytes_held"] < ort["kv_bytes_full_held"]
    assert table.startswith("| backend | context |")


def test_build_memory_smoke(tmp_path):
    data, table = run_script("build_memory.py", "--model", "tiny-llama3", "--layers", "1", "2", "--dtype", "fp32",
                             "--workdir", str(tmp_path))
    assert [r["layers"] for r in data] == [1, 2] and data[1]["engine_mib"] > data[0]["engine_mib"]
    assert "peak_rss_mib" in table


def test_bench_triton_smoke():
    pytest.importorskip("pytriton")
    data, table = run_script("bench_triton.py", "--prompt-tokens", "96", "--new-tokens", "3", "--concurrency", "2",
                             "--kv-budget", "32")
    assert {r["model"] for r in data["rows"]} == {"full", "pyramidkv"}
    assert all(r["requests"] == 16 and r["requests_per_s"] > 0 for r in data["rows"])
    assert "throughput_vs_full" in table
