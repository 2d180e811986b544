"""`validate --inspect-failures` / `sweep --inspect-failures`: a page per failed NIAH sample, the needle marked,
built from the run's own generation, linked from the reports; resumed runs fill in the pages they lack."""

from __future__ import annotations

import json
import shutil

import pytest
from click.testing import CliRunner

from engines.reference import ReferenceEngine
from exporter.checkpoint import load_model
from methods import make_policy
from pkv_cli import main
from validate.failures import failed, page_path
from validate.niah import DEFAULT_NEEDLE
from validate.suites import NiahSuite

TINY = ["--model", "tiny-llama3", "--policy", "snapkv", "--kv-budget", "24", "--window", "4"]
GRID = ["--suite", "niah", "--lengths", "320", "--depths", "0,100", "--max-new-tokens", "2"]


def invoke(*args):
    return CliRunner().invoke(main, list(map(str, args)))


def test_failure_is_below_the_reference_or_below_one():
    assert failed({"engine_score": 0.5, "reference_score": 1.0})
    assert not failed({"engine_score": 0.0, "reference_score": 0.0})  # the reference misses it too: no diagnosis
    assert failed({"engine_score": 0.9}) and not failed({"engine_score": 1.0})


def test_validate_writes_and_links_a_page_per_failed_sample(tmp_path):
    """The random tiny model misses every needle: without a reference each sample fails and gets its page, whose
    kept sets are what the engine holds for that very prompt. Two shards merge with their pages; a resumed run
    makes a page it lacks."""
    ids = ["niah-L320-D0", "niah-L320-D100"]
    for shard in (0, 1):
        r = invoke("validate", *TINY, *GRID, "--reference", "none", "--inspect-failures", "--shard", f"{shard}/2",
                   "--out", tmp_path / f"s{shard}")
        assert r.exit_code == 0, r.output
        assert (tmp_path / f"s{shard}" / page_path(ids[shard])).is_file()
    out = tmp_path / "merged"
    r = invoke("validate", "--merge", tmp_path / "s0", "--merge", tmp_path / "s1", "--out", out)
    assert r.exit_code == 0, r.output
    report = (out / "report.md").read_text()
    for sid in ids:
        assert f"[{sid}]({page_path(sid)})" in report
        assert {p.name for p in (out / page_path(sid)).parent.iterdir()} == {"index.html", "kept.png", "kept.json"}
    assert [p["id"] for p in json.loads((out / "summary.json").read_text())["inspect_pages"]] == ids
    kept = json.loads((out / page_path(ids[0])).with_name("kept.json").read_text())
    assert kept["mark"]["text"] == DEFAULT_NEEDLE.needle and kept["notes"]["engine score"] == "0.0"
    assert kept["layers"][0]["heads"][0]["scores"] is not None  # the reference's scores, asked for by the run
    # Exactly what the engine holds for that prompt.
    loaded = load_model("tiny-llama3")
    engine = ReferenceEngine(loaded, make_policy("snapkv", kv_budget=24, window=4))
    sample = NiahSuite([320], [0.0], max_new_tokens=2, chat=True).samples(engine.tokenizer, 1024, None)[0][0]
    assert sample.ids == kept["token_ids"]
    held = engine.generate([sample.ids], 1, return_indices=True).kept_indices
    assert [[h["kept"] for h in layer["heads"]] for layer in kept["layers"]] == [
        [[p for p in row if p >= 0] for row in k[0].tolist()] for k in held]
    # Resume: a page lost since is made again, from a prefill of its sample.
    run = tmp_path / "s1"
    shutil.rmtree((run / page_path(ids[1])).parent)
    r = invoke("validate", *TINY, *GRID, "--reference", "none", "--inspect-failures", "--shard", "1/2", "--resume",
               "--out", run)
    assert r.exit_code == 0, r.output
    assert (run / page_path(ids[1])).is_file() and f"]({page_path(ids[1])})" in (run / "report.md").read_text()
    assert len((run / "samples.jsonl").read_text().splitlines()) == 1


@pytest.mark.slow
def test_a_needle_the_reference_finds_and_the_engine_drops(tmp_path):
    """The trained preset finds part of the needle with FullKV; PyramidKV at C = 32 loses it: the page says which
    layers and heads dropped the needle, and how far below each head's cut it scored."""
    out = tmp_path / "run"
    r = invoke("validate", "--model", "tiny-retriever", "--policy", "pyramidkv", "--kv-budget", "32", "--window", "8",
               "--reference-policy", "full", "--suite", "niah", "--lengths", "256", "--depths", "50",
               "--max-new-tokens", "16", "--inspect-failures", "--out", out)
    assert r.exit_code == 0, r.output
    record = json.loads((out / "samples.jsonl").read_text())
    assert record["engine_score"] < record["reference_score"]
    page = (out / page_path(record["id"])).read_text(encoding="utf-8")
    assert 'id="mark"' in page and "dropping it" in page and " &lt; " in page  # the needle scored below a cut
    kept = json.loads((out / page_path(record["id"])).with_name("kept.json").read_text())
    per_head = [k for layer in kept["mark"]["kept_per_layer_head"] for k in layer]
    needle_tokens = kept["mark"]["token_end"] - kept["mark"]["token_start"]
    assert min(per_head) < needle_tokens  # some head lost part of it


def test_sweep_links_the_pages_per_cell(tmp_path):
    out = tmp_path / "sweep"
    r = invoke("sweep", "--model", "tiny-llama3", "--policies", "snapkv", "--budgets", "24", "--window", "4",
               "--suite", "niah", "--lengths", "320", "--depths", "50", "--max-new-tokens", "2",
               "--engine-backend", "reference", "--inspect-failures", "--out", out)
    assert r.exit_code == 0, r.output
    link = f"cells/snapkv-C24/{page_path('niah-L320-D50')}"
    assert f"[niah-L320-D50]({link})" in (out / "report.md").read_text() and (out / link).is_file()
    cell = json.loads((out / "sweep.json").read_text())["cells"][0]
    assert [p["page"] for p in cell["inspect_pages"]] == [link]
    # the cell shared its prefill (the default): its page is the one it writes on its own, scores included
    alone = tmp_path / "alone"
    r = invoke("sweep", "--model", "tiny-llama3", "--policies", "snapkv", "--budgets", "24", "--window", "4",
               "--suite", "niah", "--lengths", "320", "--depths", "50", "--max-new-tokens", "2",
               "--engine-backend", "reference", "--inspect-failures", "--no-shared-prefill", "--out", alone)
    assert r.exit_code == 0, r.output
    page = (out / link).parent
    for name in ("kept.json", "index.html"):
        assert (page / name).read_bytes() == (alone / link).parent.joinpath(name).read_bytes()
    layers = json.loads((page / "kept.json").read_text())["layers"]
    assert any(head["scores"] for layer in layers for head in layer["heads"])  # the reference's selection scores
    # a resumed shared sweep makes the page its earlier part lacks, the same page
    shutil.rmtree(page)
    r = invoke("sweep", "--model", "tiny-llama3", "--policies", "snapkv", "--budgets", "24", "--window", "4",
               "--suite", "niah", "--lengths", "320", "--depths", "50", "--max-new-tokens", "2",
               "--engine-backend", "reference", "--inspect-failures", "--resume", "--out", out)
    assert r.exit_code == 0, r.output
    assert (page / "kept.json").read_bytes() == (alone / link).parent.joinpath("kept.json").read_bytes()


@pytest.mark.parametrize("args", [
    ["validate", *TINY, "--suite", "longbench", "--data", "x"],
    ["validate", *TINY, "--suite", "niah", "--multi-query"],
    ["sweep", "--model", "tiny-llama3", "--suite", "longbench", "--data", "x"],
])
def test_only_plain_niah_runs_have_failure_pages(tmp_path, args):
    r = invoke(*args, "--inspect-failures", "--out", tmp_path / "out")
    assert r.exit_code == 2 and r.stderr.strip().startswith("error: --inspect-failures works on NIAH"), r.output
    assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "out").exists()
