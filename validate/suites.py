"""Validation suites: turn NIAH grids, LongBench rows and RULER tasks into engine-ready samples, and score answers.

A suite yields `ValidationSample`s (token ids already built, so every engine sees exactly the same input) and
scores a prediction with the suite's metric. Suites are registered by name in `SUITES`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pkv_core.errors import UserInputError


@dataclass
class ValidationSample:
    id: str
    group: str  # LongBench dataset, the NIAH cell "L{length}-D{depth}", or the RULER "{task}/L{length}"
    ids: list[int]
    max_new_tokens: int
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class NiahSuite:
    """Needle-in-a-Haystack over a grid of context lengths x depth percents."""

    lengths: list[int] | None = None
    depths: list[float] | None = None
    haystack: Path | None = None
    needle: str | None = None
    question: str | None = None
    answer: str | None = None
    max_new_tokens: int | None = None  # None: sized for the answers (`answer_room`)
    chat: bool = True
    seed: int = 0
    multi_query: bool = False  # one context per length with a needle at every depth, each asked (validate.multiquery)
    name: str = "niah"

    def samples(self, tokenizer, max_input_len: int, limit: int | None, skip_bad: bool = False):
        from validate.niah import DEFAULT_NEEDLE, Needle, answer_room, default_grid, niah_samples

        lengths, depths = default_grid(max_input_len)
        lengths, depths = self.lengths or lengths, self.depths or depths
        too_long = [n for n in lengths if n > max_input_len]
        if too_long:
            raise UserInputError(f"context lengths {too_long} exceed the engine's max input length {max_input_len}")
        given = (self.needle, self.question, self.answer)
        if any(given) and not all(given):
            raise UserInputError("--needle, --question and --answer go together")
        if self.multi_query:
            return self._multi_query_samples(tokenizer, lengths, depths, limit, any(given)), []
        needle = Needle(*given) if all(given) else DEFAULT_NEEDLE
        room = self.max_new_tokens or answer_room(tokenizer, [needle.answer])
        out = []
        for s in niah_samples(tokenizer, lengths, depths, needle, self.haystack, self.chat, seed=self.seed):
            out.append(ValidationSample(s.id, f"L{s.context_len}-D{s.depth_percent:g}", s.ids, room,
                                        {"context_len": s.context_len, "depth_percent": s.depth_percent,
                                         "answer": s.answer, "needle": needle.needle}))
        return out[:limit] if limit else out, []

    def _multi_query_samples(self, tokenizer, lengths, depths, limit, custom_needle: bool) -> list[ValidationSample]:
        from validate.niah import MULTI_NEEDLES, answer_room, multi_needle_contexts

        if custom_needle:
            raise UserInputError("--multi-query uses its own needles; it does not take --needle/--question/--answer")
        if len(depths) > len(MULTI_NEEDLES):
            raise UserInputError(f"--multi-query puts one needle per depth: at most {len(MULTI_NEEDLES)} depths")
        out = []
        room = self.max_new_tokens or answer_room(tokenizer, [needle.answer for needle in MULTI_NEEDLES])
        for n, ctx in multi_needle_contexts(tokenizer, lengths, depths, self.haystack, self.chat, self.seed):
            sid = f"niah-mq-L{n}"
            queries = [{"id": f"{sid}-D{d:g}", "group": f"L{n}-D{d:g}",
                        "fields": {"context_len": n, "depth_percent": d, "answer": needle.answer}}
                       for d, needle in zip(ctx.depths, ctx.needles, strict=True)]
            out.append(ValidationSample(sid, f"L{n}", ctx.context_ids, room,
                                        {"context_len": n, "questions": ctx.question_ids, "queries": queries}))
        return out[:limit] if limit else out

    def score_query(self, sample: ValidationSample, i: int, prediction: str) -> float:
        """Question i of a multi-query sample (validate.multiquery)."""
        return self.score_text(prediction, sample.meta["queries"][i]["fields"]["answer"])

    def score(self, sample: ValidationSample, prediction: str) -> float:
        return self.score_text(prediction, sample.meta["answer"])

    def score_text(self, prediction: str, answer: str) -> float:
        from validate.niah import score_answer

        return score_answer(prediction, answer)["recall"]


@dataclass
class LongBenchSuite:
    """LongBench v1: official JSONL rows, official prompts and output lengths, official metrics."""

    data: Path | None = None
    hub: bool = False
    datasets: list[str] | None = None
    config_dir: Path | None = None
    chat: bool = True
    multi_query: bool = False  # samples sharing a context asked after one compression (validate.multiquery)
    name: str = "longbench"

    def samples(self, tokenizer, max_input_len: int, limit: int | None, skip_bad: bool = False):
        from validate.longbench import load_dir, load_hub, load_prompt_config, max_new_tokens, prepare_prompt

        if self.hub:
            if not self.datasets:
                raise UserInputError("--hub needs --datasets (e.g. --datasets hotpotqa,multi_news)")
            rows, errors = load_hub(self.datasets, skip_bad=skip_bad)
        elif self.data is not None:
            rows, errors = load_dir(self.data, self.datasets, skip_bad=skip_bad)
        else:
            raise UserInputError("LongBench needs --data DIR (official JSONL files) or --hub")
        prompts, maxlens = load_prompt_config(self.config_dir)
        per_dataset: dict[str, int] = {}
        kept = []
        for row in rows:
            if limit and per_dataset.get(row.dataset, 0) >= limit:
                continue
            if row.dataset not in prompts:
                raise UserInputError(f"the prompt config has no template for dataset {row.dataset!r}")
            per_dataset[row.dataset] = per_dataset.get(row.dataset, 0) + 1
            kept.append(row)

        def prompt_ids(row) -> list[int]:
            budget = max_input_len
            ids = prepare_prompt(row, tokenizer, prompts[row.dataset], budget, self.chat)
            while len(ids) > max_input_len:  # the chat template and BOS come on top of the content budget
                budget -= len(ids) - max_input_len
                ids = prepare_prompt(row, tokenizer, prompts[row.dataset], budget, self.chat)
            return ids

        if self.multi_query:
            return self._multi_query_samples(kept, prompt_ids, maxlens), errors
        out = []
        for row in kept:
            out.append(ValidationSample(f"{row.dataset}/{row.id}", row.dataset, prompt_ids(row),
                                        max_new_tokens(row.dataset, maxlens),
                                        {"answers": row.answers, "all_classes": row.all_classes,
                                         "length": row.length}))
        return out, errors

    def _multi_query_samples(self, rows, prompt_ids, maxlens) -> list[ValidationSample]:
        """Rows that share a context (same dataset, same context text) become one multi-query sample.

        The context part is the longest token prefix that every question's official prompt shares with two probe
        prompts (the same context, inputs "A" and "B"), so the context plus each question's tokens is exactly that
        question's official prompt: the recompress score is the ordinary validate score. Where the middle
        truncation cuts the prompts at different places, the shared part ends at the first cut."""
        import dataclasses

        from validate.longbench import max_new_tokens

        groups: dict[tuple[str, str], list] = {}
        for row in rows:
            groups.setdefault((row.dataset, row.context), []).append(row)
        out = []
        for (dataset, _), members in groups.items():
            full = [prompt_ids(row) for row in members]
            probes = [prompt_ids(dataclasses.replace(members[0], input=x)) for x in ("A", "B")]
            shared = _common_prefix(full + probes)
            if shared == 0:
                raise UserInputError(f"{dataset}: the prompt template puts the question before the context; "
                                     "--multi-query needs the context first")
            queries = [{"id": f"{dataset}/{row.id}", "group": dataset, "answers": row.answers,
                        "all_classes": row.all_classes, "fields": {"length": row.length}} for row in members]
            out.append(ValidationSample(f"{dataset}/ctx-{members[0].id}", dataset, full[0][:shared],
                                        max_new_tokens(dataset, maxlens),
                                        {"questions": [ids[shared:] for ids in full], "queries": queries}))
        return out

    def score(self, sample: ValidationSample, prediction: str) -> float:
        from validate.metrics import score_sample

        return score_sample(sample.group, prediction, sample.meta["answers"], sample.meta["all_classes"])

    def score_query(self, sample: ValidationSample, i: int, prediction: str) -> float:
        """Question i of a multi-query sample (validate.multiquery)."""
        from validate.metrics import score_sample

        query = sample.meta["queries"][i]
        return score_sample(sample.group, prediction, query["answers"], query["all_classes"])


@dataclass
class RulerSuite:
    """RULER's synthetic tasks (validate.ruler): every task at every length, `limit` samples each."""

    lengths: list[int] | None = None
    tasks: list[str] | None = None
    haystack: Path | None = None
    max_new_tokens: int | None = None  # None: each task's own (RULER's tokens_to_generate)
    chat: bool = True
    seed: int = 42  # RULER's default random seed
    name: str = "ruler"

    def samples(self, tokenizer, max_input_len: int, limit: int | None, skip_bad: bool = False):
        from validate.niah import default_grid
        from validate.ruler import DEFAULT_SAMPLES, TASKS, group_name, ruler_samples

        lengths = self.lengths or default_grid(max_input_len)[0]
        too_long = [n for n in lengths if n > max_input_len]
        if too_long:
            raise UserInputError(f"context lengths {too_long} exceed the engine's max input length {max_input_len}")
        out = []
        for s in ruler_samples(tokenizer, lengths, self.tasks or list(TASKS), limit or DEFAULT_SAMPLES,
                               self.haystack, self.chat, self.seed, self.max_new_tokens):
            out.append(ValidationSample(s.id, group_name(s.task, s.length), s.ids, s.max_new_tokens,
                                        {"context_len": s.length, "answers": s.answers}))
        return out, []

    def score(self, sample: ValidationSample, prediction: str) -> float:
        from validate.ruler import string_match_all

        return string_match_all(prediction, sample.meta["answers"])


SUITES = {"niah": NiahSuite, "longbench": LongBenchSuite, "ruler": RulerSuite}


# The options that only some suites take (the others refuse them rather than ignore them).
SUITE_OPTIONS = {"tasks": ("ruler",), "seed": ("ruler",), "depths": ("niah",), "needle": ("niah",),
                 "question": ("niah",), "answer": ("niah",), "multi_query": ("niah", "longbench")}


def check_suite_options(suite: str, **given) -> None:
    """One line for an option given to a suite that does not take it (None / False: not given)."""
    for option, value in given.items():
        if value not in (None, False) and suite not in SUITE_OPTIONS[option]:
            takers = " or ".join(SUITE_OPTIONS[option])
            raise UserInputError(f"--{option.replace('_', '-')} is for --suite {takers}, not {suite}")


def _common_prefix(sequences: list[list[int]]) -> int:
    """Length of the longest prefix every sequence shares."""
    n = min(len(x) for x in sequences)
    for i in range(n):
        if any(x[i] != sequences[0][i] for x in sequences[1:]):
            return i
    return n


def parse_shard(text: str | None) -> tuple[int, int]:
    """'I/N' -> (I, N), 0 <= I < N; None -> (0, 1)."""
    if text is None:
        return 0, 1
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise UserInputError(f"--shard must look like I/N, e.g. 0/4 (got {text!r})") from None
    if not (n >= 1 and 0 <= i < n):
        raise UserInputError(f"--shard {text}: need 0 <= I < N")
    return i, n


def shard(samples: list[ValidationSample], index: int, count: int) -> list[ValidationSample]:
    return [s for k, s in enumerate(samples) if k % count == index]
