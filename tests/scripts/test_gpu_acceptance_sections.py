"""scripts/gpu_acceptance.py cannot pass a section that did not prove its claim: a pytest section with nothing
run (or, on a GPU, a CUDA test skipped) fails, and fp16 rows are judged against a drift measured in the same run."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "gpu_acceptance.py"


@pytest.fixture(scope="module")
def acceptance():
    spec = importlib.util.spec_from_file_location("gpu_acceptance_sections", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_pytest_counts(acceptance):
    assert acceptance.pytest_counts("..\n3 passed, 1 skipped, 2 errors in 1.0s") == \
        {"passed": 3, "failed": 0, "skipped": 1, "error": 2}
    assert acceptance.pytest_counts("1 failed, 1 error in 0.1s")["error"] == 1


def test_a_pytest_section_that_ran_nothing_fails(acceptance):
    result = acceptance.run_pytest(["tests/trt_plugins/test_trt_plugin.py"], "no_such_test", need_cuda_tests=False)
    assert result["status"] == "failed" and result["passed"] == 0


def test_a_skipped_cuda_test_fails_a_gpu_section(acceptance):
    result = acceptance.run_pytest(["tests/trt_plugins/test_aot_launch.py"], None, need_cuda_tests=True)
    if result["skipped"]:  # no GPU here: the test skips, which proves nothing
        assert result["status"] == "failed"
    else:  # pragma: no cover - a GPU host
        assert result["status"] == "passed"


def test_fp16_envelope(acceptance):
    baseline = {"max_abs_logit_diff": 0.01, "index_agreement": 0.98}
    assert acceptance.within_fp16_envelope({"max_abs_logit_diff": 0.019, "index_agreement": 0.94}, baseline)
    assert not acceptance.within_fp16_envelope({"max_abs_logit_diff": 0.021, "index_agreement": 1.0}, baseline)
    assert not acceptance.within_fp16_envelope({"max_abs_logit_diff": 0.001, "index_agreement": 0.9}, baseline)
    tiny = {"max_abs_logit_diff": 1e-5, "index_agreement": None}  # FullKV: no kept sets; at least 1e-3 allowed
    assert acceptance.within_fp16_envelope({"max_abs_logit_diff": 9e-4, "index_agreement": None}, tiny)


@pytest.fixture(scope="module")
def bench_kernels():
    spec = importlib.util.spec_from_file_location("bench_kernels_sections", SCRIPT.parent / "bench_kernels.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bandwidth_from_device_properties_or_the_table(bench_kernels):
    class Props:  # an H100 SXM as torch reports it: memory clock in kHz, bus width in bits
        memory_clock_rate, memory_bus_width = 2_619_000, 5120

    bandwidth, source = bench_kernels.memory_bandwidth(Props(), "NVIDIA H100 80GB HBM3")
    assert abs(bandwidth - 3.352e12) < 1e9 and "device properties" in source
    assert bench_kernels.memory_bandwidth(object(), "NVIDIA H200") == (4.8e12, "datasheet table: H200")
    assert bench_kernels.memory_bandwidth(object(), "NVIDIA H100 PCIe")[0] == 2.0e12, "the first match wins"
    assert bench_kernels.memory_bandwidth(object(), "Some GPU")[0] is None
    # K and V of one LLaMA-3-8B layer at 32k tokens, fp16: 128 MiB, about 28 us on an H200
    assert bench_kernels.bytes_bound_us(2 * 8 * 32768 * 128 * 2, 4.8e12) == 27.96
    assert bench_kernels.bytes_bound_us(1, None) is None


def test_kernel_targets_are_the_issues(acceptance):
    rows = [{"method": "pyramidkv", "context": 4096, "kernel_ms": 0.1, "spec_ms": 1.4},
            {"method": "pyramidkv", "context": 32768, "kernel_ms": 0.5, "spec_ms": 2.2, "kernel_vs_bytes_bound": 17.9},
            {"method": "chunkkv", "context": 32768, "kernel_ms": 9.0, "spec_ms": None}]
    assert acceptance.kernel_targets(rows) == {"faster_than_spec_at_every_length": True,
                                               "at_least_4x_faster_at_32k": True,
                                               "within_10x_of_bytes_bound_at_32k": False}
    assert acceptance.kernel_targets(rows[:1])["at_least_4x_faster_at_32k"] is None
