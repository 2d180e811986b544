"""RULER's synthetic tasks as a validation suite (`validate --suite ruler`, `sweep --suite ruler`).

RULER (Hsieh et al., 2024, "RULER: What's the Real Context Size of Your Long-Context Language Models?";
github.com/NVIDIA/RULER, Apache License 2.0, Copyright (c) 2024 NVIDIA CORPORATION) is what kvpress evaluates its
presses on. Six of its synthetic tasks, with RULER's templates, parameters, generation lengths and metric
(`validate.ruler_tasks` builds their texts and says where they differ from RULER's generators):

| task            | RULER configuration                                                   | tokens generated |
|-----------------|-----------------------------------------------------------------------|------------------|
| niah_multikey   | niah_multikey_1: 4 word keys with a 7-digit number each, 1 asked      | 128              |
| niah_multivalue | niah_multivalue: 1 word key with 4 numbers, all asked                 | 128              |
| niah_multiquery | niah_multiquery: 4 word keys with a number each, all 4 asked          | 128              |
| vt              | variable tracking: 1 chain of 4 hops, after one solved example        | 30               |
| cwe             | common words extraction: the 10 words repeated 30x among 3x (6x/1x    | 120              |
|                 | below 4096 tokens), after one solved example                           |                  |
| fwe             | frequent words extraction: Zipf (alpha 2) coded words, the top 3      | 50               |

Lengths are RULER's: a sample of length L is a prompt (template, chat header and answer prefix included) that
leaves room for the task's generation inside L tokens, with the largest haystack (sentences, or words) that does;
the size is searched per sample (RULER searches it once per task and shrinks it per sample). The prompt is the
task's text as one user turn in the model's chat template, followed by the answer prefix (RULER appends it after
the model template's assistant header); without a template (or --no-chat), the text, then the prefix, after BOS.

Every sample is deterministic per (seed, task, length, index): its draws come from `random.Random` seeded with
those; the haystack is the NIAH suite's. Scoring is RULER's `string_match_all` for all six (its
`scripts/eval/synthetic/constants.py`): the share of the references found, case-insensitively, as substrings of
the prediction (after RULER's `postprocess_pred`); a task's score is the mean times 100.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engines.chat import has_chat_template, render_user_turn
from pkv_core.errors import UserInputError
from validate import ruler_tasks as text
from validate.niah import directory_sentences, generated_sentences

DEFAULT_SAMPLES = 10  # per task and length, when --limit is not given
EXAMPLE_TOKENS = 500  # RULER's in-context example of variable tracking (and at most a quarter of the length)


@dataclass
class Setup:
    """What the samples of one (task, length) share: the haystack, the length, the vt example."""

    sentences: _Sentences
    length: int
    room: int
    example: str = ""


@dataclass(frozen=True)
class RulerTask:
    name: str
    tokens_to_generate: int
    make: Callable[[random.Random, int, Setup], text.TaskText]  # (rng, size, setup) -> the sample's text
    unit: str  # what the size counts
    min_size: int = 1
    max_size: Callable[[], int] | None = None


def _niah(keys: int, values: int, queries: int):
    return lambda rng, size, setup: text.niah(rng, setup.sentences.first(size), keys, values, queries)


def _fwe_vocab_size(setup: Setup) -> int:
    return max(5, (setup.length - setup.room) // 50)  # RULER: the length less the generation, over 50


def _fwe(rng: random.Random, size: int, setup: Setup) -> text.TaskText:
    return text.fwe(rng, size, text.fwe_vocabulary(rng, _fwe_vocab_size(setup)))


TASKS = {t.name: t for t in (
    RulerTask("niah_multikey", 128, _niah(4, 1, 1), "sentences"),
    RulerTask("niah_multivalue", 128, _niah(1, 4, 1), "sentences"),
    RulerTask("niah_multiquery", 128, _niah(4, 1, 4), "sentences"),
    RulerTask("vt", 30, lambda rng, size, setup: text.vt(rng, setup.sentences.first(size), 4, setup.example),
              "sentences"),
    RulerTask("cwe", 120, lambda rng, size, setup: text.cwe(rng, size, setup.length >= 4096), "words", 11,
              lambda: len(text.cwe_pool())),
    RulerTask("fwe", 50, _fwe, "words"),
)}


class _Sentences:
    """The haystack's sentences, pulled from its endless stream as far as a prompt has needed."""

    def __init__(self, stream):
        self._stream, self._pulled = iter(stream), []

    def first(self, n: int) -> list[str]:
        while len(self._pulled) < n:
            self._pulled.append(next(self._stream))
        return self._pulled[:n]


@dataclass
class RulerSample:
    id: str
    task: str
    length: int
    ids: list[int]  # the prompt: len(ids) + max_new_tokens <= length
    answers: list[str]
    max_new_tokens: int
    size: int  # haystack sentences (NIAH, vt) or words (cwe, fwe)


def group_name(task: str, length: int) -> str:
    return f"{task}/L{length}"


def parse_group(name: str) -> tuple[str, int] | None:
    """'cwe/L1024' -> ('cwe', 1024); None for a name that is not a RULER group."""
    match = re.fullmatch(r"(\w+)/L(\d+)", name)
    return (match[1], int(match[2])) if match and match[1] in TASKS else None


def parse_tasks(value: str | None) -> list[str]:
    """'cwe,vt' -> ['cwe', 'vt'] (every known task when None)."""
    if value is None:
        return list(TASKS)
    names = list(dict.fromkeys(t.strip() for t in value.split(",") if t.strip()))
    unknown = [n for n in names if n not in TASKS]
    if not names or unknown:
        raise UserInputError(f"--tasks: unknown {', '.join(unknown) or '(none given)'} (choose from "
                             f"{', '.join(TASKS)})")
    return names


def encode(tokenizer: Any, task_text: text.TaskText, chat: bool) -> list[int]:
    """The prompt's token ids: the user turn in the chat template then the answer prefix, or BOS, text, prefix."""
    if chat and has_chat_template(tokenizer):
        rendered = render_user_turn(tokenizer, task_text.content) + task_text.answer_prefix
        return list(tokenizer(rendered, add_special_tokens=False)["input_ids"])
    return list(tokenizer(task_text.content + task_text.answer_prefix, add_special_tokens=True)["input_ids"])


def largest_fitting(length_of: Callable[[int], int], budget: int, lo: int, hi: int | None, start: int) -> int | None:
    """The largest size in [lo, hi] whose prompt takes at most `budget` tokens (None: not even `lo`), found by
    galloping from `start` (the previous sample's size) and bisecting; prompt lengths grow with the size."""
    def fits(size: int) -> bool:
        return length_of(size) <= budget

    if not fits(lo):
        return None
    probe = max(lo + 1, start) if hi is None else min(max(lo + 1, start), hi)
    if probe <= lo:
        return lo
    step = 1
    if fits(probe):
        good = probe
        while True:  # gallop up
            if hi is not None and good >= hi:
                return good
            probe = good + step if hi is None else min(good + step, hi)
            if not fits(probe):
                bad = probe
                break
            good, step = probe, step * 2
    else:
        good, bad = lo, probe
        while bad - step > good:  # gallop down
            if fits(bad - step):
                good = bad - step
                break
            bad, step = bad - step, step * 2
    while bad - good > 1:
        mid = (good + bad) // 2
        if fits(mid):
            good = mid
        else:
            bad = mid
    return good


def ruler_samples(tokenizer: Any, lengths: Sequence[int], tasks: Sequence[str], per_task: int,
                  haystack: str | Path | None, chat: bool, seed: int,
                  max_new_tokens: int | None = None) -> list[RulerSample]:
    """`per_task` samples of every task at every length (tasks outer, then lengths, then index)."""
    sentences = _Sentences(generated_sentences(0) if haystack is None else directory_sentences(haystack))
    out: list[RulerSample] = []
    for name in tasks:
        room = max_new_tokens or TASKS[name].tokens_to_generate
        for length in dict.fromkeys(lengths):
            setup = Setup(sentences, length, room)
            if name == "vt":
                setup.example = _vt_example(tokenizer, sentences, length, seed)
            for i in range(per_task):  # each search starts at the size the previous sample found
                out.append(_sample(tokenizer, TASKS[name], setup, f"ruler:{seed}:{name}:{length}:{i}", chat,
                                   out[-1].size if out and out[-1].task == name and out[-1].length == length else 1,
                                   f"ruler-{name}-L{length}-{i}"))
    return out


def _sample(tokenizer: Any, task: RulerTask, setup: Setup, sample_seed: str, chat: bool, start: int,
            sample_id: str) -> RulerSample:
    """One sample: the largest size whose prompt leaves `setup.room` tokens of the length to the answer."""
    def length_of(size: int) -> int:
        return len(encode(tokenizer, task.make(random.Random(sample_seed), size, setup), chat))

    budget = setup.length - setup.room
    size = largest_fitting(length_of, budget, task.min_size, task.max_size() if task.max_size else None, start)
    if size is None:
        least = length_of(task.min_size) + setup.room
        raise UserInputError(f"RULER {task.name}: length {setup.length} is too small (at least {least} tokens: "
                             f"{task.min_size} {task.unit} and {setup.room} to generate)")
    if task.name == "fwe":
        _check_fwe(size, setup)
    task_text = task.make(random.Random(sample_seed), size, setup)
    return RulerSample(sample_id, task.name, setup.length, encode(tokenizer, task_text, chat), task_text.answers,
                       setup.room, size)


def _vt_example(tokenizer: Any, sentences: _Sentences, length: int, seed: int) -> str:
    """RULER's solved vt example, its haystack sized to EXAMPLE_TOKENS (at most a quarter of the length)."""
    budget = min(EXAMPLE_TOKENS, length // 4)
    example_seed = f"ruler:{seed}:vt-example:{length}"

    def length_of(size: int) -> int:
        example = text.vt_example(random.Random(example_seed), sentences.first(size), 4)
        return len(tokenizer(example, add_special_tokens=False)["input_ids"])

    size = largest_fitting(length_of, budget, 0, None, 1)
    if size is None:
        raise UserInputError(f"RULER vt: length {length} is too small for its solved example "
                             f"({length_of(0)} tokens, at most {budget})")
    return text.vt_example(random.Random(example_seed), sentences.first(size), 4)


def _check_fwe(size: int, setup: Setup) -> None:
    counts = text.fwe_counts(size, _fwe_vocab_size(setup))
    if min(counts[1:4]) <= max(counts[4:]):
        raise UserInputError(f"RULER fwe: length {setup.length} is too small for three words more frequent than the "
                             f"others ({size} words fit)")


# --- scoring: RULER's scripts/eval --------------------------------------------------------------------------------


def postprocess(prediction: str) -> str:
    """RULER's postprocess_pred: stripped, control characters turned into newlines."""
    return re.sub(r"[\x00-\x1f]", "\n", prediction.strip()).strip()


def string_match_all(prediction: str, references: Sequence[str]) -> float:
    """The share of `references` that occur in the prediction, case-insensitively (one sample, 0..1)."""
    found = postprocess(prediction).lower()
    return sum(1.0 if r.lower() in found else 0.0 for r in references) / len(references)


def task_score(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """A task's score as RULER reports it: the mean of string_match_all times 100, to two decimals."""
    scores = [string_match_all(p, r) for p, r in zip(predictions, references, strict=True)]
    return round(sum(scores) / len(scores) * 100, 2)


def task_rows(groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per task: the mean of its (task, length) groups' scores and sample counts, in TASKS order."""
    by: dict[str, list[dict]] = {}
    for g in groups:
        parsed = parse_group(g["group"])
        if parsed:
            by.setdefault(parsed[0], []).append(g)
    rows = []
    for name in (t for t in TASKS if t in by):
        mine = by[name]
        row: dict[str, Any] = {"task": name, "n": sum(g["n"] for g in mine),
                               "lengths": [parse_group(g["group"])[1] for g in mine]}
        for key in ("engine_score", "reference_score"):
            if all(g.get(key) is not None for g in mine):
                row[key] = round(sum(g[key] for g in mine) / len(mine), 2)
        if "reference_score" in row:
            row["delta"] = round(row["engine_score"] - row["reference_score"], 2)
        rows.append(row)
    return rows
