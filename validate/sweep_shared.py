"""The cells of a sweep that share one prefill per sample: StreamingLLM, H2O, SnapKV, PyramidKV and ChunkKV at every
budget select after the full prefill, from its K/V and the observation scores they rank by (the "observation"
group: methods.shared_prefill), and KVzip's reconstruction scores do not depend on its budget (a group per scoring
setting: methods.kvzip.KVzipScoring); so a sample is prefilled once for all of a group's cells and each cell only
selects and decodes (`KVPolicy.prefill_group`).

The cells are the same validation runs as when each runs alone (`validate.sweep.run_cell`): cells/<cell>/ with its
run.json, a samples.jsonl line per finished sample (fsynced) and its report, and each record equal to the one the
cell's own engine writes, its timing aside. A cell's `engine_seconds` is its selection and decode plus an equal
share of the prefill among the cells it served. Resuming prefills a sample again only for the cells that lack it.
"""

from __future__ import annotations

import time
from contextlib import ExitStack
from pathlib import Path

from methods import make_policy
from validate.sweep import Cell, failure_pages, finish_cell, start_cell

ENGINE_DIR = "shared-prefill"  # under OUT/engines: the observation group's engine (--engine-backend onnx)


def engine_dir(group: str) -> str:
    """The group's engine directory under OUT/engines: FullKV with the capture graph for the observation group,
    KVzip (at the first cell's budget) with its scoring capture for a KVzip group."""
    return ENGINE_DIR if group == "observation" else f"{ENGINE_DIR}-{group}"


def sweep_steps(cells: list[Cell], shared: bool) -> list[tuple[str | None, list[Cell]]]:
    """The sweep's steps as (group, cells), in cell order: a group's cells (`prefill_group`) in one step where the
    first of them stands, every other cell alone (group None); with `shared` False, every cell alone."""
    steps: list[tuple[str | None, list[Cell]]] = []
    members: dict[str, list[Cell]] = {}
    for cell in cells:
        group = cell.policy.prefill_group if shared else None
        if group is None:
            steps.append((None, [cell]))
        elif group in members:
            members[group].append(cell)
        else:
            members[group] = [cell]
            steps.append((group, members[group]))
    return steps


def open_shared_runner(out: Path, cells: list[Cell], loaded, backend: str, dtype: str, max_input_len: int):
    """What runs one group's cells: the PyTorch reference (one model for all of them), or the onnxruntime engine of
    the group's shared prefill (built into engines/<engine_dir> once) with each cell's selection graph."""
    if backend == "reference":
        from engines.hf_model import torch_dtype
        from engines.reference import ReferenceEngine

        return ReferenceEngine(loaded, make_policy("full"), torch_dtype(dtype))
    from engines.ort_engine import OrtEngine
    from engines.ort_shared import OrtSharedPrefill
    from exporter.onnx.export import build_onnx_engine

    policies = [c.policy for c in cells]
    first = policies[0]
    path = out / "engines" / engine_dir(first.prefill_group)
    if not (path / "pkv-engine.json").is_file():  # a build is staged and renamed: present means complete
        build_onnx_engine(loaded, first.shared_engine_policy(), path, dtype=dtype, max_input_len=max_input_len,
                          shared_prefill=first.shared_capture(policies))
    return OrtSharedPrefill(OrtEngine(path), policies)


class CellEngine:
    """One cell of a shared prefill seen as an engine, for what reads a cell's engine (`--inspect-failures`'s pages,
    validate.failures): the runner's model, tokenizer and dtype with the cell's policy; `generate` of one prompt
    prefills it for this cell alone (a resumed run's missing pages)."""

    reports_kept_indices = True

    def __init__(self, runner, policy):
        engine = getattr(runner, "engine", runner)  # the onnxruntime runner wraps its OrtEngine
        self.runner, self.policy, self.name = runner, policy, runner.name
        self.records_scores = getattr(runner, "records_scores", False)
        self.tokenizer, self.spec = engine.tokenizer, engine.spec
        for name in ("manifest", "dtype", "loaded"):  # what validate.inspection reads of a built engine / reference
            if hasattr(engine, name):
                setattr(self, name, getattr(engine, name))

    def generate(self, prompts: list[list[int]], max_new_tokens: int = 32, **options):
        (ids,) = prompts
        shared = self.runner.shared_prefill(ids, [self.policy], max_new_tokens)
        return self.runner.generate_shared(shared, self.policy, max_new_tokens, **options)


def run_shared_cells(out: Path, cells: list[Cell], runner, samples, suite, progress=None,
                     inspect_failures: bool = False, model: str = "") -> dict[str, list[dict]]:
    """Every sample that some cell lacks: one prefill, then each such cell's selection and decode, its record
    appended to cells/<cell>/samples.jsonl. Returns each cell's records of these samples. `inspect_failures`: each
    cell's inspect page of a failed sample, as `validate.sweep.run_cell` writes it."""
    from validate.runner import SAMPLES_FILE, append_record, sample_record

    started = {c.name: start_cell(out, c, runner.name, suite) for c in cells}
    pages = {c.name: failure_pages(started[c.name][0], started[c.name][1], CellEngine(runner, c.policy), model)
             for c in cells} if inspect_failures else {}
    todo = [s for s in samples if any(s.id not in started[c.name][2] for c in cells)]
    with ExitStack() as stack:
        files = {name: stack.enter_context((cell_dir / SAMPLES_FILE).open("a", encoding="utf-8"))
                 for name, (cell_dir, _, _) in started.items()}
        for k, sample in enumerate(todo):
            if "questions" in sample.meta:
                raise ValueError("a multi-query sample cannot share a prefill")  # sweeps ask one question per sample
            waiting = [c for c in cells if sample.id not in started[c.name][2]]
            shared = runner.shared_prefill(sample.ids, [c.policy for c in waiting], sample.max_new_tokens)
            share = shared.seconds / len(waiting)
            for cell in waiting:
                hook = pages.get(cell.name)
                t0 = time.perf_counter()
                got = runner.generate_shared(shared, cell.policy, sample.max_new_tokens, return_indices=True,
                                             **(hook.generate_options if hook else {}))
                record = sample_record(sample, suite, got, share + time.perf_counter() - t0)
                if hook is not None:
                    hook(sample, record, got)
                append_record(files[cell.name], record)
            del shared  # the prompt's K/V and scores: freed before the next prompt's prefill
            if progress:
                progress(k + 1, len(todo))
    return {name: finish_cell(cell_dir, run, samples, suite, pages.get(name))
            for name, (cell_dir, run, _) in started.items()}
