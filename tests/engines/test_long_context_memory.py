"""Long prompts run in memory linear in their length: no [q, q] tensor in the engine or the reference.

Each run is its own process, so its peak RSS is the run's. At 8192 tokens the tiny model's [B, H, q, q] float32
scores alone would be 1 GiB (4 heads), and the graphs before the long-context rewrite held several of them;
the bounds below leave room for the model, the runtime and linear buffers only.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from pkv_cli import main

pytestmark = pytest.mark.slow  # long prompts, measured in fresh processes

PROBE = """
import json, sys
from pathlib import Path
from engines.prompts import synthetic_prompt_ids

def peak_kib():  # VmHWM: this process's own peak (ru_maxrss of a spawned child starts at its parent's peak)
    return next(int(l.split()[1]) for l in Path("/proc/self/status").read_text().splitlines() if l.startswith("VmHWM:"))

kind, where, q = sys.argv[1], sys.argv[2], int(sys.argv[3])
if kind == "ort":
    from engines.ort_engine import OrtEngine
    engine = OrtEngine(where)
else:
    from engines.reference import ReferenceEngine
    from exporter.checkpoint import load_model
    from methods import make_policy, options_for
    engine = ReferenceEngine(load_model("tiny-llama3"),
                             make_policy(where, **options_for(where, {"kv_budget": 128, "window": 8})))
before = peak_kib()
result = engine.generate([synthetic_prompt_ids(engine.tokenizer, q, seed=0)], 2)
peak = peak_kib()
print(json.dumps({"growth_mib": (peak - before) / 1024, "tokens": result.tokens[0]}))
"""
TOKENS = 8192
QUADRATIC_MIB = 4 * TOKENS * TOKENS * 4 / 2**20  # one [1, 4, q, q] float32 tensor


def probe(kind: str, where: str) -> dict:
    r = subprocess.run([sys.executable, "-c", PROBE, kind, where, str(TOKENS)], capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    from click.testing import CliRunner

    out = {}
    for policy, options in (("full", []), ("pyramidkv", ["--kv-budget", "128", "--window", "8"])):
        d = tmp_path_factory.mktemp("long") / policy
        r = CliRunner().invoke(main, ["build", "--model", "tiny-llama3", "--policy", policy, *options, "--out", str(d)])
        assert r.exit_code == 0, r.output
        out[policy] = d
    return out


@pytest.fixture(scope="module")
def engine_runs(engines):
    """One probe per engine, shared by the tests below (an 8k-token prefill each)."""
    return {}


def engine_run(engines, engine_runs, policy: str) -> dict:
    if policy not in engine_runs:
        engine_runs[policy] = probe("ort", str(engines[policy]))
    return engine_runs[policy]


@pytest.mark.parametrize("policy", ["full", "pyramidkv"])
def test_engine_prefill_memory_is_linear(engines, engine_runs, policy):
    got = engine_run(engines, engine_runs, policy)
    assert got["growth_mib"] < QUADRATIC_MIB / 4, got  # 256 MiB: a quarter of one quadratic tensor


def test_reference_prefill_memory_is_linear_and_tokens_agree(engines, engine_runs):
    ref = probe("ref", "full")
    assert ref["growth_mib"] < QUADRATIC_MIB, ref  # blocks of query rows: 64 MiB of scores at a time
    assert engine_run(engines, engine_runs, "full")["tokens"] == ref["tokens"]
