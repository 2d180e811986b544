"""Multi-query validation: one context, several questions, answered in the two ways a deployment can work.

* `recompress`: every question is appended to the context and the whole prompt is prefilled and compressed
  (the question is the observation window: the usual NIAH / LongBench setting);
* `reuse`: the context is prefilled and compressed once (`Engine.compress_context`, its own end as the window)
  and every question is answered from a copy of that cache (`Engine.answer`): what a multi-turn deployment does.

One record per question; the engine's `engine_score` is the recompress score, `engine_reuse_score` the reuse one
(the reference's likewise), so the ordinary reports and heatmaps show both.

A multi-query sample's `ids` are the shared context; `meta["questions"][i]` are question i's token ids (the
context plus them is exactly question i's whole prompt) and `meta["queries"][i]` its record: `id`, `group` and
the fields the suite scores by (`suite.score_query`) and reports.
"""

from __future__ import annotations

import time
from typing import Any

from pkv_core.errors import UserInputError
from validate.suites import ValidationSample


def question_record_ids(sample: ValidationSample) -> list[str]:
    """The record id of each question about the sample's context."""
    return [q["id"] for q in sample.meta["queries"]]


def _answers(engine, sample: ValidationSample) -> tuple[list, list, float]:
    """(recompressed results, reused results, seconds) of every question of the sample's context."""
    if not hasattr(engine, "compress_context"):
        raise UserInputError(f"multi-query validation needs an engine that can compress a context once "
                             f"(onnx or the PyTorch reference); {engine.name} cannot")
    t0 = time.perf_counter()
    questions, new = sample.meta["questions"], sample.max_new_tokens
    recompressed = [engine.generate([sample.ids + q], new, return_indices=True) for q in questions]
    cache = engine.compress_context(sample.ids, room=max(len(q) for q in questions) + new)
    reused = [engine.answer(cache, q, new) for q in questions]
    return recompressed, reused, time.perf_counter() - t0


def run_context(sample: ValidationSample, suite, engine, reference) -> list[dict[str, Any]]:
    """The records of every question about one context."""
    got, got_reuse, seconds = _answers(engine, sample)
    want = want_reuse = None
    if reference is not None:
        want, want_reuse, ref_seconds = _answers(reference, sample)
    records = []
    for i, query in enumerate(sample.meta["queries"]):
        record: dict[str, Any] = {
            "id": query["id"], "group": query["group"],
            "prompt_tokens": len(sample.ids) + len(sample.meta["questions"][i]), "context_tokens": len(sample.ids),
            **query["fields"],
            "engine_answer": got[i].text[0], "engine_score": suite.score_query(sample, i, got[i].text[0]),
            "engine_reuse_answer": got_reuse[i].text[0],
            "engine_reuse_score": suite.score_query(sample, i, got_reuse[i].text[0]),
            "engine_seconds": round(seconds / len(got), 4),
        }
        if want is not None:
            record.update({
                "reference_answer": want[i].text[0], "reference_score": suite.score_query(sample, i, want[i].text[0]),
                "reference_reuse_score": suite.score_query(sample, i, want_reuse[i].text[0]),
                "reference_seconds": round(ref_seconds / len(want), 4),
                "tokens_agree": got[i].tokens == want[i].tokens, "first_divergence": None,
                "reuse_tokens_agree": got_reuse[i].tokens == want_reuse[i].tokens,
            })
            if not record["tokens_agree"]:
                from engines.compare import first_divergence

                record["first_divergence"] = first_divergence(got[i].tokens, want[i].tokens)
        records.append(record)
    return records
