"""The texts of RULER's synthetic tasks, from RULER's published templates (validate.ruler sizes and scores them).

Templates, answer prefixes and task parameters are those of NVIDIA/RULER (`scripts/data/synthetic/constants.py`,
`scripts/synthetic.yaml`), Copyright (c) 2024 NVIDIA CORPORATION, Apache License 2.0; the generators below are
written here after RULER's `niah.py`, `variable_tracking.py`, `common_words_extraction.py` and
`freq_words_extraction.py` (same draws, same layouts), with these differences:

- the haystack of the NIAH variants and of variable tracking is the NIAH suite's (generated prose or --haystack
  DIR) where RULER reads Paul Graham's essays (its `essay` haystack) or, for variable tracking, repeats five
  fixed sentences (its `noise` haystack); needles and chain statements go between whole sentences at depths drawn
  from RULER's 40 depths, as RULER does with its essay haystack;
- words come from `data/ruler_words.txt` (a subset of the wonderwords lists RULER draws from, MIT), random
  numbers, UUIDs and coded words from the sample's own `random.Random`, so every sample is a pure function of
  (seed, task, length, index, size) and nothing is downloaded;
- keys and values of a sample are distinct (RULER draws them independently), so every answer is unique.

Each generator takes the sample's rng and a size (haystack sentences, or words for cwe / fwe) and returns a
`TaskText`: the user message (`content`, what RULER's `base` template puts before the answer prefix), the
answer prefix (after the chat template's assistant header, as RULER appends it) and the reference strings.
"""

from __future__ import annotations

import math
import random
import re
import string
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path

NIAH_TEMPLATE = ("Some special magic {type_needle_v} are hidden within the following text. Make sure to memorize it. "
                 "I will quiz you about the {type_needle_v} afterwards.\n{context}\nWhat are all the special magic "
                 "{type_needle_v} for {query} mentioned in the provided text?")
NIAH_PREFIX = " The special magic {type_needle_v} for {query} mentioned in the provided text are"
NIAH_NEEDLE = "One of the special magic {type_needle_v} for {key} is: {value}."
VT_TEMPLATE = ("Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n{context}\n"
               "Question: Find all variables that are assigned the value {query} in the text above.")
VT_PREFIX = (" Answer: According to the chain(s) of variable assignment in the text above, {num_v} variables are "
             "assigned the value {query}, they are: ")
CWE_TEMPLATE = ("Below is a numbered list of words. In these words, some appear more often than others. Memorize the "
                "ones that appear most often.\n{context}\nQuestion: What are the 10 most common words in the above "
                "list?")
CWE_PREFIX = " Answer: The top 10 words that appear most often in the list are:"
FWE_TEMPLATE = ("Read the following coded text and track the frequency of each coded word. Find the three most "
                "frequently appeared coded words. {context}\nQuestion: Do not provide any explanation. Please ignore "
                "the dots '....'. What are the three most frequently appeared words in the above coded text?")
FWE_PREFIX = " Answer: According to the coded text above, the three most frequently appeared words are:"

DEPTHS = tuple(round(100 * i / 39) for i in range(40))  # RULER's np.round(np.linspace(0, 100, 40))
ZETA_2 = math.pi ** 2 / 6  # the Riemann zeta function at fwe's alpha = 2


@dataclass(frozen=True)
class TaskText:
    content: str  # the user message
    answer_prefix: str  # what the assistant's turn starts with
    answers: list[str]  # every one must appear in the prediction (string_match_all)


@cache
def word_lists() -> dict[str, tuple[str, ...]]:
    """{'adjectives': ..., 'nouns': ..., 'verbs': ...} from the shipped data/ruler_words.txt."""
    lists: dict[str, list[str]] = {}
    current: list[str] = []
    for line in (Path(__file__).parent / "data" / "ruler_words.txt").read_text(encoding="utf-8").splitlines():
        if line.startswith("#") or not line.strip():
            continue
        if line.startswith("["):
            current = lists.setdefault(line.strip("[]"), [])
        else:
            current += line.split()
    return {name: tuple(words) for name, words in lists.items()}


@cache
def cwe_pool() -> tuple[str, ...]:
    """cwe's words: nouns, adjectives and verbs, sorted and deduplicated (as RULER's `words`)."""
    return tuple(sorted(set().union(*word_lists().values())))


def _distinct(draw, count: int) -> list[str]:
    out: list[str] = []
    while len(out) < count:
        item = draw()
        if item not in out:
            out.append(item)
    return out


def _insert(sentences: Sequence[str], items: Sequence[str], rng: random.Random) -> str:
    """`items` (in order) between whole sentences, at RULER's depths drawn without replacement (int(n * depth))."""
    at = sorted(int(len(sentences) * depth / 100) for depth in rng.sample(DEPTHS, len(items)))
    pieces, last = [], 0
    for where, item in zip(at, items, strict=True):
        pieces += [*sentences[last:where], item]
        last = where
    return " ".join(pieces + list(sentences[last:]))


def niah(rng: random.Random, sentences: Sequence[str], keys: int, values: int, queries: int) -> TaskText:
    """RULER's NIAH with words as keys and 7-digit numbers as values (`type_needle_k: words`, `_v: numbers`):
    `keys` keys with `values` values each, one needle per (key, value), `queries` keys asked."""
    adjectives, nouns = word_lists()["adjectives"], word_lists()["nouns"]
    keys = max(keys, queries)
    key_words = _distinct(lambda: f"{rng.choice(adjectives)}-{rng.choice(nouns)}", keys)
    numbers = _distinct(lambda: str(rng.randint(10 ** 6, 10 ** 7 - 1)), keys * values)
    per_key = [numbers[i * values:(i + 1) * values] for i in range(keys)]
    needles = [NIAH_NEEDLE.format(type_needle_v="numbers", key=k, value=v)
               for k, vs in zip(key_words, per_key, strict=True) for v in vs]
    rng.shuffle(needles)
    asked = rng.sample(range(keys), queries)
    context = _insert(sentences, needles, rng)
    query = key_words[asked[0]] if queries == 1 else \
        ", ".join(key_words[i] for i in asked[:-1]) + ", and " + key_words[asked[-1]]
    template, prefix, kind = NIAH_TEMPLATE, NIAH_PREFIX, "numbers"
    if queries * values == 1:  # one answer: RULER's singular wording
        template, prefix, kind = _singular(template), _singular(prefix), "number"
    return TaskText(template.format(type_needle_v=kind, context=context, query=query),
                    prefix.format(type_needle_v=kind, query=query), [v for i in asked for v in per_key[i]])


def _singular(text: str) -> str:
    return text.replace("Some", "A").replace("are all", "is").replace("are", "is").replace("answers", "answer")


def _var_names(rng: random.Random, count: int, letters: int) -> list[str]:
    names: list[str] = []
    while len(names) < count:
        name = "".join(rng.choices(string.ascii_uppercase, k=letters))
        if name != "VAR" and name not in names:  # "VAR" would be renamed with the names of an example
            names.append(name)
    return names


def vt_chain(rng: random.Random, sentences: Sequence[str], hops: int, names: list[str], value: str,
             ) -> tuple[str, str]:
    """(the template's text, the answer prefix) of one variable chain names[0] = value, names[i+1] = names[i]."""
    chain = [f"VAR {names[0]} = {value}."] + [f"VAR {names[j + 1]} = VAR {names[j]}." for j in range(hops)]
    context = _insert(sentences, chain, rng)
    return (VT_TEMPLATE.format(context=context, query=value),
            VT_PREFIX.format(num_v=hops + 1, query=value))


def vt_example(rng: random.Random, sentences: Sequence[str], hops: int) -> str:
    """RULER's in-context example of variable tracking: a chain of 3-letter names from 12345, asked and answered
    (its names and value are redrawn for every sample by `vt`)."""
    names = _var_names(rng, hops + 1, 3)
    text, prefix = vt_chain(rng, sentences, hops, names, "12345")
    return text + prefix + " " + " ".join(names) + "\n"


def vt(rng: random.Random, sentences: Sequence[str], hops: int, example: str) -> TaskText:
    """Variable tracking, one chain of `hops` hops (RULER's `vt`: num_chains 1, num_hops 4), after the in-context
    example `example` with fresh names and another value (RULER's randomize_icl)."""
    names = _var_names(rng, hops + 1, 5)
    value = str(rng.randint(10000, 99998))  # np.random.randint(10000, 99999): the high end excluded
    if example:
        fresh = dict(zip(example.split()[-(hops + 1):], _var_names(rng, hops + 1, 3), strict=True))
        example = re.sub(r"\b[A-Z]{3}\b", lambda m: fresh.get(m.group(), m.group()), example)
        other = _distinct(lambda: str(rng.randint(10000, 99998)), 2)
        example = example.replace("12345", other[0] if other[0] != value else other[1]) + "\n"
    text, prefix = vt_chain(rng, sentences, hops, names, value)
    return TaskText(example + text, prefix, names)


def _numbered(words: Sequence[str]) -> str:
    return " ".join(f"{i + 1}. {word}" for i, word in enumerate(words))


def _word_list(rng: random.Random, count: int, common_repeats: int, other_repeats: int, common: int,
               ) -> tuple[str, list[str]]:
    pool = cwe_pool()
    words = rng.sample(pool, len(pool))[:count]  # the first `count` of one order: more words only add to the list
    listed = words[:common] * common_repeats + words[common:] * other_repeats
    rng.shuffle(listed)
    return _numbered(listed), words[:common]


def cwe(rng: random.Random, count: int, long: bool, common: int = 10) -> TaskText:
    """Common words extraction over `count` distinct words, after one solved example (RULER's cwe: freq_cw 30,
    freq_ucw 3, num_cw 10 from 4096 tokens on; 6 / 1 and a smaller example below, as RULER does)."""
    shot = (40, 10, 3) if long else (20, 3, 1)
    repeats = (30, 3) if long else (6, 1)
    shot_text, shot_answer = _word_list(rng, shot[0], shot[1], shot[2], common)
    text, answer = _word_list(rng, count, repeats[0], repeats[1], common)
    example = CWE_TEMPLATE.format(context=shot_text) + CWE_PREFIX + " " + _numbered(shot_answer)
    return TaskText(example + "\n" + CWE_TEMPLATE.format(context=text), CWE_PREFIX, answer)


def fwe_vocabulary(rng: random.Random, size: int, letters: int = 6) -> list[str]:
    """`size` distinct coded words in random order; the first is '...', the noise every text is mostly made of."""
    vocab = sorted(_distinct(lambda: "".join(rng.choices(string.ascii_lowercase, k=letters)), size))
    rng.shuffle(vocab)
    return ["..."] + vocab[1:]


def fwe_counts(count: int, size: int) -> list[int]:
    """Occurrences of the k-th word: int(count * k^-2 / zeta(2)), k = 1..size (RULER's fwe, alpha 2)."""
    return [int(count * k ** -2.0 / ZETA_2) for k in range(1, size + 1)]


def fwe(rng: random.Random, count: int, vocab: list[str]) -> TaskText:
    """Frequent words extraction: a text of about `count` coded words drawn from Zipf's law; the answer is the
    2nd to 4th most frequent (the 1st is the noise '...')."""
    words = [w for w, n in zip(vocab, fwe_counts(count, len(vocab)), strict=True) for _ in range(n)]
    rng.shuffle(words)
    return TaskText(FWE_TEMPLATE.format(context=" ".join(words)), FWE_PREFIX, vocab[1:4])
