"""The AOT payloads of every stage kernel, compiled once per test process (PTX ISA 8.0 for sm_80, in a clean
subprocess: this one runs Triton's interpreter). Shared by the payload checks (test_trt_plugin.py) and the plugin
API checks (test_trt_plugin_api.py), whose `aot_impl` calls ask for the same specialisations."""

from __future__ import annotations

import pytest

from tests.trt_plugins.payload_cases import CASES


@pytest.fixture(scope="session")
def aot_payloads():
    pytest.importorskip("triton", reason="the triton package (dev / gpu extras) is not installed")
    from trt_plugins.trt_aot import compile_stages

    cases = CASES()
    kernels = compile_stages([(stage.name, "fp16", constants) for stage, constants in cases.values()])
    return {case: (*cases[case], kernel) for case, kernel in zip(cases, kernels, strict=True)}
