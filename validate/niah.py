"""Needle-in-a-Haystack (NIAH): prompts of a given token length with one fact hidden at a given depth.

The haystack is either generated offline (`generated_sentences`, deterministic per seed, prose-like and free of
the default needle's words) or read from a directory of `*.txt` files (`directory_sentences`, e.g. the usual Paul
Graham essays). `build_haystack_prompt` fills the context with whole sentences and inserts the needle at the
sentence boundary closest to the requested depth; `niah_samples` builds the length x depth grid and
`score_answer` scores a model's answer against the needle's answer.

Prompt layout (plain): ``"<haystack>\\n\\nQuestion: <question> Answer in one sentence based only on the text
above.\\nAnswer:"`` tokenised with the tokenizer's special tokens (e.g. BOS). With `chat` and a tokenizer that has
a chat template, the same text *without* the trailing ``"\\nAnswer:"`` is the single user message, rendered with
``add_generation_prompt=True`` (the assistant header takes the place of "Answer:") and tokenised without adding
special tokens, since the template carries BOS itself (as in `validate.longbench.prepare_prompt`).
"""

from __future__ import annotations

import bisect
import itertools
import math
import random
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engines.chat import has_chat_template, render_user_turn
from pkv_core.errors import UserInputError
from validate.metrics import normalize_answer

ANSWER_MARGIN = 64  # tokens kept free by `default_grid` for the answer (the question is inside the context)
GRID_MULTIPLE = 16
DEFAULT_DEPTHS = (0.0, 25.0, 50.0, 75.0, 100.0)
INSTRUCTION = "Answer in one sentence based only on the text above."


@dataclass(frozen=True)
class Needle:
    """The fact hidden in the haystack, the question that asks for it and the expected answer."""

    needle: str
    question: str
    answer: str


DEFAULT_NEEDLE = Needle(
    "The best thing to do in San Francisco is eat a sandwich and sit in Dolores Park on a sunny day.",
    "What is the best thing to do in San Francisco?",
    "eat a sandwich and sit in Dolores Park on a sunny day",
)


@dataclass
class NiahPrompt:
    """A built prompt. `needle_token_start` is approximate (exact for byte-level tokenizers), for reporting."""

    ids: list[int]
    text: str
    context_len: int
    depth_percent: float
    needle_token_start: int
    actual_depth_percent: float


@dataclass
class NiahSample:
    """One cell of the NIAH grid, ready to be fed to an engine (`ids`) and scored (`answer`)."""

    id: str
    context_len: int
    depth_percent: float
    ids: list[int]
    question: str
    answer: str
    actual_depth_percent: float = 0.0
    needle_token_start: int = 0


# --- haystack sources ----------------------------------------------------------------------------------------------

# Word lists for the generated haystack. None of them contains a word of the default needle's answer or question
# subject (san, francisco, dolores, park, sandwich, sunny, day, eat, sit, best), so the needle is the only place
# the answer can come from.
# fmt: off
_SUBJECTS = (
    "the old fisherman", "a young teacher", "the mayor", "my neighbour", "the engineer", "a quiet student",
    "the farmer", "the painter", "the captain", "a travelling merchant", "the librarian", "the baker",
    "the committee", "the doctor", "a tired nurse", "the orchestra", "her grandfather", "the new clerk",
    "a curious child", "the village council", "the stationmaster", "an elderly poet", "the shepherd",
    "the carpenter", "a group of pilgrims", "the historian", "the gardener", "a retired sailor",
)
_VERBS = (  # (past, base)
    ("repaired", "repair"), ("painted", "paint"), ("described", "describe"), ("carried", "carry"),
    ("studied", "study"), ("measured", "measure"), ("discovered", "discover"), ("borrowed", "borrow"),
    ("examined", "examine"), ("built", "build"), ("sold", "sell"), ("photographed", "photograph"),
    ("cleaned", "clean"), ("ordered", "order"), ("counted", "count"), ("returned", "return"),
    ("moved", "move"), ("mended", "mend"), ("inspected", "inspect"), ("copied", "copy"),
    ("admired", "admire"), ("forgot", "forget"), ("opened", "open"), ("polished", "polish"),
)
_OBJECTS = (
    "the wooden bridge", "an old map", "the broken clock", "a long letter", "the harvest", "a small boat",
    "the stone well", "the new library", "a heavy box", "the lighthouse", "the garden wall", "a long report",
    "the train schedule", "the mountain path", "a copper kettle", "the church bells", "a pair of boots",
    "the family records", "a wool blanket", "the iron gate", "a faded photograph", "the weather vane",
    "a basket of apples", "the town ledger", "a brass telescope", "the winter coats", "a collection of stamps",
)
_PLACES = (
    "near the harbour", "in the village", "behind the station", "across the valley", "at the market",
    "beside the old mill", "in the north tower", "by the lake", "on the hill", "inside the museum",
    "along the canal", "under the bridge", "at the edge of the forest", "in the courtyard", "on the island",
    "by the river", "in the workshop", "near the border", "at the crossroads", "in the attic",
)
_TIMES = (
    "last winter", "in the early morning", "after the storm", "before the festival", "every autumn",
    "late in the evening", "during the long journey", "on a cold afternoon", "at the end of the month",
    "in the spring", "a few years ago", "before anyone woke", "after the election", "during the flood",
    "at midnight", "once the snow melted",
)
_ADJECTIVES = (
    "quiet", "ancient", "remarkable", "narrow", "crowded", "distant", "careful", "unusual", "bright", "heavy",
    "fragile", "forgotten", "famous", "modest", "curious", "patient", "enormous", "simple", "elegant", "worn",
)
_CONNECTIVES = ("Meanwhile", "Later", "Eventually", "Surprisingly", "At first", "In the end", "Afterwards", "Still")
_REMARKS = (
    "was older than anyone remembered", "had been mentioned in several letters", "needed more work than expected",
    "became the subject of a long argument", "was finally finished", "looked different from the drawings",
    "attracted a small crowd", "was recorded in the town archive", "was not as simple as it seemed",
    "changed the plans of the whole season",
)
# fmt: on


def _cap(s: str) -> str:
    return s[0].upper() + s[1:]


def _generated_sentence(rng: random.Random) -> str:
    subj, subj2 = rng.choice(_SUBJECTS), rng.choice(_SUBJECTS)
    (past, base), (past2, _) = rng.choice(_VERBS), rng.choice(_VERBS)
    obj, obj2 = rng.choice(_OBJECTS), rng.choice(_OBJECTS)
    place, time, adj = rng.choice(_PLACES), rng.choice(_TIMES), rng.choice(_ADJECTIVES)
    template = rng.randrange(8)
    if template == 0:
        s = f"{subj} {past} {obj} {place} {time}"
    elif template == 1:
        s = f"{rng.choice(_CONNECTIVES)}, {subj} {past} {obj} while {subj2} {past2} {obj2}"
    elif template == 2:
        s = f"{_cap(place)}, {subj} {past} {obj}, which everyone agreed was {adj}"
    elif template == 3:
        s = f"{subj} said that {obj} {rng.choice(_REMARKS)}"
    elif template == 4:
        s = f"nobody expected {subj} to {base} {obj} {place}"
    elif template == 5:
        s = f"{subj} and {subj2} {past} {obj} together {time}"
    elif template == 6:
        s = f"{time}, {obj} {place} {rng.choice(_REMARKS)}"
    else:
        s = f"according to {subj}, {obj} was {adj} and {rng.choice(_ADJECTIVES)}"
    return _cap(s) + "."


def generated_sentences(seed: int) -> Iterator[str]:
    """An endless, deterministic stream of English-like sentences (offline; same seed → same stream)."""
    rng = random.Random(seed)
    while True:
        yield _generated_sentence(rng)


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def split_sentences(text: str) -> list[str]:
    """Split at '.', '!' or '?' followed by whitespace; whitespace inside a sentence is squeezed to one space."""
    out = []
    for part in _SENTENCE_END.split(text):
        s = " ".join(part.split())
        if s:
            out.append(s)
    return out


def directory_sentences(path: str | Path) -> Iterator[str]:
    """Sentences of every `*.txt` file in `path` (sorted by name), cycled endlessly.

    The directory is checked (and read) immediately, so a bad path fails here rather than at the first `next()`.
    """
    directory = Path(path)
    if not directory.is_dir():
        raise UserInputError(f"{directory}: haystack directory does not exist")
    sentences: list[str] = []
    for file in sorted(p for p in directory.glob("*.txt") if p.is_file()):
        try:
            text = file.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise UserInputError(f"{file}: haystack file is not valid UTF-8") from None
        except OSError as exc:
            raise UserInputError(f"{file}: cannot read haystack file ({exc.strerror or exc})") from None
        sentences += split_sentences(text)
    if not sentences:
        raise UserInputError(f"{directory}: no non-empty *.txt file for the haystack")
    return itertools.cycle(sentences)


# --- prompt building -----------------------------------------------------------------------------------------------

_ANCHOR = "."  # sentence counts are measured after a "." so that the boundary merges like in the real haystack


def _encode(tokenizer: Any, text: str, *, add_special_tokens: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=add_special_tokens, truncation=False)["input_ids"])


def _piece_lengths(tokenizer: Any, pieces: Sequence[str]) -> list[int]:
    """Tokens each piece adds when it follows a previous sentence and a space (one batched tokeniser call)."""
    anchor = len(_encode(tokenizer, _ANCHOR, add_special_tokens=False))
    enc = tokenizer([f"{_ANCHOR} {p}" for p in pieces], add_special_tokens=False, truncation=False)["input_ids"]
    return [max(1, len(ids) - anchor) for ids in enc]


class _TokenizedSentences:
    """Sentences pulled lazily from an iterable and tokenised once each, in batches; shared between prompts."""

    def __init__(self, tokenizer: Any, sentences: Iterable[str], batch: int = 256):
        self._tokenizer, self._it, self._batch = tokenizer, iter(sentences), batch
        self.texts: list[str] = []
        self.cum: list[int] = [0]  # cum[i]: tokens of the first i sentences, each counted with its leading space
        self.exhausted = False

    def _pull(self) -> None:
        chunk = [s for s in itertools.islice(self._it, self._batch)]
        if len(chunk) < self._batch:
            self.exhausted = True
        chunk = [s.strip() for s in chunk if s and s.strip()]
        if not chunk:
            return
        self.texts += chunk
        for n in _piece_lengths(self._tokenizer, chunk):
            self.cum.append(self.cum[-1] + n)

    def count_within(self, budget: int) -> int:
        """The largest n whose first n sentences fit in `budget` tokens (stopping at the first that does not)."""
        while self.cum[-1] <= budget and not self.exhausted:
            self._pull()
        return bisect.bisect_right(self.cum, budget) - 1


def _use_chat(tokenizer: Any, chat: bool) -> bool:
    return chat and has_chat_template(tokenizer)


def _tail(needle: Needle, templated: bool) -> str:
    tail = f"\n\nQuestion: {needle.question} {INSTRUCTION}"
    return tail if templated else tail + "\nAnswer:"


def _render(tokenizer: Any, content: str, templated: bool) -> str:
    return render_user_turn(tokenizer, content) if templated else content


def _prefix_len(tokenizer: Any, templated: bool) -> int:
    """Tokens before the message content: BOS for plain prompts, BOS plus the user header for chat ones."""
    if not templated:
        return len(_encode(tokenizer, "", add_special_tokens=True))
    sentinel = "\x00NIAH-CONTENT\x00"
    rendered = _render(tokenizer, sentinel, True)
    prefix = rendered.split(sentinel, 1)[0] if sentinel in rendered else ""
    return len(_encode(tokenizer, prefix, add_special_tokens=False))


def _nearest_boundary(cum: Sequence[int], n: int, depth_percent: float) -> int:
    """The sentence boundary k in 0..n whose token offset cum[k] is closest to depth_percent of cum[n]."""
    target = depth_percent / 100.0 * cum[n]
    k = bisect.bisect_left(cum, target, 0, n + 1)
    candidates = [i for i in (k - 1, k) if 0 <= i <= n]
    return min(candidates, key=lambda i: (abs(cum[i] - target), i))


def _check_depth(depth_percent: float) -> None:
    if not (isinstance(depth_percent, (int, float)) and math.isfinite(depth_percent) and 0 <= depth_percent <= 100):
        raise UserInputError(f"needle depth must be between 0 and 100 percent, got {depth_percent!r}")


def _build(
    tokenizer: Any, source: _TokenizedSentences, context_len: int, depth_percent: float, needle: Needle, chat: bool
) -> NiahPrompt:
    _check_depth(depth_percent)
    if isinstance(context_len, bool) or not isinstance(context_len, int) or context_len < 1:
        raise UserInputError(f"NIAH context length must be a positive integer, got {context_len!r}")
    templated = _use_chat(tokenizer, chat)
    tail = _tail(needle, templated)
    fixed = len(_encode(tokenizer, _render(tokenizer, tail, templated), add_special_tokens=not templated))
    needle_len = _piece_lengths(tokenizer, [needle.needle])[0]
    if fixed + needle_len > context_len:
        raise UserInputError(
            f"NIAH context length {context_len} is too small: the needle and question alone take "
            f"{fixed + needle_len} tokens"
        )
    n = source.count_within(context_len - fixed - needle_len)
    cum = source.cum
    while True:
        k = _nearest_boundary(cum, n, depth_percent)
        pieces = source.texts[:k] + [needle.needle] + source.texts[k:n]
        text = _render(tokenizer, " ".join(pieces) + tail, templated)
        ids = _encode(tokenizer, text, add_special_tokens=not templated)
        excess = len(ids) - context_len
        if excess <= 0:
            break
        if n == 0:  # pragma: no cover - the up-front check makes this unreachable for sane tokenizers
            raise UserInputError(f"NIAH context length {context_len} is too small for the needle and question")
        # Drop trailing haystack sentences worth at least `excess` tokens, then rebuild (rarely more than once).
        n = max(0, bisect.bisect_right(cum, cum[n] - excess, 0, n + 1) - 1)
    actual = 100.0 * cum[k] / cum[n] if cum[n] else 0.0
    return NiahPrompt(
        ids=ids,
        text=text,
        context_len=context_len,
        depth_percent=float(depth_percent),
        needle_token_start=_prefix_len(tokenizer, templated) + cum[k],
        actual_depth_percent=actual,
    )


def build_haystack_prompt(
    tokenizer: Any, sentences: Iterable[str], context_len: int, depth_percent: float, needle: Needle, chat: bool
) -> NiahPrompt:
    """A prompt of at most `context_len` tokens (as fed to the model), filled with whole haystack sentences.

    Sentences are taken in order until the next one would not fit (so the prompt is short of `context_len` by
    less than one sentence plus a token or two of tokenisation slack); a finite `sentences` that runs out gives
    a shorter prompt. The needle goes in at the sentence boundary closest to `depth_percent` of the haystack's
    tokens (0: before the first sentence, 100: after the last). Each sentence is tokenised once; the assembled
    prompt is then tokenised exactly, and trailing sentences are dropped if merges across boundaries overflow.
    """
    return _build(tokenizer, _TokenizedSentences(tokenizer, sentences), context_len, depth_percent, needle, chat)


# --- several needles in one context (multi-query) -------------------------------------------------------------------

# Needles for multi-query contexts, one per depth. The first is the default; the others are in the same two forms
# (a "best thing to do" fact, a "magic number"), with answers none of the haystack's words.
MULTI_NEEDLES = (
    DEFAULT_NEEDLE,
    Needle("The magic number of Lisbon is 4817203.", "What is the magic number of Lisbon?", "4817203"),
    Needle("The best thing to do in Reykjavik is swim in a warm lagoon under the northern lights.",
           "What is the best thing to do in Reykjavik?", "swim in a warm lagoon under the northern lights"),
    Needle("The magic number of Winnipeg is 90316.", "What is the magic number of Winnipeg?", "90316"),
    Needle("The best thing to do in Kyoto is walk through the bamboo forest at dawn.",
           "What is the best thing to do in Kyoto?", "walk through the bamboo forest at dawn"),
)


@dataclass
class MultiNeedleContext:
    """One context holding several needles, and the questions about them, as token ids that continue it."""

    context_ids: list[int]
    question_ids: list[list[int]]  # question i: full prompt i = context_ids + question_ids[i]
    needles: list[Needle]
    depths: list[float]


def build_multi_needle_context(tokenizer: Any, source: _TokenizedSentences, context_len: int,
                               depths: Sequence[float], needles: Sequence[Needle], chat: bool) -> MultiNeedleContext:
    """A haystack of at most `context_len` tokens with needle i at depth i, and for each needle the tokens of its
    question, so that context + question is exactly the prompt a single-needle NIAH sample would be (the context
    can be prefilled and compressed once, then asked each question)."""
    for d in depths:
        _check_depth(d)
    if len(needles) < len(depths):
        raise UserInputError(f"{len(depths)} depths need as many needles (there are {len(needles)})")
    needles = list(needles[: len(depths)])
    templated = _use_chat(tokenizer, chat)
    tails = [_tail(n, templated) for n in needles]
    fixed = max(len(_encode(tokenizer, _render(tokenizer, t, templated), add_special_tokens=not templated))
                for t in tails)
    needle_len = sum(_piece_lengths(tokenizer, [n.needle for n in needles]))
    if fixed + needle_len > context_len:
        raise UserInputError(f"NIAH context length {context_len} is too small: {len(needles)} needles and a question "
                             f"take {fixed + needle_len} tokens")
    n = source.count_within(context_len - fixed - needle_len)
    cum = source.cum
    sentinel = "\x00CONTEXT-END\x00"
    while True:
        at = [_nearest_boundary(cum, n, d) for d in depths]
        pieces: list[str] = []
        for k in range(n + 1):
            pieces += [needle.needle for needle, where in zip(needles, at, strict=True) if where == k]
            if k < n:
                pieces.append(source.texts[k])
        body = " ".join(pieces)
        head = _render(tokenizer, body + sentinel, templated).split(sentinel, 1)[0]
        context_ids = _encode(tokenizer, head, add_special_tokens=not templated)
        prompts = [_encode(tokenizer, _render(tokenizer, body + t, templated), add_special_tokens=not templated)
                   for t in tails]
        excess = max(len(p) for p in prompts) - context_len
        if excess <= 0:
            break
        if n == 0:  # pragma: no cover - the up-front check makes this unreachable for sane tokenizers
            raise UserInputError(f"NIAH context length {context_len} is too small for the needles")
        n = max(0, bisect.bisect_right(cum, cum[n] - excess, 0, n + 1) - 1)
    for p in prompts:
        if p[: len(context_ids)] != context_ids:
            raise UserInputError("this tokenizer merges tokens across the end of the context and the question; "
                                 "multi-query NIAH needs them separable")
    return MultiNeedleContext(context_ids, [p[len(context_ids):] for p in prompts], needles, [float(d) for d in depths])


def multi_needle_contexts(tokenizer: Any, lengths: Iterable[int], depths: Sequence[float], haystack: str | Path | None,
                          chat: bool, seed: int = 0) -> list[tuple[int, MultiNeedleContext]]:
    """One context per length, with one needle of `MULTI_NEEDLES` per depth."""
    stream = generated_sentences(seed) if haystack is None else directory_sentences(haystack)
    source = _TokenizedSentences(tokenizer, stream)
    return [(n, build_multi_needle_context(tokenizer, source, n, depths, MULTI_NEEDLES, chat))
            for n in dict.fromkeys(lengths)]


# --- grid ----------------------------------------------------------------------------------------------------------


def default_grid(max_input_len: int) -> tuple[list[int], list[float]]:
    """Four context lengths geometrically spaced from min(1024, max_input_len // 8) up to max_input_len minus
    `ANSWER_MARGIN`, rounded down to multiples of 16 (deduplicated, sorted); depths 0, 25, 50, 75, 100."""
    top = (max_input_len - ANSWER_MARGIN) // GRID_MULTIPLE * GRID_MULTIPLE
    if top < GRID_MULTIPLE:
        raise UserInputError(
            f"max input length {max_input_len} is too small for NIAH (needs at least {ANSWER_MARGIN + GRID_MULTIPLE})"
        )
    low = max(GRID_MULTIPLE, min(1024, max_input_len // 8) // GRID_MULTIPLE * GRID_MULTIPLE)
    low = min(low, top)
    lengths = {low, top}
    for i in (1, 2):
        value = low * (top / low) ** (i / 3)
        lengths.add(max(GRID_MULTIPLE, int(value) // GRID_MULTIPLE * GRID_MULTIPLE))
    return sorted(lengths), list(DEFAULT_DEPTHS)


def parse_grid_list(text: str, kind: type = int) -> list:
    """Parse a comma-separated CLI list: `kind=int` for context lengths (positive), `kind=float` for depths
    (0..100). Duplicates are dropped, order kept. Bad input raises UserInputError with one line."""
    if kind is int:
        what = "context length"
    elif kind is float:
        what = "depth"
    else:
        raise ValueError(f"kind must be int or float, got {kind!r}")
    items = [item.strip() for item in str(text).split(",")]
    if not any(items):
        raise UserInputError(f"empty {what} list")
    values: list = []
    for item in items:
        if not item:
            raise UserInputError(f"invalid {what} list {text!r}: empty item")
        try:
            value = kind(item)
        except ValueError:
            expected = "an integer" if kind is int else "a number"
            raise UserInputError(f"invalid {what} {item!r}: expected {expected}") from None
        if kind is int and value <= 0:
            raise UserInputError(f"invalid {what} {item!r}: must be positive")
        if kind is float and not (math.isfinite(value) and 0 <= value <= 100):
            raise UserInputError(f"invalid {what} {item!r}: must be between 0 and 100")
        if value not in values:
            values.append(value)
    return values


def sample_id(context_len: int, depth_percent: float) -> str:
    return f"niah-L{context_len}-D{depth_percent:g}"


def niah_samples(
    tokenizer: Any,
    lengths: Iterable[int],
    depths: Iterable[float],
    needle: Needle,
    haystack: str | Path | None,
    chat: bool,
    seed: int = 0,
) -> list[NiahSample]:
    """One sample per (length, depth), lengths outer. Every sample draws its haystack from the start of the same
    sentence stream (generated from `seed`, or the `haystack` directory), so at a given length only the needle
    moves; each sentence is tokenised once for the whole grid. Duplicate lengths/depths are dropped."""
    lengths = list(dict.fromkeys(lengths))
    depths = list(dict.fromkeys(float(d) for d in depths))
    if not lengths or not depths:
        raise UserInputError("NIAH needs at least one context length and one depth")
    for d in depths:
        _check_depth(d)
    stream = generated_sentences(seed) if haystack is None else directory_sentences(haystack)
    source = _TokenizedSentences(tokenizer, stream)
    samples = []
    for length in lengths:
        for depth in depths:
            prompt = _build(tokenizer, source, length, depth, needle, chat)
            samples.append(
                NiahSample(
                    id=sample_id(length, depth),
                    context_len=length,
                    depth_percent=depth,
                    ids=prompt.ids,
                    question=needle.question,
                    answer=needle.answer,
                    actual_depth_percent=prompt.actual_depth_percent,
                    needle_token_start=prompt.needle_token_start,
                )
            )
    return samples


# --- scoring -------------------------------------------------------------------------------------------------------


def answer_room(tokenizer: Any, answers: Sequence[str], minimum: int = 32, slack: int = 16) -> int:
    """The default answer length: the longest answer's tokens plus `slack`, at least `minimum` (32 fits the
    default answer in a subword tokenizer; a byte-level one needs about 60)."""
    longest = max(len(_encode(tokenizer, " " + a, add_special_tokens=False)) for a in answers)
    return max(minimum, longest + slack)


def score_answer(prediction: str, answer: str) -> dict[str, float]:
    """`recall`: share of the normalised answer's distinct words present among the prediction's normalised words;
    `exact`: 1.0 when the normalised answer occurs in the normalised prediction on word boundaries, else 0.0."""
    norm_answer = normalize_answer(answer)
    if not norm_answer:
        raise UserInputError(f"NIAH answer {answer!r} is empty after normalisation")
    norm_pred = normalize_answer(prediction)
    answer_words = set(norm_answer.split())
    pred_words = set(norm_pred.split())
    recall = len(answer_words & pred_words) / len(answer_words)
    exact = 1.0 if f" {norm_answer} " in f" {norm_pred} " else 0.0
    return {"recall": recall, "exact": exact}
