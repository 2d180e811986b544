"""The evidence gpu_acceptance.py reads back: what the hook recorded passes `check_records` when every layer's answer
is the op specification's, and fails when the hook never ran, missed a layer, returned other indices, kept
nothing where it should have, or never compressed anything."""

from __future__ import annotations

import torch

from engines.trtllm_hook_record import RECORD_ENV, check_records, read_records, recorder_from_env
from engines.trtllm_sparse import HookSpec, attention_class
from tests.engines.trtllm_fakes import HKV, D, FakeRocket, H, metadata

SPEC = HookSpec(budget=12, window=4, kernel=5, pooling="avg")
LAYERS = 3


def run_layers(directory, lens=(40, 9, 25), layers=LAYERS, spec=SPEC):
    recorder = recorder_from_env({RECORD_ENV: str(directory)})
    cls = attention_class(FakeRocket, spec, recorder)
    g = torch.Generator().manual_seed(5)
    for layer in range(layers):
        qkv = torch.randn(sum(lens) + 1, (H + 2 * HKV) * D, generator=g)
        cls(layer).sparse_kv_predict(qkv, None, metadata(list(lens)))
    return read_records(directory)


def test_recorded_answers_pass_when_they_are_the_spec(tmp_path):
    records = run_layers(tmp_path)
    problems, summary = check_records(records, LAYERS, budget=SPEC.budget)
    assert problems == [] and summary["calls"] == LAYERS and summary["layers"] == [0, 1, 2]
    assert summary["compressed_sequences_checked"] == 2 * LAYERS  # 40 and 25 reach the budget, 9 does not


def test_no_records_or_a_missing_layer_fail(tmp_path):
    assert check_records([], LAYERS)[0] == ["the hook never ran (no context call recorded)"]
    problems, _ = check_records(run_layers(tmp_path, layers=2), LAYERS)
    assert any("layers [0, 1]" in p for p in problems)


def test_indices_other_than_the_spec_fail(tmp_path):
    records = run_layers(tmp_path)
    records[1]["indices"][0, 3] += 1  # one kept position moved in layer 1, first sequence
    problems, _ = check_records(records, LAYERS)
    assert problems == ["call 1 (layer 1), sequence 0: kept indices differ from the op specification's"]
    records = run_layers(tmp_path / "other")
    problems, _ = check_records(records, LAYERS, budget=SPEC.budget + 1)
    assert len(problems) == LAYERS and "expected 13" in problems[0]


def test_nothing_returned_or_nothing_compressed_fail(tmp_path):
    records = run_layers(tmp_path)
    records[0]["indices"] = records[0]["offsets"] = None
    assert any("returned nothing" in p for p in check_records(records, LAYERS)[0])
    short = run_layers(tmp_path / "short", lens=(9, 11))
    assert all(r["indices"] is None for r in short)
    assert check_records(short, LAYERS)[0] == [
        "no recorded sequence reached the budget: nothing was compressed, nothing proven"]
