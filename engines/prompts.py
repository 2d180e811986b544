"""Synthetic prompts of an exact token length, for comparisons and benchmarks (offline, deterministic)."""

from __future__ import annotations

import random

WORDS = (
    "the of and to in a is that for it as was with be by on not he this are or his from at which but have an they "
    "you were her she there been one all we their has would when if so no will more out up into do any your what "
    "time about than can only other new some could these two may first then years our over most like people also "
    "made after many before must through back where much way well down should because each just those how too "
    "little state good very make world still own see men work long get here between both life being under never "
    "day same another know while last might great old year off come since against go came right used take three "
    "river garden window music letter morning city mountain station paper story island winter engine market"
).split()


def filler_text(n_words: int, seed: int = 0) -> str:
    rng = random.Random(seed)
    sentences, words = [], 0
    while words < n_words:
        length = rng.randint(6, 18)
        s = " ".join(rng.choice(WORDS) for _ in range(length))
        sentences.append(s[0].upper() + s[1:] + ".")
        words += length
    return " ".join(sentences)


def synthetic_prompt_ids(tokenizer, n_tokens: int, seed: int = 0) -> list[int]:
    """Exactly `n_tokens` ids (BOS first when the tokenizer adds one) of filler text."""
    if n_tokens < 1:
        raise ValueError("n_tokens must be positive")
    n_words = max(8, n_tokens)
    while True:
        ids = tokenizer(filler_text(n_words, seed))["input_ids"]
        if len(ids) >= n_tokens:
            return ids[:n_tokens]
        n_words *= 2
