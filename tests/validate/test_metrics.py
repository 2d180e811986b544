"""LongBench v1 metrics against values worked out by hand from the official definitions.

ROUGE-L expectations carry the `rouge` package's 1e-8 in the F denominator, hence `approx` throughout; the
less obvious ROUGE and fuzz.ratio values were also checked once against the real `rouge` 1.0.1 and
`fuzzywuzzy` 0.18.0 packages (which are not dependencies and are not used here).
"""

from __future__ import annotations

import pytest

from pkv_core.errors import UserInputError
from validate import metrics as m

# --- normalisation and token F1 ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        ("The Cat, sat!", "cat sat"),
        ("an apple a day", "apple day"),
        ("the-cat", "thecat"),  # punctuation goes first, so "the" is no longer a separate word
        ("  Them   there  ", "them there"),  # articles only as whole words
    ],
)
def test_normalize_answer(text, expected):
    assert m.normalize_answer(text) == expected


def test_normalize_zh_answer_drops_chinese_and_ascii_punctuation_and_whitespace():
    assert m.normalize_zh_answer("北京， 是 Capital！") == "北京是capital"


@pytest.mark.parametrize(
    "prediction, ground_truth, expected",
    [
        ("The cat sat", "a cat sat down", 0.8),  # [cat, sat] vs [cat, sat, down]: P=1, R=2/3
        ("Paris!", "paris", 1.0),
        ("dog", "cat", 0.0),
        ("the", "a", 0.0),  # both normalise to nothing
        ("cat cat", "cat", 2 / 3),  # multiset overlap 1: P=1/2, R=1
        ("the-cat", "cat", 0.0),
        ("Barack Obama", "Obama", 2 / 3),
    ],
)
def test_qa_f1_score(prediction, ground_truth, expected):
    assert m.qa_f1_score(prediction, ground_truth) == pytest.approx(expected)


@pytest.mark.parametrize(
    "prediction, ground_truth, expected",
    [
        ("北京大学", "北京", 2 / 3),  # [北,京,大,学] vs [北,京]: P=1/2, R=1
        ("北京。", "北京", 1.0),
        ("GPT4很强", "gpt4", 0.5),  # ASCII run is one token: [gpt4, 很, 强] vs [gpt4]
        ("上海", "北京", 0.0),
        ("。，", "北京", 0.0),
    ],
)
def test_qa_f1_zh_score(prediction, ground_truth, expected):
    assert m.qa_f1_zh_score(prediction, ground_truth) == pytest.approx(expected)


# --- ROUGE-L --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "prediction, ground_truth, expected",
    [
        # LCS "the cat on the mat" has 4 distinct words; 5 distinct words on each side: P=R=4/5.
        ("the cat sat on the mat", "the cat is on the mat", 0.8),
        # LCS [a, c]: P=2/4, R=2/3, F=2*(1/2)(2/3)/(7/6)=4/7.
        ("a b c d", "a c e", 4 / 7),
        ("b a", "a b", 0.5),
        # "." splits sentences; LCS of [a,b,c] with "c" and with "a b" unite to all 3 words.
        ("c. a b", "a b c", 1.0),
        # Distinct words: "the the the" has one word, the LCS covers it.
        ("the the the", "the", 1.0),
        # Tie-break of the package: LCS of ref [a,b] and hyp [b,a] is reconstructed as {b}, plus {a} from "a".
        ("b a. a", "a b", 1.0),
        # A whitespace-only piece after "." survives as an empty word: P=1/2, R=1.
        ("Hello.  ", "Hello", 2 / 3),
        ("Cat", "cat", 0.0),  # no normalisation in ROUGE
        ("", "a b", 0.0),
        ("...", "a b", 0.0),
        ("a b", "", 0.0),
    ],
)
def test_rouge_score(prediction, ground_truth, expected):
    assert m.rouge_score(prediction, ground_truth) == pytest.approx(expected, abs=1e-7)


def test_rouge_score_handles_sentences_too_long_for_the_recursive_original():
    words = [f"w{i}" for i in range(1500)]
    assert m.rouge_score(" ".join(words), " ".join(words[:750])) == pytest.approx(2 * 0.5 / 1.5, abs=1e-7)


@pytest.mark.parametrize(
    "prediction, ground_truth, expected",
    [
        ("我爱北京", "我爱上海", 0.5),  # LCS {我, 爱} of 4 distinct characters each
        ("iPhone 很好", "iPhone 不好", 2 / 3),  # [iPhone, 很, 好] vs [iPhone, 不, 好]
        ("我爱北京。", "我爱北京", 8 / 9),  # "。" is a token, not a sentence break: P=4/5, R=1
        ("", "北京", 0.0),
    ],
)
def test_rouge_zh_score(prediction, ground_truth, expected):
    assert m.rouge_zh_score(prediction, ground_truth) == pytest.approx(expected, abs=1e-7)


# --- classification -----------------------------------------------------------------------------------------------

CLASSES = ["location", "other location", "person"]


@pytest.mark.parametrize(
    "prediction, ground_truth, expected",
    [
        ("other location", "other location", 1.0),  # "location" is part of the gold class, so not counted
        ("location", "other location", 0.0),
        ("person or location", "location", 0.5),
        ("animal", "location", 0.0),
        ("", "person", 0.0),
    ],
)
def test_classification_score(prediction, ground_truth, expected):
    assert m.classification_score(prediction, ground_truth, all_classes=CLASSES) == expected


def test_classification_score_keeps_the_official_remove_while_iterating_skip():
    # Matches [ab, abc, abcd]; removing "ab" shifts "abc" under the iterator, so it is never checked and stays.
    assert m.classification_score("abcd", "abcd", all_classes=["ab", "abc", "abcd"]) == 0.5


def test_classification_score_without_classes_is_an_error():
    with pytest.raises(UserInputError, match="all_classes"):
        m.classification_score("person", "person", all_classes=None)


# --- retrieval and count ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "prediction, expected",
    [
        ("Paragraph 3", 1.0),
        ("Paragraph 3 and paragraph 5", 0.5),  # every number counts, not just "Paragraph N"
        ("3, 3, 4", 2 / 3),
        ("Paragraph 13", 0.0),
        ("I don't know", 0.0),
    ],
)
def test_retrieval_score(prediction, expected):
    assert m.retrieval_score(prediction, "Paragraph 3") == pytest.approx(expected)


def test_retrieval_score_needs_a_paragraph_number_in_the_gold_answer():
    with pytest.raises(UserInputError, match="Paragraph"):
        m.retrieval_score("3", "the third one")


@pytest.mark.parametrize("prediction, expected", [("段落2", 1.0), ("答案是段落2，不是段落12", 0.5), ("段落", 0.0)])
def test_retrieval_zh_score(prediction, expected):
    assert m.retrieval_zh_score(prediction, "段落2") == pytest.approx(expected)


@pytest.mark.parametrize(
    "prediction, expected",
    [("5", 1.0), ("There are 5 unique paragraphs out of 12", 0.5), ("05", 0.0), ("none", 0.0)],
)
def test_count_score(prediction, expected):
    assert m.count_score(prediction, "5") == pytest.approx(expected)


# --- code similarity ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "a, b, expected",
    [
        ("", "", 100),
        ("a", "", 0),
        ("abc", "axy", 33),  # 2*1/6
        ("y = 1", "x = 1", 80),  # " = 1" matches: 2*4/10
        ("abcdefgh", "aijklmno", 12),  # 2*1/16 = 12.5 rounds half to even, like fuzz.ratio
    ],
)
def test_fuzz_ratio(a, b, expected):
    assert m.fuzz_ratio(a, b) == expected


@pytest.mark.parametrize(
    "prediction, expected",
    [
        ("```python\n# set x\nx = 1\n```", 1.0),  # fences and comments are skipped
        ("\n\nx = 1\ny = 2", 1.0),  # leading newlines stripped, then the first line
        ("    x = 1", 0.71),  # indentation is kept: 2*5/14 → 71
        ("x = 1  // one", 0.0),  # only line has a marker → empty prediction
        ("y = 1", 0.8),
    ],
)
def test_code_sim_score(prediction, expected):
    assert m.code_sim_score(prediction, "x = 1") == pytest.approx(expected)


# --- dataset mapping and sample scoring ----------------------------------------------------------------------------


def test_dataset2metric_is_the_official_mapping():
    expected = {
        "narrativeqa": "qa_f1_score",
        "qasper": "qa_f1_score",
        "multifieldqa_en": "qa_f1_score",
        "multifieldqa_zh": "qa_f1_zh_score",
        "hotpotqa": "qa_f1_score",
        "2wikimqa": "qa_f1_score",
        "musique": "qa_f1_score",
        "dureader": "rouge_zh_score",
        "gov_report": "rouge_score",
        "qmsum": "rouge_score",
        "multi_news": "rouge_score",
        "vcsum": "rouge_zh_score",
        "trec": "classification_score",
        "triviaqa": "qa_f1_score",
        "samsum": "rouge_score",
        "lsht": "classification_score",
        "passage_retrieval_en": "retrieval_score",
        "passage_count": "count_score",
        "passage_retrieval_zh": "retrieval_zh_score",
        "lcc": "code_sim_score",
        "repobench-p": "code_sim_score",
    }
    assert {name: fn.__name__ for name, fn in m.DATASET2METRIC.items()} == expected


@pytest.mark.parametrize(
    "dataset, expected",
    [
        ("triviaqa", 1.0),  # cut to "Paris"
        ("hotpotqa", 2 / 3),  # whole text: [paris, france] vs [paris]
        ("narrativeqa", 2 / 3),
    ],
)
def test_score_sample_first_line_rule_for_qa(dataset, expected):
    assert m.score_sample(dataset, "\nParis\nFrance", ["Paris"], None) == pytest.approx(expected)


@pytest.mark.parametrize("dataset", ["trec", "lsht"])
def test_score_sample_first_line_rule_for_classification(dataset):
    # Without the cut both classes would match (score 0.5); the first line holds only the gold one.
    assert m.score_sample(dataset, "location\nperson", ["location"], CLASSES) == 1.0
    assert m.classification_score("location\nperson", "location", all_classes=CLASSES) == 0.5


def test_score_sample_first_line_rule_for_samsum():
    # First line "a b" against "a b": F≈1; the whole text "a b\nc d" would give P=1/2, R=1.
    assert m.score_sample("samsum", "a b\nc d", ["a b"], None) == pytest.approx(1.0, abs=1e-7)
    assert m.score_sample("gov_report", "a b\nc d", ["a b"], None) == pytest.approx(2 / 3, abs=1e-7)


def test_score_sample_takes_the_best_gold_answer():
    assert m.score_sample("hotpotqa", "Obama", ["Barack Obama", "Obama"], None) == 1.0
    assert m.score_sample("hotpotqa", "Barack", ["Barack Obama", "Obama"], None) == pytest.approx(2 / 3)
    assert m.score_sample("hotpotqa", "Obama", [], None) == 0.0


def test_score_sample_passes_all_classes_and_rejects_unknown_datasets():
    assert m.score_sample("trec", "person", ["person"], CLASSES) == 1.0
    with pytest.raises(UserInputError, match="unknown LongBench dataset 'nq'"):
        m.score_sample("nq", "x", ["x"], None)


# --- aggregation ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "scores, expected",
    [
        ([1.0, 0.5, 0.0], 50.0),
        ([1 / 3, 1 / 3, 1 / 3], 33.33),
        ([2 / 3], 66.67),
        ([0.8, 4 / 7], 68.57),
    ],
)
def test_dataset_score_is_percent_rounded_to_two_decimals(scores, expected):
    assert m.dataset_score(scores) == expected


def test_average_score():
    assert m.average_score({"a": 50.0, "b": 30.0, "c": 10.0}) == 30.0
    assert m.average_score({"a": 10.0, "b": 20.0, "c": 20.0}) == 16.67


@pytest.mark.parametrize("fn, arg", [(m.dataset_score, []), (m.average_score, {})])
def test_aggregating_nothing_is_an_error(fn, arg):
    with pytest.raises(UserInputError):
        fn(arg)
