"""`sweep`: the same validation samples through every (policy, KV budget) cell, one cell at a time.

Layout of a sweep directory:
  sweep-config.json   what was asked (model, suite, cells, backend): a resumed sweep must ask the same
  cells/<cell>/       one validation run per cell (samples.jsonl written as each sample finishes, summary.json)
  engines/<cell>/     the ONNX engine of each cell run on its own (`--engine-backend onnx`), built once, reused on
                      resume; engines/shared-prefill/: the engine of the shared prefill (validate.sweep_shared)
  sweep.json          score per cell, per group, per LongBench category / RULER task; KV bytes held against plan's
  report.md           the same as tables; plots: score_vs_kv.png and, for NIAH, niah_cells.png

FullKV does not depend on the budget, so it is one cell (`full`) however many budgets are swept. The cells of the
methods that select after the full prefill share one prefill per sample (validate.sweep_shared) unless the sweep
runs every cell on its own (`--no-shared-prefill`); the cell directories and reports are the same either way.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from statistics import mean
from typing import Any

from exporter.outputs import atomic_write_text
from exporter.plan import DTYPE_BYTES, make_plan
from methods import POLICIES, KVPolicy, make_policy, options_for
from pkv_core.errors import UserInputError

CONFIG_FILE = "sweep-config.json"  # exporter.outputs recognises a sweep by it

# LongBench v1's task categories (the paper's table columns).
CATEGORIES = {
    "single-doc QA": ("narrativeqa", "qasper", "multifieldqa_en", "multifieldqa_zh"),
    "multi-doc QA": ("hotpotqa", "2wikimqa", "musique", "dureader"),
    "summarisation": ("gov_report", "qmsum", "multi_news", "vcsum"),
    "few-shot": ("trec", "triviaqa", "samsum", "lsht"),
    "synthetic": ("passage_count", "passage_retrieval_en", "passage_retrieval_zh"),
    "code": ("lcc", "repobench-p"),
}
CATEGORY_OF = {dataset: category for category, names in CATEGORIES.items() for dataset in names}


@dataclass(frozen=True)
class Cell:
    policy: KVPolicy
    budget: int | None  # None: a policy without a budget (FullKV, PyramidInfer)

    @property
    def name(self) -> str:
        return self.policy.name if self.budget is None else f"{self.policy.name}-C{self.budget}"


def parse_cells(policies: str, budgets: str, window: int) -> list[Cell]:
    """'full,pyramidkv' x '64,128' -> cells (every policy checked before anything runs)."""
    names = [p.strip() for p in policies.split(",") if p.strip()]
    unknown = [n for n in names if n not in POLICIES]
    if not names or unknown:
        raise UserInputError(f"--policies: unknown {', '.join(unknown) or '(none given)'} "
                             f"(choose from {', '.join(POLICIES)})")
    try:
        sizes = [int(b) for b in budgets.split(",") if b.strip()]
    except ValueError:
        raise UserInputError(f"--budgets must be integers, e.g. 64,128 (got {budgets!r})") from None
    if not sizes or len(set(sizes)) != len(sizes):
        raise UserInputError(f"--budgets must list distinct sizes (got {budgets!r})")
    cells: list[Cell] = []
    for name in dict.fromkeys(names):  # --window applies to the methods that have one
        if "kv_budget" not in options_for(name, {"kv_budget": 0}):  # FullKV, PyramidInfer: no budget axis, one cell
            cells.append(Cell(make_policy(name, **options_for(name, {"window": window})), None))
            continue
        for size in sorted(sizes):
            cells.append(Cell(make_policy(name, **options_for(name, {"kv_budget": size, "window": window})), size))
    return cells


def cell_summary(cell: Cell, records: list[dict], spec, dtype: str, suite: str) -> dict[str, Any]:
    """Score and memory of one cell from its records; the bytes held are checked against `plan`."""
    from validate.report import summarize

    summary = summarize(records, suite, {})
    per_token = 2 * spec.head_dim * DTYPE_BYTES[dtype]  # K and V of one head and token
    held, planned, full, spanned, mismatched = [], [], [], [], 0
    for r in records:
        plan = make_plan(spec, cell.policy, r["prompt_tokens"], dtype=dtype)
        planned.append(plan["kv_bytes_compressed"])
        full.append(plan["kv_bytes_full"])
        slots = r.get("kv_slots")
        held.append(plan["kv_bytes_compressed"] if slots is None else slots * per_token)
        spanned.append(r.get("kv_slots_spanned", slots or 0) * per_token or held[-1])
        if cell.policy.plan_is_upper_bound:
            mismatched += held[-1] > planned[-1]
        else:
            mismatched += held[-1] != planned[-1]
    row: dict[str, Any] = {
        "cell": cell.name, "policy": cell.policy.name, "kv_budget": cell.budget, "n": len(records),
        "control": not cell.policy.compresses,  # FullKV: what every other cell's delta is measured against
        "score": summary["overall"].get("engine_score"),
        "groups": {g["group"]: g["engine_score"] for g in summary["groups"]},
        "kv_bytes_held": round(mean(held)) if held else None,
        "kv_bytes_plan": round(mean(planned)) if planned else None,
        "kv_ratio": round(sum(held) / sum(full), 4) if full else None,
        "kv_matches_plan": mismatched == 0,  # equal to plan's bytes (ChunkKV: at most)
        # bytes the cache layout spans over the kept pairs' bytes (> 1: per-head lengths padded per layer)
        "kv_span_over_held": round(sum(spanned) / sum(held), 4) if held and sum(held) else None,
        "seconds": summary["timing"]["engine_seconds"],
    }
    if suite == "longbench":
        row["categories"] = category_scores(summary["groups"])
    if suite == "ruler":  # each task's score over its lengths
        row["tasks"] = {t["task"]: t["engine_score"] for t in summary["tasks"]}
    return row


def failure_links(out: Path, cell: Cell, records: list[dict]) -> list[dict]:
    """The cell's inspect pages of failed samples (validate.failures), with paths relative to the sweep."""
    from validate.failures import pages

    return [{**p, "page": f"cells/{cell.name}/{p['page']}"} for p in pages(out / "cells" / cell.name, records)]


def category_scores(groups: list[dict]) -> dict[str, float]:
    """Mean of the dataset scores per LongBench category (datasets outside the six categories: 'other')."""
    by: dict[str, list[float]] = {}
    for g in groups:
        name = g["group"].removesuffix("_e")  # LongBench-E's datasets belong where their LongBench ones do
        by.setdefault(CATEGORY_OF.get(name, "other"), []).append(g["engine_score"])
    return {c: round(mean(v), 2) for c, v in by.items()}


def with_deltas(rows: list[dict]) -> list[dict]:
    """Add each cell's score delta to the control cell, the one that compresses nothing (when it was swept)."""
    full = next((r for r in rows if r.get("control")), None)
    for r in rows:
        r["delta_to_full"] = None if full is None or r["score"] is None or full["score"] is None \
            else round(r["score"] - full["score"], 4)
    return rows


def check_config(out: Path, config: dict, resume: bool) -> None:
    """A resumed sweep must ask exactly what the interrupted one asked."""
    path = out / CONFIG_FILE
    if resume and path.is_file():
        try:
            before = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise UserInputError(f"{path}: unreadable ({e})") from None
        if before != config:
            changed = sorted(k for k in set(before) | set(config) if before.get(k) != config.get(k))
            raise UserInputError(f"{out} holds a sweep with other settings ({', '.join(changed)}); use --force")
    atomic_write_text(path, json.dumps(config, indent=2, ensure_ascii=False))


def open_cell_engine(out: Path, cell: Cell, loaded, backend: str, dtype: str, max_input_len: int):
    """The cell's engine: the PyTorch reference, or its ONNX engine (built into engines/<cell> once)."""
    if backend == "reference":
        from engines.hf_model import torch_dtype
        from engines.reference import ReferenceEngine

        return ReferenceEngine(loaded, cell.policy, torch_dtype(dtype))
    from engines.ort_engine import OrtEngine
    from exporter.onnx.export import build_onnx_engine

    path = out / "engines" / cell.name
    if not (path / "pkv-engine.json").is_file():  # a build is staged and renamed: present means complete
        build_onnx_engine(loaded, cell.policy, path, dtype=dtype, max_input_len=max_input_len)
    return OrtEngine(path)


def run_cell(out: Path, cell: Cell, engine, samples, suite, progress=None, inspect_failures: bool = False,
             model: str = "") -> list[dict]:
    """Run the samples of one cell into cells/<cell> (resumable: finished samples are skipped); with
    `inspect_failures`, an inspect page for each sample it scores below 1 (validate.failures)."""
    from validate.runner import SAMPLES_FILE, run_samples

    cell_dir, run, done = start_cell(out, cell, engine.name, suite)
    pages = failure_pages(cell_dir, run, engine, model) if inspect_failures else None
    run_samples(samples, suite, engine, None, cell_dir / SAMPLES_FILE, done, progress, on_result=pages,
                generate_options=pages.generate_options if pages else None)
    return finish_cell(cell_dir, run, samples, suite, pages)


def start_cell(out: Path, cell: Cell, engine_name: str, suite) -> tuple[Path, dict, set[str]]:
    """cells/<cell> with its run.json; the ids of the samples it already holds (a torn last line cut off)."""
    from validate.runner import SAMPLES_FILE, read_records

    cell_dir = out / "cells" / cell.name
    cell_dir.mkdir(parents=True, exist_ok=True)
    run = {"engine": f"{engine_name}:{cell.name}", "reference": None, "shard": "0/1",
           "config": {"suite": suite.name, "policy": cell.policy.describe()}}
    atomic_write_text(cell_dir / "run.json", json.dumps(run, indent=2, ensure_ascii=False))
    return cell_dir, run, {r["id"] for r in read_records(cell_dir / SAMPLES_FILE, repair=True)}


def failure_pages(cell_dir: Path, run: dict, engine, model: str):
    """The runner's hook writing the inspect page of each failed sample (validate.failures.FailurePages)."""
    from validate.failures import FailurePages

    return FailurePages(cell_dir, engine, model, run["engine"])


def finish_cell(cell_dir: Path, run: dict, samples, suite, pages=None) -> list[dict]:
    """The cell's records of these samples (and the inspect pages a resumed run lacks), and its report."""
    from validate.report import write_report
    from validate.runner import SAMPLES_FILE, read_records, record_ids

    wanted = {rid for s in samples for rid in record_ids(s)}
    records = [r for r in read_records(cell_dir / SAMPLES_FILE) if r["id"] in wanted]
    if pages is not None:
        pages.fill_missing(samples, records)
    write_report(cell_dir, records, suite.name, run)
    return records


def write_sweep(out: Path, config: dict, rows: list[dict], suite: str, complete: bool) -> dict:
    """sweep.json and report.md (and the plots once every cell is done); rewritten after every cell."""
    from validate.sweep_report import markdown, plots

    summary = {"complete": complete, **config, "cells": with_deltas(rows)}
    if complete and rows:
        summary["plots"] = plots(out, summary, suite)
    atomic_write_text(out / "sweep.json", json.dumps(summary, indent=2, ensure_ascii=False))
    atomic_write_text(out / "report.md", markdown(summary))
    return summary
