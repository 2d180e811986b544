"""The TensorRT-LLM rows of scripts/gpu_acceptance.py fail when what they claim did not happen. Here, without
TensorRT-LLM, nothing can run: every row must say failed (the PyramidKV row used to pass whatever happened)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # builds and compares through the CLI in subprocesses

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "gpu_acceptance.py"


@pytest.fixture(scope="module")
def acceptance():
    try:
        import tensorrt_llm  # noqa: F401
        pytest.skip("TensorRT-LLM is installed here: the rows could pass")
    except ImportError:
        pass
    spec = importlib.util.spec_from_file_location("gpu_acceptance_under_test", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("policy", ["full", "pyramidkv"])
def test_a_compare_that_could_not_run_fails_its_row(acceptance, tiny_llama_dir, tmp_path, policy):
    row = acceptance.trtllm_policy_row(policy, tiny_llama_dir, tmp_path)
    assert row["built"] is True and row["passed"] is False
    assert "tensorrt-llm==1.2" in row["compare"]  # compare's one-line error, kept in the report
    if policy == "pyramidkv":
        assert row["hook"].startswith("1 problems: the hook never ran")
    else:  # trtllm-build on the real checkpoint just written: no TensorRT-LLM here, so its row fails too
        built = acceptance.trtllm_build_row(tmp_path / "trtllm-full", tmp_path / "engine")
        assert built["passed"] is False and built["error"]


def test_trtllm_build_fails_its_row_without_an_engine(acceptance, tmp_path):
    missing = acceptance.trtllm_build_row(tmp_path / "nothing", tmp_path / "engine")
    assert missing["passed"] is False and "no checkpoint" in missing["error"]
