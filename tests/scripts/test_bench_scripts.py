"""The benchmark scripts run end to end on tiny sizes and print JSON then a Markdown table (no timing asserted)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # every benchmark script end to end in its own process

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


def test_bench_methods_smoke():
    data, table = run_script("bench_methods.py", "--contexts", "300", "--new-tokens", "3", "--repeats", "1",
                             "--kv-budget", "32", "--window", "4")
    rows = {r["method"]: r for r in data["rows"]}
    assert set(rows) >= {"full", "streamingllm", "h2o", "snapkv", "pyramidkv", "chunkkv", "chunkkv-reuse2"}
    assert rows["full"]["selection_ms"] == 0 and rows["pyramidkv"]["selection_ms"] > 0  # the profiler saw it
    assert all(r["kv_ratio"] < 1 for k, r in rows.items() if k != "full")
    assert "reuse_speedup" in rows["chunkkv-reuse2"] and table.startswith("| method | context |")
    kvzip = rows["kvzip"]
    assert 0 < kvzip["scoring_ms"] <= kvzip["selection_ms"] and kvzip["scoring_vs_prefill"] > 0
    assert kvzip["kv_span_over_held"] >= 1
    assert rows["pyramidinfer"]["selection_ms"] > 0 and rows["pyramidinfer"]["kv_ratio"] < 1


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


def test_bench_peers_smoke():
    """The peer benchmark on a tiny context: every engine runs in its own process, FullKV's greedy tokens equal
    transformers', the targets section is printed (genai joins when the bench extra is installed)."""
    proc = subprocess.run([sys.executable, str(SCRIPTS / "bench_peers.py"), "--contexts", "160", "--batch8-context",
                           "0", "--rounds", "1", "--new-tokens", "3", "--no-doc"], capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    data, end = json.JSONDecoder().raw_decode(proc.stdout)
    table = proc.stdout[end:].partition("\n\n|")[2]
    table = "|" + table
    rows = {r["engine"]: r for r in data["rows"]}
    assert {"pkv-full", "pkv-pyramidkv"} <= set(rows)
    assert rows["pkv-full"]["tokens_equal_transformers"] is True
    assert rows["pkv-pyramidkv"]["first_token_equal"] is True and "selection_overhead" in rows["pkv-pyramidkv"]
    assert all(r["peak_rss_mib"] > 0 and r["bound_ms"] > 0 for r in rows.values())
    if "genai" in rows:
        assert rows["genai"]["tokens_equal_transformers"] is True and "decode_speedup_vs_genai" in rows["pkv-full"]
    assert table.startswith("| engine | context |") and "Targets (issue #9)" in table


def test_gpu_acceptance_runs_here_and_says_what_it_skipped(tmp_path):
    pytest.importorskip("triton")
    proc = subprocess.run([sys.executable, str(SCRIPTS / "gpu_acceptance.py"), "-k", "streaming_kernel", "--report",
                           str(tmp_path)], capture_output=True, text=True, timeout=900)
    report = json.loads((tmp_path / "report.json").read_text())
    status = {s["section"]: s for s in report["sections"]}
    assert status["kernels vs spec"]["status"] == "passed", status["kernels vs spec"]
    import torch

    if not torch.cuda.is_available():
        assert proc.returncode == 0 and report["mode"].startswith("no-gpu")
        for name in ("kernel benchmark", "tensorrt build + compare", "tensorrt vs onnxruntime",
                     "tensorrt-llm build + compare", "onnxruntime CUDA: KVzip, PyramidInfer, PyramidKV vs reference"):
            assert status[name]["status"] == "skipped" and status[name]["reason"]
    assert "| kernels vs spec | passed |" in (tmp_path / "report.md").read_text()


def test_bench_serving_smoke(tmp_path):
    """The serving benchmark end to end on a tiny preset: PyramidKV in flight with whole prefills and with chunked
    prefill (closed loop and Poisson arrivals), the static batcher, the targets; every answer of the chunked run
    equals the whole-prefill run's, and ignore_eos gives every request its new tokens."""
    pytest.importorskip("pytriton")
    proc = subprocess.run([sys.executable, str(SCRIPTS / "bench_serving.py"), "--model", "tiny-llama3", "--policies",
                           "pyramidkv", "--step-tokens", "0", "32", "--static-policies", "pyramidkv", "--concurrency",
                           "3", "--prompt-tokens", "300", "--new-tokens", "4", "--rate", "4", "--poisson-requests",
                           "2", "--mix", "100", "300", "--kv-memory", "2MiB", "--work", str(tmp_path), "--no-doc"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    data, _ = json.JSONDecoder().raw_decode(proc.stdout)
    rows = {(r["batching"], r["step_tokens"], r["clients"]): r for r in data["closed_loop"] + data["poisson"]}
    assert set(rows) == {("inflight", 0, 3), ("inflight", 32, 3), ("static", None, 3), ("inflight", 0, None),
                         ("inflight", 32, None)}
    inflight = [r for key, r in rows.items() if key[0] == "inflight"]
    assert all(r["refused"] == 0 and r["output_tokens"] == 4 * r["requests"] for r in inflight)
    assert rows[("inflight", 32, 3)]["answers_equal"] is True and rows[("inflight", 32, None)]["answers_equal"] is True
    assert all(r["decode_step_ms"] is None or r["decode_step_ms"] > 0 for r in inflight)
    targets = data["targets"]["pyramidkv step 32"]
    assert {"ttft_p99_no_worse", "tokens_per_s_no_worse", "poisson_ttft_p99_chunked_vs_whole"} <= set(targets)
    assert "| policy | batching | step_tokens |" in proc.stdout


def test_profile_decode_smoke(tmp_path):
    from click.testing import CliRunner

    from pkv_cli import main

    engine = tmp_path / "eng"
    r = CliRunner().invoke(main, ["build", "--model", "tiny-llama3", "--random-weights", "--policy", "pyramidkv",
                                  "--kv-budget", "32", "--window", "4", "--max-input-len", "256", "--out", str(engine)])
    assert r.exit_code == 0, r.output
    proc = subprocess.run([sys.executable, str(SCRIPTS / "profile_decode.py"), "--engine", str(engine), "--contexts",
                           "100", "--steps", "3"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    data, _, table = proc.stdout.partition("\n\n|")
    (row,) = json.loads(data)["rows"]
    assert row["policy"] == "pyramidkv" and row["context"] == 100
    assert 0 < row["GroupQueryAttention"] < row["model_run_ms"] <= row["decode_ms_per_token"]
    assert table.startswith(" engine | policy |")
    bad = subprocess.run([sys.executable, str(SCRIPTS / "profile_decode.py"), "--engine", str(tmp_path)],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "not an onnxruntime engine directory" in bad.stderr
