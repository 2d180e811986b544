"""What an inspect page shows, from one prefill of one prompt: every (layer, head)'s kept prompt positions as the
engine reported them, the prompt's text token by token, the marked span, the sinks and window, and the bytes held.

Nothing here selects: the kept sets are the engine's own `kept_indices` (GenerationResult), the scores the
reference's record of what its selection ranked by. `kept.json` is `InspectData.to_json()`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from exporter.plan import DTYPE_BYTES, make_plan
from pkv_core.errors import UserInputError

FORMAT = "pkv-export-inspect/1"
DECODE_CONTEXT = 6  # tokens decoded before each token to find its text (multi-byte characters, leading spaces)


@dataclass
class Mark:
    """The marked span: characters [char_start, char_end) of the prompt's text, tokens [token_start, token_end)."""

    text: str
    char_start: int
    char_end: int
    token_start: int
    token_end: int
    occurrences: int  # how often the text occurs in the prompt (the first one is marked)


@dataclass
class InspectData:
    """One prompt's kept sets. kept[l][h]: ascending prompt positions (0 = the first token) that cache head h of
    layer l holds after the prefill; scores[l]: [Hc, q] float32 (NaN: no score, -inf: not a candidate) or None."""

    model: str
    engine: str
    policy: str
    hyperparameters: dict[str, Any]
    token_ids: list[int]
    tokens: list[str]  # each token's share of the prompt's text; "".join(tokens) is the text
    kept: list[list[list[int]]]
    scores: list[np.ndarray | None] | None
    planned: list[int]  # per layer, the tokens `plan` says the layer caches
    sinks: int
    window: int
    kv_bytes_held: int  # what the cache layout spans (each layer as wide as its longest head)
    kv_bytes_kept: int  # the kept pairs alone
    kv_bytes_full: int  # FullKV's cache for this prompt
    dtype: str
    mark: Mark | None = None
    answer: str | None = None
    notes: dict[str, str] = field(default_factory=dict)  # shown in the page's header (validate: scores, answers)

    @property
    def num_layers(self) -> int:
        return len(self.kept)

    @property
    def num_heads(self) -> int:
        return len(self.kept[0]) if self.kept else 0

    @property
    def prompt_len(self) -> int:
        return len(self.token_ids)

    def counts(self) -> np.ndarray:
        """[L, q] uint8: how many heads of each layer keep each position."""
        out = np.zeros((self.num_layers, self.prompt_len), np.int64)
        for layer, heads in enumerate(self.kept):
            for positions in heads:
                out[layer, positions] += 1
        return out.astype(np.uint8)

    def share(self) -> np.ndarray:
        """[q] float: the share of (layer, head) pairs that keep each position."""
        return self.counts().sum(0) / max(1, self.num_layers * self.num_heads)

    def mark_heads(self) -> list[list[int]]:
        """[layer][head] how many of the marked span's tokens the head keeps (empty without a mark)."""
        if self.mark is None:
            return []
        lo, hi = self.mark.token_start, self.mark.token_end
        return [[sum(lo <= p < hi for p in positions) for positions in heads] for heads in self.kept]

    def to_json(self) -> dict[str, Any]:
        layers = []
        for layer, heads in enumerate(self.kept):
            rows = None if self.scores is None or self.scores[layer] is None else self.scores[layer]
            layers.append({"layer": layer, "planned": self.planned[layer], "heads": [
                {"head": h, "kept": positions, "scores": None if rows is None else _finite(rows[h])}
                for h, positions in enumerate(heads)]})
        mark = None if self.mark is None else {**self.mark.__dict__, "kept_per_layer_head": self.mark_heads()}
        return {
            "format": FORMAT, "model": self.model, "engine": self.engine, "policy": self.policy,
            "hyperparameters": self.hyperparameters, "prompt_tokens": self.prompt_len, "token_ids": self.token_ids,
            "tokens": self.tokens, "always_kept": {"sinks": self.sinks, "window": self.window},
            "kv_bytes": {"dtype": self.dtype, "held": self.kv_bytes_held, "kept_pairs": self.kv_bytes_kept,
                         "full": self.kv_bytes_full, "ratio": round(self.kv_bytes_held / self.kv_bytes_full, 6)},
            "mark": mark, "answer": self.answer, "notes": self.notes,
            "scores_note": "per position; null where the method gives no score or cannot pick the token "
                           "(sinks, window, padding); ChunkKV: each token its chunk's score",
            "layers": layers,
        }


def _finite(row: np.ndarray) -> list[float | None]:
    return [float(f"{x:.6g}") if math.isfinite(x) else None for x in row.tolist()]


def token_pieces(tokenizer: Any, ids: list[int]) -> list[str]:
    """Each token's share of the decoded text (special tokens included): the text a token adds after the tokens
    before it. A token that ends inside a multi-byte character adds nothing; the one that completes it adds the
    character. Decoding a few tokens of context per token keeps this linear in the prompt."""

    def decode(part: list[int]) -> str:
        return tokenizer.decode(part, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    pieces = []
    for i in range(len(ids)):
        lo = max(0, i - DECODE_CONTEXT)
        before = decode(ids[lo:i]).rstrip("\ufffd")  # an incomplete character is completed by a later token
        after = decode(ids[lo : i + 1])
        if i < len(ids) - 1:
            after = after.rstrip("\ufffd")
        pieces.append(after[len(before):] if after.startswith(before) else after[len(_common(before, after)):])
    return pieces


def _common(a: str, b: str) -> str:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return a[:n]


def find_mark(tokens: list[str], text: str) -> Mark:
    """The first occurrence of `text` in the prompt's text, and the tokens it touches."""
    whole = "".join(tokens)
    if not text:
        raise UserInputError("--mark must not be empty")
    start = whole.find(text)
    if start < 0:
        raise UserInputError(f"--mark text {text[:60]!r} is not in the prompt (as the tokenizer decodes it)")
    end = start + len(text)
    ends = np.cumsum([len(t) for t in tokens])  # character end of each token
    first = int(np.searchsorted(ends, start, side="right"))
    while first > 0 and tokens[first - 1] == "":  # the first bytes of a character split over several tokens
        first -= 1
    last = int(np.searchsorted(ends, end - 1, side="right"))
    return Mark(text, start, end, first, last + 1, whole.count(text))


def prompt_text(tokenizer: Any, ids: list[int], mark: str | None = None) -> tuple[list[str], Mark | None]:
    """The prompt's tokens as text and the marked span (checked before any prefill: a mark not in the prompt is a
    user's mistake)."""
    tokens = token_pieces(tokenizer, ids)
    return tokens, None if mark is None else find_mark(tokens, mark)


def inspect_data(result, tokens: list[str], mark: Mark | None, ids: list[int], policy, spec, dtype: str, model: str,
                 engine: str) -> InspectData:
    """InspectData of batch row 0 of a `generate(..., return_indices=True)` result on the prompt `ids` (whose text
    and mark `prompt_text` gave)."""
    if result.kept_indices is None:
        raise UserInputError(f"{engine} reported no kept indices; inspect needs an engine that does")
    q = len(ids)
    kept = [[[int(p) for p in row if p >= 0] for row in layer[0].tolist()] for layer in result.kept_indices]
    scores = None
    if result.scores is not None and any(s is not None for s in result.scores):
        scores = [None if s is None else s[0, :, :q].float().numpy() for s in result.scores]
    plan = make_plan(spec, policy, q, dtype=dtype)
    nbytes = DTYPE_BYTES[dtype] * spec.head_dim * 2  # K and V of one (head, token)
    sinks, window = policy.always_kept(q)
    return InspectData(
        model=model, engine=engine, policy=policy.name, hyperparameters=policy.hyperparameters(), token_ids=list(ids),
        tokens=tokens, kept=kept, scores=scores, planned=[row["cached"] for row in plan["layers"]], sinks=sinks,
        window=window, kv_bytes_held=sum(int(k.shape[1] * k.shape[2]) for k in result.kept_indices) * nbytes,
        kv_bytes_kept=sum(len(p) for heads in kept for p in heads) * nbytes, kv_bytes_full=plan["kv_bytes_full"],
        dtype=dtype, mark=mark, answer=result.text[0])
