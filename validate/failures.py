"""`--inspect-failures`: an inspect page for every NIAH sample the engine got wrong, the needle marked.

A sample failed when its engine score is below the reference's, or below 1 without a reference. Its page is built
from the generation the run already made (the engine's kept indices: no second prefill) and goes to
RUN/inspect/<sample>/ (index.html, kept.png, kept.json); a resumed run makes the pages its earlier part lacks. The
reports link every page that exists (`pages`), so shard runs merge by copying their inspect/ directories.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from pkv_core.errors import UserInputError
from validate.inspection import PAGE, check_engine, data_from_result, write_inspect_dir

INSPECT_DIR = "inspect"


def check_suite(suite: str, multi_query: bool) -> None:
    """--inspect-failures is for NIAH samples, whose needle the page marks."""
    if suite != "niah" or multi_query:
        raise UserInputError("--inspect-failures works on NIAH runs (--suite niah, without --multi-query): the page "
                             "marks each sample's needle")


def failed(record: dict[str, Any]) -> bool:
    """Below the reference's score, or below 1 without a reference."""
    target = record.get("reference_score", 1.0)
    return record["engine_score"] < target


def page_path(sample_id: str) -> str:
    """The page of a sample, relative to the run directory."""
    return f"{INSPECT_DIR}/{re.sub(r'[^A-Za-z0-9._-]', '_', sample_id)}/{PAGE}"


class FailurePages:
    """The runner's hook (`run_samples(..., on_result=...)`): a page for each failed sample as it finishes."""

    def __init__(self, run_dir: Path, engine, model: str, engine_name: str):
        check_engine(engine, engine_name)  # before the first sample, not after it
        self.run_dir, self.engine, self.model, self.engine_name = Path(run_dir), engine, model, engine_name
        # what the runner adds to each generation: the reference's scores, so a page can say how far below the cut
        # the needle scored (the tokens and kept sets do not change)
        self.generate_options = {"return_scores": True} if getattr(engine, "records_scores", False) else {}

    def __call__(self, sample, record: dict[str, Any], result) -> None:
        if failed(record):
            self.write(sample, record, result)

    def write(self, sample, record: dict[str, Any], result) -> Path:
        data = data_from_result(self.engine, result, sample.ids, self.model, self.engine_name,
                                sample.meta.get("needle"))
        notes = {"sample": sample.id, "expected answer": str(record.get("answer", "")),
                 "engine score": str(record["engine_score"])}
        if "reference_score" in record:
            notes |= {"reference score": str(record["reference_score"]),
                      "reference answer": str(record.get("reference_answer", ""))}
        data.notes = notes | data.notes
        data.answer = record.get("engine_answer", data.answer)  # the run's answer (a refill generates one token)
        out = self.run_dir / page_path(sample.id)
        out.parent.mkdir(parents=True, exist_ok=True)
        write_inspect_dir(out.parent, data)
        return out

    def fill_missing(self, samples, records: list[dict[str, Any]]) -> int:
        """Pages for failed records of an earlier (resumed) part of the run: their prefill again, once each."""
        by_id = {s.id: s for s in samples}
        todo = [r for r in records
                if failed(r) and r["id"] in by_id and not (self.run_dir / page_path(r["id"])).is_file()]
        for record in todo:
            sample = by_id[record["id"]]
            result = self.engine.generate([sample.ids], 1, return_indices=True, **self.generate_options)
            self.write(sample, record, result)
        return len(todo)


def pages(run_dir: Path, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The failed records that have a page: id, group, scores and the page's path relative to `run_dir`."""
    out = []
    for r in records:
        path = page_path(r["id"])
        if failed(r) and (Path(run_dir) / path).is_file():
            out.append({"id": r["id"], "group": r["group"], "engine_score": r["engine_score"],
                        "reference_score": r.get("reference_score"), "page": path})
    return out
