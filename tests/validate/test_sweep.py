"""`pkv-export sweep`: every (policy, budget) cell on the same samples, resumable, with bytes checked against plan."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from pkv_cli import main
from validate.sweep import category_scores, parse_cells

FIXTURES = Path(__file__).parent / "fixtures"
NIAH = ("sweep", "--model", "tiny-llama3", "--policies", "full,streamingllm,pyramidkv", "--budgets", "32,16",
        "--window", "4", "--suite", "niah", "--lengths", "320,400", "--depths", "0,100", "--max-new-tokens", "4")


def run(*args):
    return CliRunner().invoke(main, list(args))


@pytest.fixture(scope="module")
def onnx_sweep(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sweep") / "niah"
    r = run(*NIAH, "--out", str(out), "--json")
    assert r.exit_code == 0, r.output
    return out


def cells_of(out: Path) -> dict[str, dict]:
    return {c["cell"]: c for c in json.loads((out / "sweep.json").read_text())["cells"]}


def test_every_cell_once_with_bytes_checked_against_plan(onnx_sweep):
    summary = json.loads((onnx_sweep / "sweep.json").read_text())
    cells = cells_of(onnx_sweep)
    assert summary["complete"] and summary["samples"] == 4
    assert list(cells) == ["full", "streamingllm-C16", "streamingllm-C32", "pyramidkv-C16", "pyramidkv-C32"]
    assert all(c["kv_matches_plan"] and c["n"] == 4 for c in cells.values())
    assert cells["full"]["kv_ratio"] == 1.0 and cells["full"]["delta_to_full"] == 0.0
    for policy in ("streamingllm", "pyramidkv"):  # compressed, and more bytes for the larger budget
        assert 0 < cells[f"{policy}-C16"]["kv_ratio"] < cells[f"{policy}-C32"]["kv_ratio"] < 0.2
    for png in ("score_vs_kv.png", "niah_cells.png"):
        assert (onnx_sweep / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = (onnx_sweep / "report.md").read_text()
    assert "| pyramidkv-C16 |" in report and "L320" in report and "![niah_cells](niah_cells.png)" in report
    # FullKV's engine, and one engine for the prefill every other cell shares (each cell selects in memory)
    assert sorted(p.name for p in (onnx_sweep / "engines").iterdir()) == ["full", "shared-prefill"]


def timeless_records(out: Path, cell: str) -> list[dict]:
    rows = (out / "cells" / cell / "samples.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(row).items() if k != "engine_seconds"} for row in rows]


def timeless_sweep(out: Path) -> dict:
    summary = json.loads((out / "sweep.json").read_text())
    summary.pop("plots", None)
    for row in summary["cells"]:
        row.pop("seconds")
    return summary


def assert_same_sweep(a: Path, b: Path) -> None:
    """Two sweeps of the same settings hold the same cells, records (timings aside), run files and sweep.json."""
    cells = sorted(p.name for p in (a / "cells").iterdir())
    assert cells == sorted(p.name for p in (b / "cells").iterdir())
    for cell in cells:
        assert timeless_records(a, cell) == timeless_records(b, cell), cell
        assert (a / "cells" / cell / "run.json").read_text() == (b / "cells" / cell / "run.json").read_text()
    assert timeless_sweep(a) == timeless_sweep(b)


def test_one_prefill_per_sample_equals_every_cell_alone(onnx_sweep, tmp_path):
    out = tmp_path / "alone"
    r = run(*NIAH, "--out", str(out), "--no-shared-prefill")
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in (out / "engines").iterdir()) == sorted(cells_of(out))  # one engine per cell
    assert "one prefill per sample" not in r.stderr and "cell 5/5 pyramidkv-C32" in r.stderr
    assert_same_sweep(onnx_sweep, out)


def test_kvzip_budgets_share_one_scoring_pass(tmp_path):
    """KVzip's cells: one engine and one prefill + scoring pass per sample for every budget; the same sweep as each
    budget's own engine."""
    args = ("sweep", "--model", "tiny-llama3", "--policies", "kvzip", "--budgets", "16,64", "--suite", "niah",
            "--lengths", "320,400", "--depths", "0,100", "--max-new-tokens", "4")
    shared, alone = tmp_path / "shared", tmp_path / "alone"
    r = run(*args, "--out", str(shared))
    assert r.exit_code == 0, r.output
    assert "2 cells, one prefill per sample" in r.stderr
    assert [p.name for p in (shared / "engines").iterdir()] == ["shared-prefill-kvzip-s4-c2000-p8"]
    assert run(*args, "--out", str(alone), "--no-shared-prefill").exit_code == 0
    assert sorted(p.name for p in (alone / "engines").iterdir()) == ["kvzip-C16", "kvzip-C64"]
    assert_same_sweep(shared, alone)
    cells = cells_of(shared)
    assert cells["kvzip-C16"]["kv_ratio"] < cells["kvzip-C64"]["kv_ratio"] < 1.0


# tiny-mistral (sliding window 48) on the reference, both kinds of scores (H2O's every query, the window's) and
# ChunkKV's chunks, KVzip's group (its budgets share a scoring pass), NIAH prompts of about 320 and 400 tokens:
# PyramidKV at C=24 is a pyramid, at C=200 uniform (320) and a pyramid (400), at C=512 the prompts are kept whole.
# (tests/engines/test_shared_prefill.py and test_kvzip_shared.py run every method in every regime on both backends
# and models.)
MISTRAL = ("sweep", "--model", "tiny-mistral", "--policies", "h2o,pyramidkv,chunkkv,kvzip",
           "--budgets", "24,200,512", "--window", "4", "--suite", "niah", "--lengths", "320,400", "--depths", "50",
           "--max-new-tokens", "4", "--engine-backend", "reference")


def test_reference_sweep_shares_the_prefill_exactly(tmp_path):
    shared, alone = tmp_path / "shared", tmp_path / "alone"
    assert run(*MISTRAL, "--out", str(shared)).exit_code == 0
    assert run(*MISTRAL, "--out", str(alone), "--no-shared-prefill").exit_code == 0
    assert_same_sweep(shared, alone)
    ratios = {c["cell"]: c["kv_ratio"] for c in json.loads((shared / "sweep.json").read_text())["cells"]}
    assert ratios["pyramidkv-C512"] == 1.0 and ratios["pyramidkv-C24"] < ratios["pyramidkv-C200"] < 1.0
    # interrupted while sharing (a torn line, a sample missing), resumed one cell at a time: the same sweep
    victim = shared / "cells" / "h2o-C200" / "samples.jsonl"
    lines = victim.read_text().splitlines(keepends=True)
    victim.write_text(lines[0][:20])
    (shared / "sweep.json").unlink()
    assert run(*MISTRAL, "--out", str(shared), "--resume", "--no-shared-prefill").exit_code == 0
    assert_same_sweep(shared, alone)


def test_the_onnx_cells_answer_as_the_reference_cells(onnx_sweep, tmp_path):
    out = tmp_path / "ref"
    assert run(*NIAH, "--engine-backend", "reference", "--out", str(out)).exit_code == 0
    for cell in cells_of(onnx_sweep):
        answers = [[json.loads(line)["engine_answer"] for line in (d / "cells" / cell / "samples.jsonl").open()]
                   for d in (onnx_sweep, out)]
        assert answers[0] == answers[1]


def test_resume_runs_only_what_is_missing(onnx_sweep, tmp_path):
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(onnx_sweep, out)
    victim = out / "cells" / "pyramidkv-C32" / "samples.jsonl"
    lines = victim.read_text().splitlines(keepends=True)
    victim.write_text(lines[0] + lines[1][:10])  # killed mid-write: one sample finished, one torn
    other = out / "cells" / "streamingllm-C16" / "samples.jsonl"
    other.write_text("".join(other.read_text().splitlines(keepends=True)[:-1]))  # its last sample never started
    (out / "sweep.json").unlink()
    untouched = (out / "cells" / "full" / "samples.jsonl").read_text()
    engine_stamp = (out / "engines" / "shared-prefill" / "pkv-engine.json").stat().st_mtime_ns
    r = run(*NIAH, "--out", str(out), "--resume")
    assert r.exit_code == 0, r.output
    # the torn and missing samples redone (three prefills for one cell, the last shared by two), the same answers
    assert_same_sweep(out, onnx_sweep)
    assert (out / "cells" / "full" / "samples.jsonl").read_text() == untouched
    assert (out / "engines" / "shared-prefill" / "pkv-engine.json").stat().st_mtime_ns == engine_stamp
    # a resume with other settings is refused, and leaves the sweep alone
    r = run(*[a if a != "32,16" else "32,24" for a in NIAH], "--out", str(out), "--resume")
    assert r.exit_code == 2 and "other settings (budgets)" in r.stderr


@pytest.mark.parametrize("args,fragment", [
    (["--policies", "full,nope"], "unknown nope"),
    (["--budgets", "16,x"], "must be integers"),
    (["--budgets", "16,16"], "distinct"),
    (["--budgets", "4"], "--window"),
    (["--resume", "--force"], "give one of them"),
    (["--max-input-len", "0"], "--max-input-len must be in"),
])
def test_bad_input_is_one_line(tmp_path, args, fragment):
    r = run(*NIAH, *args, "--out", str(tmp_path / "s"))
    assert r.exit_code == 2 and fragment in r.stderr and "Traceback" not in r.output
    assert not (tmp_path / "s").exists()


def test_force_replaces_only_a_sweep(tmp_path, onnx_sweep):
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    r = run(*NIAH, "--out", str(other), "--force")
    assert r.exit_code == 2 and "replaces only a pkv-export sweep" in r.stderr
    assert (other / "notes.txt").read_text() == "mine"
    r = run(*NIAH, "--out", str(onnx_sweep))
    assert r.exit_code == 2 and "--force" in r.stderr


def test_longbench_categories(tmp_path):
    out = tmp_path / "lb"
    r = run("sweep", "--model", "tiny-llama3", "--policies", "full,snapkv", "--budgets", "24", "--window", "4",
            "--suite", "longbench", "--data", str(FIXTURES), "--datasets", "hotpotqa,trec", "--limit", "1",
            "--engine-backend", "reference", "--max-input-len", "512", "--out", str(out), "--json")
    assert r.exit_code == 0, r.output
    cells = {c["cell"]: c for c in json.loads(r.stdout)["cells"]}
    assert set(cells) == {"full", "snapkv-C24"}
    assert set(cells["snapkv-C24"]["categories"]) == {"multi-doc QA", "few-shot"}
    assert (out / "score_vs_kv.png").is_file() and not (out / "niah_cells.png").exists()


def test_cells_and_categories():
    cells = parse_cells("pyramidkv,full,pyramidkv", "128,64", 8)
    assert [c.name for c in cells] == ["pyramidkv-C64", "pyramidkv-C128", "full"]
    groups = [{"group": "hotpotqa", "engine_score": 40.0}, {"group": "musique", "engine_score": 20.0},
              {"group": "trec_e", "engine_score": 10.0}, {"group": "mine", "engine_score": 1.0}]
    assert category_scores(groups) == {"multi-doc QA": 30.0, "few-shot": 10.0, "other": 1.0}


def test_chunkkv_cells_hold_at_most_plan(tmp_path):
    """ChunkKV keeps whole chunks: a prompt whose last partial chunk is picked holds fewer bytes than `plan`
    (ChunkKVPolicy.kept_prefix), which the sweep accepts as matching; more would not be. The trained preset's
    observation window attends to the tokens just before it, so its last partial chunk is picked."""
    out = tmp_path / "chunk"
    r = run("sweep", "--model", "tiny-retriever", "--policies", "chunkkv", "--budgets", "128", "--window", "32",
            "--suite", "niah", "--lengths", "512", "--depths", "50", "--max-new-tokens", "2", "--out", str(out))
    assert r.exit_code == 0, r.output
    cell = cells_of(out)["chunkkv-C128"]
    assert cell["kv_matches_plan"] and cell["kv_bytes_held"] < cell["kv_bytes_plan"]


def test_int4_sweep_answers_as_the_int4_engine(tmp_path):
    """`sweep --weights int4` runs the cells on the weights `build --weights int4` stores: the reference's answers
    on them equal an int4 (MatMulNBits) engine's, token for token, and differ from the fp weights' logits."""
    from engines.ort_engine import OrtEngine
    from exporter.checkpoint import load_model
    from validate.suites import NiahSuite

    args = ("sweep", "--model", "tiny-llama3", "--policies", "pyramidkv", "--budgets", "32", "--window", "4",
            "--suite", "niah", "--lengths", "320", "--depths", "0,100", "--max-new-tokens", "6",
            "--engine-backend", "reference", "--weights", "int4")
    r = run(*args, "--out", str(tmp_path / "sweep"))
    assert r.exit_code == 0, r.output
    config = json.loads((tmp_path / "sweep" / "sweep-config.json").read_text())
    assert config["weights"]["format"] == "int4" and config["weights"]["block_size"] == 32
    engine = tmp_path / "int4"
    r = run("build", "--model", "tiny-llama3", "--policy", "pyramidkv", "--kv-budget", "32", "--window", "4",
            "--weights", "int4", "--max-input-len", "512", "--out", str(engine))
    assert r.exit_code == 0, r.output
    samples, _ = NiahSuite([320], [0.0, 100.0], max_new_tokens=6).samples(load_model("tiny-llama3").tokenizer(),
                                                                             512, None)
    records = [json.loads(line) for line in (tmp_path / "sweep" / "cells" / "pyramidkv-C32" / "samples.jsonl").open()]
    got = OrtEngine(engine).generate([s.ids for s in samples], 6)
    assert [r["engine_answer"] for r in records] == got.text
