"""Run samples through an engine (and a reference), one JSONL line per finished sample, resumable.

Each line is flushed and fsynced as the sample finishes, so an interrupted run loses at most the sample in
flight; `--resume` reads the file back, drops a torn last line, and skips every id already there.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from engines.compare import first_divergence, jaccard
from pkv_core.errors import UserInputError
from validate.suites import ValidationSample

SAMPLES_FILE = "samples.jsonl"


def read_records(path: Path, repair: bool = False) -> list[dict[str, Any]]:
    """Records of a samples.jsonl; a torn last line (interrupted write) is ignored, and cut off with repair."""
    if not path.exists():
        return []
    data = path.read_bytes()
    complete = data[: data.rfind(b"\n") + 1]
    if repair and len(complete) != len(data):
        with path.open("r+b") as f:
            f.truncate(len(complete))
    records = []
    for lineno, line in enumerate(complete.splitlines(), start=1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                raise UserInputError(f"{path}:{lineno}: not a JSON record (the file was edited or corrupted)") from None
    return records


def compare_one(engine_result, reference_result) -> dict[str, Any]:
    div = first_divergence(engine_result.tokens, reference_result.tokens)
    out: dict[str, Any] = {"tokens_agree": div is None, "first_divergence": div}
    if engine_result.kept_indices is not None and reference_result.kept_indices is not None:
        out["index_agreement_per_layer"] = [
            round(jaccard(a, b), 6) if a.shape[:-1] == b.shape[:-1] else None
            for a, b in zip(engine_result.kept_indices, reference_result.kept_indices, strict=True)
        ]
    return out


def run_samples(samples: list[ValidationSample], suite, engine, reference, out_file: Path,
                done_ids: set[str], progress=None, on_result=None,
                generate_options: dict | None = None) -> list[dict[str, Any]]:
    """Run every sample not in `done_ids`; append its record to `out_file` as soon as it is finished.
    `on_result(sample, record, engine result)` sees each finished single-prompt sample before its record is
    written (validate.failures: the inspect page of a failed sample, from the kept indices the run already has);
    `generate_options` go to the engine's generate (its scores, for those pages)."""
    from validate.multiquery import run_context

    records = []
    todo = [s for s in samples if not _done(s, done_ids)]
    with out_file.open("a", encoding="utf-8") as f:
        for k, sample in enumerate(todo):
            if "questions" in sample.meta:  # a multi-query context: one record per question, written together
                for record in run_context(sample, suite, engine, reference):
                    if record["id"] not in done_ids:
                        append_record(f, record)
                        records.append(record)
                if progress:
                    progress(k + 1, len(todo))
                continue
            t0 = time.perf_counter()
            got = engine.generate([sample.ids], sample.max_new_tokens, return_indices=True, **(generate_options or {}))
            record = sample_record(sample, suite, got, time.perf_counter() - t0)
            if reference is not None:
                t1 = time.perf_counter()
                want = reference.generate([sample.ids], sample.max_new_tokens, return_indices=True)
                record.update({"reference_answer": want.text[0], "reference_score": suite.score(sample, want.text[0]),
                               "reference_seconds": round(time.perf_counter() - t1, 4), **compare_one(got, want)})
            if on_result is not None:
                on_result(sample, record, got)
            append_record(f, record)
            records.append(record)
            if progress:
                progress(k + 1, len(todo))
    return records


def sample_record(sample: ValidationSample, suite, got, seconds: float) -> dict[str, Any]:
    """The record of one sample's engine run (`got`: its GenerationResult with kept indices)."""
    record: dict[str, Any] = {
        "id": sample.id, "group": sample.group, "prompt_tokens": len(sample.ids), **_meta(sample),
        "engine_answer": got.text[0], "engine_score": suite.score(sample, got.text[0]),
        "engine_seconds": round(seconds, 4),
    }
    if got.kept_indices is not None:  # (layer, cache head, token) slots held: the cache's real size
        record["kv_slots"] = int(sum((k[0] >= 0).sum() for k in got.kept_indices))
        # what the layout spans: each layer as wide as its longest head (KVzip's heads differ)
        record["kv_slots_spanned"] = int(sum(k.shape[1] * k.shape[2] for k in got.kept_indices))
    return record


def record_ids(sample: ValidationSample) -> list[str]:
    """The ids of the records a sample produces: its own, or one per question of a multi-query context."""
    if "questions" in sample.meta:
        from validate.multiquery import question_record_ids

        return question_record_ids(sample)
    return [sample.id]


def _done(sample: ValidationSample, done_ids: set[str]) -> bool:
    return all(r in done_ids for r in record_ids(sample))


def append_record(f, record: dict[str, Any]) -> None:
    """One JSONL line, flushed and fsynced: an interrupted run loses at most the record being written."""
    f.write(json.dumps(record, ensure_ascii=False) + "\n")
    f.flush()
    os.fsync(f.fileno())


def _meta(sample: ValidationSample) -> dict[str, Any]:
    keep = ("context_len", "depth_percent", "answer", "answers", "length")
    return {k: sample.meta[k] for k in keep if k in sample.meta}
