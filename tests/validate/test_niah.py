"""NIAH haystacks, prompt building, grid parsing, scoring and heatmaps, on the embedded byte-level tokenizer."""

from __future__ import annotations

import itertools
import re
import subprocess
import sys
from pathlib import Path

import pytest

from exporter.tokenizer import byte_level_tokenizer
from pkv_core.errors import UserInputError
from validate import niah
from validate.plots import niah_heatmaps

BOS_ID = 256
NEEDLE = niah.DEFAULT_NEEDLE
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tok():
    return byte_level_tokenizer()


@pytest.fixture(scope="module")
def bpe_tok():
    """A small BPE trained on the generated haystack, whose merges span spaces and sentence boundaries."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    raw.train_from_iterator(list(itertools.islice(niah.generated_sentences(99), 2000)), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=raw)


def _longest_sentence_tokens(tokenizer, seed: int = 0, count: int = 2000) -> int:
    return max(len(tokenizer(" " + s, add_special_tokens=False)["input_ids"]) for s in _sentences(seed, count))


def _sentences(seed: int, count: int) -> list[str]:
    return list(itertools.islice(niah.generated_sentences(seed), count))


def _prompt(tok, context_len: int, depth: float, chat: bool = False, seed: int = 0) -> niah.NiahPrompt:
    return niah.build_haystack_prompt(tok, niah.generated_sentences(seed), context_len, depth, NEEDLE, chat)


def _haystack_part(text: str) -> str:
    """The haystack-with-needle part of a prompt text (chat header and question removed)."""
    body = text.split("\n\nQuestion:")[0]
    return body.split("<|user|>\n", 1)[1] if "<|user|>\n" in body else body


# --- prompt building -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("chat", [False, True])
@pytest.mark.parametrize("context_len", [300, 1000, 2000])
@pytest.mark.parametrize("depth", [0, 50, 100])
def test_prompt_length_needle_once_and_layout(tok, context_len, depth, chat):
    p = _prompt(tok, context_len, depth, chat)
    assert p.text.count(NEEDLE.needle) == 1
    assert len(p.ids) <= context_len
    assert context_len - len(p.ids) <= _longest_sentence_tokens(tok) + 4
    assert p.context_len == context_len and p.depth_percent == depth
    # The ids are exactly the text as the model gets it: one BOS, from the tokenizer (plain) or the template (chat).
    assert p.ids == tok(p.text, add_special_tokens=not chat)["input_ids"]
    assert p.ids.count(BOS_ID) == 1 and p.ids[0] == BOS_ID
    question = f"\n\nQuestion: {NEEDLE.question} Answer in one sentence based only on the text above."
    if chat:
        assert p.text.startswith("<|begin_of_text|><|user|>\n")
        assert p.text.endswith(question + "\n<|assistant|>\n")
    else:
        assert p.text.endswith(question + "\nAnswer:")


@pytest.mark.parametrize("chat", [False, True])
def test_needle_token_start_points_at_the_needle(tok, chat):
    needle_bytes = list(NEEDLE.needle.encode())
    for depth in (0, 30, 100):
        p = _prompt(tok, 1000, depth, chat)
        start = p.needle_token_start
        assert p.ids[start : start + len(needle_bytes)] == needle_bytes


@pytest.mark.parametrize("chat", [False, True])
def test_depth_zero_and_hundred_are_the_haystack_ends(tok, chat):
    first = _haystack_part(_prompt(tok, 1000, 0, chat).text)
    assert first.startswith(NEEDLE.needle + " ")
    last = _haystack_part(_prompt(tok, 1000, 100, chat).text)
    assert last.endswith(" " + NEEDLE.needle)
    assert not last.startswith(NEEDLE.needle)
    assert _prompt(tok, 1000, 0, chat).actual_depth_percent == 0.0
    assert _prompt(tok, 1000, 100, chat).actual_depth_percent == 100.0


def test_depth_fifty_lands_in_the_middle(tok):
    p = _prompt(tok, 2000, 50)
    assert abs(p.actual_depth_percent - 50) <= 5
    # Cross-check actual_depth_percent against the text itself (byte tokenizer: tokens == bytes).
    body = _haystack_part(p.text)
    before = body.index(NEEDLE.needle)
    haystack_len = len(body) - len(NEEDLE.needle)
    assert abs(100 * before / haystack_len - p.actual_depth_percent) <= 1
    # The needle sits at a sentence boundary.
    assert body[before - 2 : before] == ". "
    assert body[before + len(NEEDLE.needle)] == " "


def test_actual_depth_grows_with_requested_depth(tok):
    actual = [_prompt(tok, 2000, d).actual_depth_percent for d in (0, 25, 50, 75, 100)]
    assert actual == sorted(actual) and len(set(actual)) == 5
    for requested, got in zip((0, 25, 50, 75, 100), actual, strict=True):
        assert abs(requested - got) <= 5


def test_prompt_fits_with_a_bpe_tokenizer(bpe_tok):
    longest = _longest_sentence_tokens(bpe_tok)
    for context_len in (300, 1000, 3000):
        for depth in (0, 50, 100):
            p = niah.build_haystack_prompt(bpe_tok, niah.generated_sentences(0), context_len, depth, NEEDLE, False)
            assert NEEDLE.needle in p.text
            assert len(p.ids) == len(bpe_tok(p.text)["input_ids"])
            assert context_len - longest - 8 <= len(p.ids) <= context_len


def test_finite_sentences_give_a_shorter_prompt(tok):
    p = niah.build_haystack_prompt(tok, ["One short line.", "Another one."], 1000, 50, NEEDLE, False)
    assert "One short line. The best thing" in p.text and "sunny day. Another one." in p.text
    assert len(p.ids) < 400


def test_prompt_errors(tok):
    with pytest.raises(UserInputError, match="too small"):
        _prompt(tok, 100, 50)
    for depth in (-1, 100.5, float("nan")):
        with pytest.raises(UserInputError, match="depth"):
            _prompt(tok, 1000, depth)
    with pytest.raises(UserInputError, match="context length"):
        _prompt(tok, 0, 50)


# --- haystack sources ----------------------------------------------------------------------------------------------


def test_generated_sentences_are_deterministic_and_varied():
    a, b, c = _sentences(0, 300), _sentences(0, 300), _sentences(1, 300)
    assert a == b
    assert a != c
    assert len(set(a)) > 250
    for s in a:
        assert s[0].isupper() and s.endswith(".") and s.count(".") == 1 and "  " not in s


def test_generated_sentences_avoid_the_needle_words():
    text = " ".join(_sentences(0, 5000) + _sentences(7, 5000)).lower()
    words = set(re.findall(r"[a-z]+", text))
    for word in ("san", "francisco", "dolores", "park", "sandwich", "sunny", "day", "eat", "sit", "best"):
        assert word not in words
    for fragment in ("francisco", "dolores", "sandwich", "park", "sunny"):
        assert fragment not in text


def test_directory_sentences(tmp_path):
    (tmp_path / "b.txt").write_text("Third one!  Fourth\n  spans lines? Fifth, e.g.x stays.")
    (tmp_path / "a.txt").write_text("First sentence. Second sentence.\n")
    (tmp_path / "c.md").write_text("Not a haystack file.")
    (tmp_path / "empty.txt").write_text("  \n")
    got = list(itertools.islice(niah.directory_sentences(tmp_path), 7))
    assert got == [
        "First sentence.",
        "Second sentence.",
        "Third one!",
        "Fourth spans lines?",
        "Fifth, e.g.x stays.",
        "First sentence.",
        "Second sentence.",
    ]


def test_directory_sentences_errors(tmp_path):
    for bad in (tmp_path / "missing", tmp_path / "file.txt"):
        if bad.name == "file.txt":
            bad.write_text("A sentence.")
        with pytest.raises(UserInputError, match="does not exist") as err:
            niah.directory_sentences(bad)
        assert "\n" not in str(err.value)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "blank.txt").write_text(" \n\t")
    (empty / "notes.md").write_text("Some text.")
    with pytest.raises(UserInputError, match="no non-empty") as err:
        niah.directory_sentences(empty)
    assert "\n" not in str(err.value)
    (empty / "latin1.txt").write_bytes(b"caf\xe9 au lait.")
    with pytest.raises(UserInputError, match="UTF-8"):
        niah.directory_sentences(empty)


def test_directory_haystack_prompt(tok, tmp_path):
    (tmp_path / "essay.txt").write_text("The harbour was quiet that winter. Boats stayed in. Nobody complained!\n")
    samples = niah.niah_samples(tok, [400], [50], NEEDLE, tmp_path, chat=False)
    text = tok.decode(samples[0].ids, skip_special_tokens=True)
    assert text.count(NEEDLE.needle) == 1
    # The file's sentences, in order and cycled to fill the context.
    assert text.startswith("The harbour was quiet that winter. Boats stayed in. Nobody complained! ")
    assert text.count("The harbour was quiet that winter.") >= 3
    assert 400 - 40 <= len(samples[0].ids) <= 400


# --- grid ----------------------------------------------------------------------------------------------------------


def test_default_grid():
    assert niah.default_grid(16384) == ([1024, 2576, 6480, 16320], [0.0, 25.0, 50.0, 75.0, 100.0])
    assert niah.default_grid(2048)[0] == [256, 496, 992, 1984]
    lengths, _ = niah.default_grid(128)
    assert lengths == [16, 32, 64]
    for max_len in (128, 2048, 5000, 16384, 131072):
        lengths, _ = niah.default_grid(max_len)
        assert all(n % 16 == 0 for n in lengths) and lengths == sorted(set(lengths))
        assert lengths[-1] <= max_len - 64
    with pytest.raises(UserInputError, match="too small"):
        niah.default_grid(70)


def test_parse_grid_list_good():
    assert niah.parse_grid_list("1000,2000") == [1000, 2000]
    assert niah.parse_grid_list(" 4096 , 1024,4096 ") == [4096, 1024]
    assert niah.parse_grid_list("0,25,50.5,100", float) == [0.0, 25.0, 50.5, 100.0]
    assert all(isinstance(v, float) for v in niah.parse_grid_list("0,100", float))


@pytest.mark.parametrize(
    "text, kind, message",
    [
        ("", int, "empty"),
        (" , ", int, "empty"),
        ("1000,", int, "empty item"),
        ("abc", int, "expected an integer"),
        ("1.5", int, "expected an integer"),
        ("-5", int, "positive"),
        ("0", int, "positive"),
        ("x", float, "expected a number"),
        ("101", float, "between 0 and 100"),
        ("-1", float, "between 0 and 100"),
        ("nan", float, "between 0 and 100"),
        ("50,,75", float, "empty item"),
    ],
)
def test_parse_grid_list_bad(text, kind, message):
    with pytest.raises(UserInputError, match=message) as err:
        niah.parse_grid_list(text, kind)
    assert "\n" not in str(err.value)


def test_niah_samples_ids_unique_and_stable(tok):
    lengths, depths = [300, 600, 300], [0, 12.5, 100, 100.0]
    samples = niah.niah_samples(tok, lengths, depths, NEEDLE, None, chat=True, seed=3)
    ids = [s.id for s in samples]
    assert ids == [f"niah-L{n}-D{d}" for n in (300, 600) for d in ("0", "12.5", "100")]
    again = niah.niah_samples(tok, lengths, depths, NEEDLE, None, chat=True, seed=3)
    assert [(s.id, s.ids) for s in again] == [(s.id, s.ids) for s in samples]
    other_seed = niah.niah_samples(tok, [300], [0], NEEDLE, None, chat=True, seed=4)
    assert other_seed[0].ids != samples[0].ids
    for s in samples:
        assert s.question == NEEDLE.question and s.answer == NEEDLE.answer
        assert len(s.ids) <= s.context_len
    # At one length only the needle moves: removing it leaves the same haystack for every depth.
    for length in (300, 600):
        texts = {
            tok.decode(s.ids).replace(" " + NEEDLE.needle, "").replace(NEEDLE.needle + " ", "")
            for s in samples
            if s.context_len == length
        }
        assert len(texts) == 1


# --- scoring -------------------------------------------------------------------------------------------------------


def test_score_answer_full_and_partial():
    assert niah.score_answer(NEEDLE.needle, NEEDLE.answer) == {"recall": 1.0, "exact": 1.0}
    # Normalised answer: "eat sandwich and sit in dolores park on sunny day" (10 words); 5 of them here.
    assert niah.score_answer("Eat a sandwich and sit in.", NEEDLE.answer) == {"recall": 0.5, "exact": 0.0}
    assert niah.score_answer("I do not know.", NEEDLE.answer) == {"recall": 0.0, "exact": 0.0}
    assert niah.score_answer("", NEEDLE.answer) == {"recall": 0.0, "exact": 0.0}


def test_score_answer_normalisation_and_exactness():
    shouted = "EAT A SANDWICH, and sit in DOLORES PARK on a Sunny Day!"
    assert niah.score_answer(shouted, NEEDLE.answer) == {"recall": 1.0, "exact": 1.0}
    reordered = "Sit in Dolores Park on a sunny day and eat a sandwich."
    assert niah.score_answer(reordered, NEEDLE.answer) == {"recall": 1.0, "exact": 0.0}
    # Containment is on word boundaries: "great sandwich" does not contain "eat sandwich".
    assert niah.score_answer("A great sandwich.", "eat a sandwich") == {"recall": 0.5, "exact": 0.0}
    assert niah.score_answer("They eat a sandwich.", "eat a sandwich")["exact"] == 1.0


def test_score_answer_empty_answer():
    for answer in ("", "  ", "The.", "a"):
        with pytest.raises(UserInputError, match="empty"):
            niah.score_answer("anything", answer)


# --- heatmaps ------------------------------------------------------------------------------------------------------

LENGTHS, DEPTHS = [1024, 2048, 4096], [0.0, 50.0, 100.0]
RED_AT_ZERO = (0.647, 0.0, 0.149)  # RdYlGn(0.0)


def _cells(engine: float | None = 1.0, reference: float | None = None, skip=None) -> list[dict]:
    return [
        {"context_len": n, "depth_percent": d, "engine_score": engine, "reference_score": reference}
        for n in LENGTHS
        for d in DEPTHS
        if (n, d) != skip
    ]


def _read_png(path: Path):
    from matplotlib.image import imread

    assert path.read_bytes()[:8] == PNG_SIGNATURE
    return imread(path)


def _red_pixels(image) -> int:
    r, g, b = image[..., 0], image[..., 1], image[..., 2]
    close = (abs(r - RED_AT_ZERO[0]) < 0.03) & (abs(g - RED_AT_ZERO[1]) < 0.03) & (abs(b - RED_AT_ZERO[2]) < 0.03)
    return int(close.sum())


def test_heatmaps_one_and_two_panels(tmp_path):
    one = niah_heatmaps(_cells(0.75), tmp_path / "out" / "one.png", "NIAH tiny")
    two = niah_heatmaps(_cells(0.75, 0.5), tmp_path / "out" / "two.png", "NIAH tiny")
    assert one == tmp_path / "out" / "one.png" and two == tmp_path / "out" / "two.png"
    img_one, img_two = _read_png(one), _read_png(two)
    assert img_one.ndim == 3 and img_one.shape[0] > 100 and img_one.shape[1] > 100
    assert img_two.shape[1] > img_one.shape[1] * 1.5
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["one.png", "two.png"]  # no temporary leftovers


def test_heatmaps_missing_cell_is_blank_not_zero(tmp_path):
    missing = _read_png(niah_heatmaps(_cells(1.0, skip=(2048, 50.0)), tmp_path / "missing.png", "partial"))
    zero_cell = _cells(1.0)
    next(c for c in zero_cell if (c["context_len"], c["depth_percent"]) == (2048, 50.0))["engine_score"] = 0.0
    zero = _read_png(niah_heatmaps(zero_cell, tmp_path / "zero.png", "partial"))
    assert missing.shape == zero.shape
    # Only the colorbar's bottom end is red when the cell is missing; a zero score paints a whole red cell.
    assert _red_pixels(zero) - _red_pixels(missing) > 1000


def test_heatmaps_replaces_existing_file_and_rejects_empty(tmp_path):
    out = tmp_path / "plot.png"
    out.write_bytes(b"old")
    niah_heatmaps(_cells(0.5), out, "again")
    assert out.read_bytes()[:8] == PNG_SIGNATURE
    with pytest.raises(UserInputError, match="no NIAH results"):
        niah_heatmaps([], tmp_path / "empty.png", "nothing")
    assert not (tmp_path / "empty.png").exists()


def test_importing_plots_needs_no_matplotlib():
    code = "import sys, validate.plots; print('matplotlib' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
