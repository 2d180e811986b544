"""LongBench loading, the shipped prompt config and prompt building, on handmade fixtures and the byte tokenizer."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from exporter.tokenizer import byte_level_tokenizer
from pkv_core.errors import UserInputError
from validate import longbench as lb
from validate.metrics import DATASET2METRIC

FIXTURES = Path(__file__).parent / "fixtures"
BOS_ID = 256


@pytest.fixture(scope="module")
def tok():
    return byte_level_tokenizer()


def _sample(dataset: str = "hotpotqa", context: str = "ctx", input_: str = "q?") -> lb.LongBenchSample:
    return lb.LongBenchSample(
        input=input_,
        context=context,
        answers=["a"],
        length=1,
        dataset=dataset,
        language="en",
        all_classes=None,
        id="s1",
    )


def _write(path: Path, *lines: str | bytes) -> Path:
    path.write_bytes(b"\n".join(line if isinstance(line, bytes) else line.encode() for line in lines) + b"\n")
    return path


GOOD_ROW = json.dumps({"input": "q", "context": "c", "answers": ["a"], "dataset": "hotpotqa"})


# --- load_jsonl ----------------------------------------------------------------------------------------------------


def test_load_jsonl_reads_every_official_field():
    samples, errors = lb.load_jsonl(FIXTURES / "hotpotqa.jsonl")
    assert errors == []
    assert [s.id for s in samples] == ["hp-001", "hp-002", "hp-003"]
    second = samples[1]
    assert second.input == "Who wrote Hamlet?"
    assert second.context == "Passage 1:\nHamlet is a tragedy written by William Shakespeare."
    assert second.answers == ["William Shakespeare", "Shakespeare"]
    assert (second.length, second.dataset, second.language, second.all_classes) == (11, "hotpotqa", "en", None)


@pytest.mark.parametrize("name", ["hotpotqa.jsonl", "trec.jsonl"])
def test_load_jsonl_round_trips_to_the_official_records(name):
    rows = [json.loads(line) for line in (FIXTURES / name).read_text(encoding="utf-8").splitlines()]
    samples, _ = lb.load_jsonl(FIXTURES / name)
    assert [s.as_record() for s in samples] == rows


def test_load_jsonl_fills_optional_fields_and_dataset_from_the_file_name():
    samples, errors = lb.load_jsonl(FIXTURES / "multi_news_e.jsonl")
    assert errors == []
    first = samples[0]
    assert first.dataset == "multi_news"  # "_e" dropped
    assert first.language == "en"
    assert first.all_classes is None
    assert first.id == "multi_news_e.jsonl:1"
    # Words of input + context + answers: "Passage 1: A storm hit the coast on Monday." (9) + 5.
    assert first.length == 14


def test_load_jsonl_explicit_dataset_wins_over_the_file_name():
    samples, _ = lb.load_jsonl(FIXTURES / "multi_news_e.jsonl", dataset="gov_report")
    assert {s.dataset for s in samples} == {"gov_report"}


def test_default_length_counts_characters_for_chinese(tmp_path):
    path = _write(tmp_path / "dureader.jsonl", json.dumps({"input": "问 题", "context": "文章", "answers": ["答"]}))
    (sample,), _ = lb.load_jsonl(path)
    assert (sample.dataset, sample.language, sample.length) == ("dureader", "zh", 5)


@pytest.mark.parametrize(
    "filename, dataset",
    [
        ("multi_news.jsonl", "multi_news"),
        ("hotpotqa_e.jsonl", "hotpotqa"),
        ("multifieldqa_en.jsonl", "multifieldqa_en"),
        ("passage_retrieval_en_e.jsonl", "passage_retrieval_en"),
    ],
)
def test_dataset_from_filename(filename, dataset):
    assert lb.dataset_from_filename(filename) == dataset


def test_load_jsonl_malformed_line_names_file_and_line():
    path = FIXTURES / "bad" / "hotpotqa.jsonl"
    with pytest.raises(UserInputError, match="invalid JSON") as excinfo:
        lb.load_jsonl(path)
    assert str(excinfo.value).startswith(f"{path}:2: ")


def test_load_jsonl_names_the_missing_field(tmp_path):
    path = _write(tmp_path / "hotpotqa.jsonl", GOOD_ROW, json.dumps({"input": "q", "context": "c"}))
    with pytest.raises(UserInputError) as excinfo:
        lb.load_jsonl(path)
    assert str(excinfo.value) == f"{path}:2: missing field 'answers'"


def test_load_jsonl_skip_bad_collects_errors_and_keeps_good_rows():
    path = FIXTURES / "bad" / "hotpotqa.jsonl"
    samples, errors = lb.load_jsonl(path, skip_bad=True)
    assert [s.id for s in samples] == ["hp-001", "hp-003"]
    assert len(errors) == 2
    assert errors[0].startswith(f"{path}:2: invalid JSON")
    assert errors[1] == f"{path}:3: missing field 'answers'"


@pytest.mark.parametrize(
    "line, reason",
    [
        ("[1, 2]", "expected a JSON object, got list"),
        ('{"input": "q", "context": "c", "answers": "a"}', "field 'answers' must be a list of strings"),
        ('{"input": "q", "context": 3, "answers": ["a"]}', "field 'context' must be a string"),
        ('{"input": "q", "context": "c", "answers": ["a"], "length": "12"}', "field 'length' must be an integer"),
        ('{"input": "q", "context": "c", "answers": ["a"], "all_classes": "x"}', "'all_classes' must be null or"),
        (b'{"input": "\xff"}', "not valid UTF-8"),
        ('{"input": "q", "context": "c", "answers": []}', "field 'answers' is empty"),  # issue 31 case 18
    ],
)
def test_load_jsonl_rejects_wrong_types(tmp_path, line, reason):
    path = _write(tmp_path / "hotpotqa.jsonl", GOOD_ROW, "", line)  # the blank line is skipped but counted
    with pytest.raises(UserInputError) as excinfo:
        lb.load_jsonl(path)
    message = str(excinfo.value)
    assert message.startswith(f"{path}:3: ")
    assert reason in message


def test_duplicate_ids_are_bad_lines_in_a_file_and_across_files(tmp_path):
    """Samples are keyed by (dataset, _id): a repeated key would be two samples to a fresh run and one to a resumed
    one. Refused with both places named, or skipped and counted with --skip-bad (issue 31, case 15)."""
    rows = [json.dumps({"input": f"q{i}", "context": "c", "answers": ["a"], "_id": f"id-{i % 3}"}) for i in range(5)]
    path = _write(tmp_path / "hotpotqa.jsonl", *rows)
    with pytest.raises(UserInputError) as excinfo:
        lb.load_jsonl(path)
    assert str(excinfo.value) == f"{path}:4: duplicate _id 'id-0' in dataset 'hotpotqa' (first at {path}:1)"
    samples, errors = lb.load_jsonl(path, skip_bad=True)
    assert [s.input for s in samples] == ["q0", "q1", "q2"] and len(errors) == 2
    _write(tmp_path / "hotpotqa_e.jsonl", rows[2])  # LongBench-E's file of the same dataset
    samples, errors = lb.load_dir(tmp_path, ["hotpotqa", "hotpotqa_e"], skip_bad=True)
    assert len(samples) == 3 and errors[-1].startswith(f"{tmp_path / 'hotpotqa_e.jsonl'}:1: duplicate _id 'id-2'")
    other = tmp_path / "other"
    other.mkdir()
    _write(other / "trec.jsonl", rows[0])  # the same _id in another dataset is another sample
    _write(other / "hotpotqa.jsonl", rows[0])
    assert len(lb.load_dir(other)[0]) == 2


def test_load_jsonl_missing_file(tmp_path):
    with pytest.raises(UserInputError, match="no such file"):
        lb.load_jsonl(tmp_path / "nope.jsonl")


# --- load_dir / load_hub -------------------------------------------------------------------------------------------


def test_load_dir_reads_all_top_level_jsonl_files():
    samples, errors = lb.load_dir(FIXTURES)
    assert errors == []  # bad/ is a sub-directory and not read
    assert len(samples) == 9
    assert sorted({s.dataset for s in samples}) == ["hotpotqa", "multi_news", "trec"]


def test_load_dir_filters_by_file_stem():
    samples, _ = lb.load_dir(FIXTURES, ["trec"])
    assert [s.id for s in samples] == ["trec-001", "trec-002", "trec-003"]
    assert samples[0].all_classes == ["Animal", "City", "Country", "Other location", "Individual"]
    samples, _ = lb.load_dir(FIXTURES, ["multi_news_e"])
    assert len(samples) == 3 and samples[0].dataset == "multi_news"


def test_load_dir_errors(tmp_path):
    with pytest.raises(UserInputError, match=r"no nq\.jsonl"):
        lb.load_dir(FIXTURES, ["trec", "nq"])
    with pytest.raises(UserInputError, match=r"no \*\.jsonl files"):
        lb.load_dir(tmp_path)
    with pytest.raises(UserInputError, match="not a directory"):
        lb.load_dir(tmp_path / "missing")


def test_load_dir_skip_bad_passes_through():
    with pytest.raises(UserInputError):
        lb.load_dir(FIXTURES / "bad")
    samples, errors = lb.load_dir(FIXTURES / "bad", skip_bad=True)
    assert (len(samples), len(errors)) == (2, 2)


def test_load_hub_without_datasets_library_says_so_in_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail even if it is installed
    with pytest.raises(UserInputError) as excinfo:
        lb.load_hub(["hotpotqa"])
    message = str(excinfo.value)
    assert "`datasets` library, which is not installed" in message
    assert "directory" in message
    assert "\n" not in message


# --- prompt config -------------------------------------------------------------------------------------------------


def test_shipped_config_lives_in_the_package():
    assert lb.SHIPPED_CONFIG_DIR == Path(lb.__file__).resolve().parent / "data"
    for name in ("dataset2prompt.json", "dataset2maxlen.json", "LONGBENCH_LICENSE", "README.md"):
        assert (lb.SHIPPED_CONFIG_DIR / name).is_file(), name


def test_shipped_config_covers_every_scored_dataset():
    prompts, maxlens = lb.load_prompt_config(None)
    for dataset in DATASET2METRIC:
        assert "{context}" in prompts[dataset], dataset
        assert type(maxlens[dataset]) is int and maxlens[dataset] > 0, dataset
    assert (maxlens["hotpotqa"], maxlens["gov_report"], maxlens["trec"]) == (32, 512, 64)


def test_load_prompt_config_from_a_user_directory(tmp_path):
    (tmp_path / "dataset2prompt.json").write_text(json.dumps({"hotpotqa": "Q: {input}"}))
    (tmp_path / "dataset2maxlen.json").write_text(json.dumps({"hotpotqa": 7}))
    assert lb.load_prompt_config(tmp_path) == ({"hotpotqa": "Q: {input}"}, {"hotpotqa": 7})


def test_load_prompt_config_errors(tmp_path):
    (tmp_path / "dataset2prompt.json").write_text(json.dumps({"hotpotqa": "Q: {input}"}))
    with pytest.raises(UserInputError, match="dataset2maxlen.json: missing"):
        lb.load_prompt_config(tmp_path)
    (tmp_path / "dataset2maxlen.json").write_text(json.dumps({"hotpotqa": "32"}))
    with pytest.raises(UserInputError, match="'hotpotqa' must be a positive integer"):
        lb.load_prompt_config(tmp_path)
    (tmp_path / "dataset2maxlen.json").write_text("{not json")
    with pytest.raises(UserInputError, match="not valid JSON"):
        lb.load_prompt_config(tmp_path)


def test_max_new_tokens():
    _, maxlens = lb.load_prompt_config(None)
    assert lb.max_new_tokens("samsum", maxlens) == 128
    with pytest.raises(UserInputError, match="'nq'"):
        lb.max_new_tokens("nq", maxlens)


# --- prompts -------------------------------------------------------------------------------------------------------


def test_build_prompt_with_the_shipped_trec_template():
    prompts, _ = lb.load_prompt_config(None)
    (sample, *_), _ = lb.load_jsonl(FIXTURES / "trec.jsonl")
    expected = (
        "Please determine the type of the question below. Here are some examples of questions.\n\n"
        "Question: Where is Rome?\nType: City\nQuestion: Who was Plato?\nType: Individual\n"
        "Question: What is the largest city in Japan?\nType:"
    )
    assert lb.build_prompt(sample, prompts["trec"]) == expected


def test_build_prompt_supports_every_official_key():
    (sample, *_), _ = lb.load_jsonl(FIXTURES / "hotpotqa.jsonl")
    template = "{dataset}/{_id}/{language}/{length}: {answers[0]}"
    assert lb.build_prompt(sample, template) == "hotpotqa/hp-001/en/18: Paris"
    with pytest.raises(UserInputError, match=r"\{question\}"):
        lb.build_prompt(sample, "{question}")


@pytest.mark.parametrize(
    "max_len, expected",
    [
        (4, [0, 1, 8, 9]),
        (5, [0, 1, 8, 9]),  # half = int(5/2) = 2: an odd budget keeps one token less
        (6, [0, 1, 2, 7, 8, 9]),
        (10, list(range(10))),
        (12, list(range(10))),
        (1, []),
    ],
)
def test_truncate_middle(max_len, expected):
    assert lb.truncate_middle(list(range(10)), max_len) == expected


def test_truncate_middle_rejects_a_zero_budget():
    with pytest.raises(UserInputError):
        lb.truncate_middle([1, 2, 3], 0)


@pytest.mark.parametrize("dataset", sorted(lb.NO_CHAT_DATASETS))
def test_chat_template_skipped_for_few_shot_and_code_datasets(tok, dataset):
    assert lb.apply_chat_template(tok, "hi", dataset) == "hi"


def test_chat_template_applied_otherwise(tok):
    assert lb.apply_chat_template(tok, "hi", "hotpotqa") == "<|begin_of_text|><|user|>\nhi\n<|assistant|>\n"


def test_chat_template_absent_leaves_prompt_unchanged():
    class NoTemplate:
        chat_template = None

    assert lb.apply_chat_template(NoTemplate(), "hi", "hotpotqa") == "hi"


TEMPLATE = "{context}|{input}"


def test_prepare_prompt_without_truncation(tok):
    sample = _sample(context="abc", input_="q?")
    assert lb.prepare_prompt(sample, tok, TEMPLATE, 100, chat=False) == [BOS_ID, *b"abc|q?"]


def test_prepare_prompt_truncates_the_middle_to_max_input_len(tok):
    sample = _sample(context="0123456789" * 5, input_="END")  # 54-byte prompt "0123...789|END"
    ids = lb.prepare_prompt(sample, tok, TEMPLATE, 20, chat=False)
    assert ids == [BOS_ID, *b"0123456789", *b"456789|END"]
    assert len(ids) - 1 == 20  # the budget bounds the content; BOS comes on top


def test_prepare_prompt_truncates_before_applying_the_chat_template(tok):
    sample = _sample(context="0123456789" * 5, input_="END")
    ids = lb.prepare_prompt(sample, tok, TEMPLATE, 20, chat=True)
    # The template wraps the already-cut prompt, and its BOS is the only one.
    assert ids == [BOS_ID, *b"<|user|>\n0123456789456789|END\n<|assistant|>\n"]
    assert ids.count(BOS_ID) == 1


def test_prepare_prompt_skips_the_chat_template_for_trec(tok):
    sample = _sample(dataset="trec", context="0123456789" * 5, input_="END")
    assert lb.prepare_prompt(sample, tok, TEMPLATE, 20, chat=True) == [BOS_ID, *b"0123456789456789|END"]
