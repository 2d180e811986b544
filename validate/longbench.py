"""LongBench v1 data loading and prompt construction, following THUDM/LongBench `pred.py`.

Samples come from the official JSONL files (a local directory, the usual way) or, optionally, from the Hugging Face
Hub through the `datasets` library. Prompts use LongBench's own per-dataset templates and output lengths, shipped
in `validate/data/` (MIT, see `validate/data/README.md`), or a user-given directory with the same two files.

The prompt pipeline is the official one: format the template, cut the *middle* of the prompt to the input budget
(instructions sit at both ends), then wrap it in the chat template, except on the few-shot and code datasets.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pkv_core.errors import UserInputError

HUB_REPO = "THUDM/LongBench"
SHIPPED_CONFIG_DIR = Path(__file__).resolve().parent / "data"
PROMPT_FILE, MAXLEN_FILE = "dataset2prompt.json", "dataset2maxlen.json"

# Official `pred.py`: "chat models are better off without build prompts on these tasks".
NO_CHAT_DATASETS = frozenset({"trec", "triviaqa", "samsum", "lsht", "lcc", "repobench-p"})
ZH_DATASETS = frozenset({"multifieldqa_zh", "dureader", "vcsum", "lsht", "passage_retrieval_zh"})
REQUIRED_FIELDS = ("input", "context", "answers")


@dataclass
class LongBenchSample:
    """One row of a LongBench JSONL file (`_id` is stored as `id`)."""

    input: str
    context: str
    answers: list[str]
    length: int
    dataset: str
    language: str
    all_classes: list[str] | None
    id: str

    def as_record(self) -> dict[str, Any]:
        """The row with the official field names, which is what the official templates are formatted with."""
        return {
            "input": self.input,
            "context": self.context,
            "answers": self.answers,
            "length": self.length,
            "dataset": self.dataset,
            "language": self.language,
            "all_classes": self.all_classes,
            "_id": self.id,
        }


# --- loading -------------------------------------------------------------------------------------------------------


def dataset_from_filename(path: str | Path) -> str:
    """`multi_news.jsonl` → `multi_news`; LongBench-E files drop their suffix: `hotpotqa_e.jsonl` → `hotpotqa`."""
    stem = Path(path).stem
    return stem[: -len("_e")] if stem.endswith("_e") else stem


def _default_length(language: str, input_: str, context: str, answers: list[str]) -> int:
    """LongBench's `length`: words (English) or characters (Chinese) of input, context and answers together."""
    text = " ".join([input_, context, *answers])
    return len("".join(text.split())) if language == "zh" else len(text.split())


def _parse_row(row: Any, *, dataset: str, default_id: str) -> LongBenchSample:
    """Validate one decoded row; raise ValueError with a short reason (the caller adds file:line)."""
    if not isinstance(row, dict):
        raise ValueError(f"expected a JSON object, got {type(row).__name__}")
    for name in REQUIRED_FIELDS:
        if name not in row:
            raise ValueError(f"missing field {name!r}")
    for name in ("input", "context"):
        if not isinstance(row[name], str):
            raise ValueError(f"field {name!r} must be a string")
    answers = row["answers"]
    if not isinstance(answers, list) or not all(isinstance(a, str) for a in answers):
        raise ValueError("field 'answers' must be a list of strings")
    if not answers:  # every official metric takes the best over the answers: none would score 0 whatever is said
        raise ValueError("field 'answers' is empty: there is nothing to score the answer against")
    ds = row.get("dataset") or dataset
    if not isinstance(ds, str):
        raise ValueError("field 'dataset' must be a string")
    language = row.get("language") or ("zh" if ds in ZH_DATASETS else "en")
    if not isinstance(language, str):
        raise ValueError("field 'language' must be a string")
    all_classes = row.get("all_classes")
    if all_classes is not None and (
        not isinstance(all_classes, list) or not all(isinstance(c, str) for c in all_classes)
    ):
        raise ValueError("field 'all_classes' must be null or a list of strings")
    length = row.get("length")
    if length is None:
        length = _default_length(language, row["input"], row["context"], answers)
    elif isinstance(length, bool) or not isinstance(length, int):
        raise ValueError("field 'length' must be an integer")
    sample_id = row.get("_id")
    if sample_id is None:
        sample_id = default_id
    return LongBenchSample(
        input=row["input"],
        context=row["context"],
        answers=list(answers),
        length=length,
        dataset=ds,
        language=language,
        all_classes=list(all_classes) if all_classes is not None else None,
        id=str(sample_id),
    )


def _parse_line(line: bytes, *, dataset: str, default_id: str) -> LongBenchSample:
    """Decode and validate one JSONL line; ValueError carries the short reason."""
    try:
        row = json.loads(line.decode("utf-8"))
    except UnicodeDecodeError:
        raise ValueError("not valid UTF-8") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"invalid JSON ({exc.msg} at column {exc.colno})") from None
    return _parse_row(row, dataset=dataset, default_id=default_id)


def _check_unique(sample: LongBenchSample, where: str, seen: dict[tuple[str, str], str] | None) -> None:
    """A sample is keyed by (dataset, _id) in the run's records: a second row with the same key would be one
    sample to `--resume` and two to a fresh run, so it is refused (ValueError, the caller adds file:line)."""
    if seen is None:
        return
    key = (sample.dataset, sample.id)
    if key in seen:
        raise ValueError(f"duplicate _id {sample.id!r} in dataset {sample.dataset!r} (first at {seen[key]})")
    seen[key] = where


def load_jsonl(
    path: str | Path, *, dataset: str | None = None, skip_bad: bool = False,
    seen: dict[tuple[str, str], str] | None = None,
) -> tuple[list[LongBenchSample], list[str]]:
    """Read one official LongBench JSONL file into samples.

    `dataset` fills rows without a `dataset` field; by default it comes from the file name (`_e` dropped).
    A bad line raises UserInputError "path:line: reason"; with `skip_bad` it is skipped and its message returned
    in the second list instead, so one broken row does not cost a whole evaluation run. A row whose (dataset,
    `_id`) an earlier row has (in this file, or in `seen`, shared by the files of one run) is a bad line too.
    """
    seen = {} if seen is None else seen
    path = Path(path)
    default_dataset = dataset or dataset_from_filename(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise UserInputError(f"{path}: no such file") from None
    except OSError as exc:
        raise UserInputError(f"{path}: cannot read ({exc.strerror or exc})") from None
    samples: list[LongBenchSample] = []
    errors: list[str] = []
    # Split bytes, not text, so an encoding error is reported on its own line instead of failing the file.
    for lineno, line in enumerate(raw.split(b"\n"), start=1):
        if not line.strip():
            continue
        try:
            sample = _parse_line(line, dataset=default_dataset, default_id=f"{path.name}:{lineno}")
            _check_unique(sample, f"{path}:{lineno}", seen)
            samples.append(sample)
        except ValueError as exc:
            message = f"{path}:{lineno}: {exc}"
            if not skip_bad:
                raise UserInputError(message) from None
            errors.append(message)
    return samples, errors


def load_dir(
    directory: str | Path, datasets: Iterable[str] | None = None, skip_bad: bool = False
) -> tuple[list[LongBenchSample], list[str]]:
    """Load every `*.jsonl` in `directory`, or only `<name>.jsonl` for each name in `datasets`.

    Names match file stems exactly, so `hotpotqa` selects `hotpotqa.jsonl` and `hotpotqa_e` the LongBench-E file
    (the official data directory holds both; loading everything mixes them).
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise UserInputError(f"{directory}: not a directory of LongBench JSONL files")
    files = {p.stem: p for p in sorted(directory.glob("*.jsonl")) if p.is_file()}
    if datasets is None:
        if not files:
            raise UserInputError(f"{directory}: no *.jsonl files")
        selected = list(files.values())
    else:
        names = list(dict.fromkeys(datasets))
        missing = [n for n in names if n not in files]
        if missing:
            raise UserInputError(f"{directory}: no {', '.join(n + '.jsonl' for n in missing)}")
        selected = [files[n] for n in names]
    samples: list[LongBenchSample] = []
    errors: list[str] = []
    seen: dict[tuple[str, str], str] = {}
    for path in selected:
        file_samples, file_errors = load_jsonl(path, skip_bad=skip_bad, seen=seen)
        samples += file_samples
        errors += file_errors
    return samples, errors


def load_hub(
    datasets: Iterable[str], *, repo: str = HUB_REPO, skip_bad: bool = False
) -> tuple[list[LongBenchSample], list[str]]:
    """Load the test split of each dataset from the Hugging Face Hub, as the official `pred.py` does.

    `datasets` (the library) is optional and imported only here; without it, or without the Hub, the error says
    so in one line and points at the local-directory route.
    """
    hint = "download the LongBench JSONL files and pass their directory instead"
    try:
        from datasets import load_dataset
    except ImportError:
        raise UserInputError(
            f"loading LongBench from the Hub needs the `datasets` library, which is not installed; {hint}"
        ) from None
    samples: list[LongBenchSample] = []
    errors: list[str] = []
    seen: dict[tuple[str, str], str] = {}
    for name in datasets:
        source = f"{repo}/{name}"
        try:
            rows = load_dataset(repo, name, split="test")
        except Exception as exc:  # network, auth, unknown config, script-loading changes: all the same advice
            reason = (str(exc).strip().splitlines() or [""])[0]
            raise UserInputError(
                f"cannot load {source} from the Hub ({type(exc).__name__}: {reason}); {hint}"
            ) from None
        for index, row in enumerate(rows, start=1):
            try:
                sample = _parse_row(dict(row), dataset=dataset_from_filename(name), default_id=f"{name}:{index}")
                _check_unique(sample, f"{source}:{index}", seen)
                samples.append(sample)
            except ValueError as exc:
                message = f"{source}:{index}: {exc}"
                if not skip_bad:
                    raise UserInputError(message) from None
                errors.append(message)
    return samples, errors


# --- prompt configuration ------------------------------------------------------------------------------------------


def _read_json_object(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise UserInputError(f"{path}: missing (a prompt config directory needs {PROMPT_FILE} and {MAXLEN_FILE})")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserInputError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise UserInputError(f"{path}: expected a JSON object mapping dataset names to values")
    return data


def load_prompt_config(config_dir: str | Path | None = None) -> tuple[dict[str, str], dict[str, int]]:
    """(dataset2prompt, dataset2maxlen) from `config_dir`, or LongBench's own files shipped with the package."""
    directory = Path(config_dir) if config_dir is not None else SHIPPED_CONFIG_DIR
    prompts = _read_json_object(directory / PROMPT_FILE)
    maxlens = _read_json_object(directory / MAXLEN_FILE)
    for name, template in prompts.items():
        if not isinstance(template, str):
            raise UserInputError(f"{directory / PROMPT_FILE}: the template of {name!r} must be a string")
    for name, maxlen in maxlens.items():
        if isinstance(maxlen, bool) or not isinstance(maxlen, int) or maxlen <= 0:
            raise UserInputError(f"{directory / MAXLEN_FILE}: the value of {name!r} must be a positive integer")
    return prompts, maxlens


# --- prompts -------------------------------------------------------------------------------------------------------


def build_prompt(sample: LongBenchSample, template: str) -> str:
    """`template.format(**row)` over the official field names, as `pred.py` does (`{context}`, `{input}`, ...)."""
    try:
        return template.format(**sample.as_record())
    except KeyError as exc:
        raise UserInputError(f"prompt template uses {{{exc.args[0]}}}, which LongBench samples do not have") from None
    except (IndexError, ValueError) as exc:
        raise UserInputError(f"prompt template for {sample.dataset!r} is not a valid format string ({exc})") from None


def truncate_middle(token_ids: list[int], max_len: int) -> list[int]:
    """Keep the first and last `max_len // 2` tokens if there are more than `max_len` (official `pred.py`).

    With an odd `max_len` that keeps max_len - 1 tokens, as the official `half = int(max_length/2)` does.
    Deviation: for max_len == 1 the official slice `ids[-0:]` would return everything; we return nothing.
    """
    if max_len < 1:
        raise UserInputError(f"the input budget must be at least 1 token, got {max_len}")
    if len(token_ids) <= max_len:
        return list(token_ids)
    half = max_len // 2
    if half == 0:
        return []
    return list(token_ids[:half]) + list(token_ids[-half:])


def _chat(tokenizer: Any, prompt: str, dataset: str) -> tuple[str, bool]:
    """The chat-formatted prompt and whether the chat template was actually applied."""
    if dataset in NO_CHAT_DATASETS or not getattr(tokenizer, "chat_template", None):
        return prompt, False
    messages = [{"role": "user", "content": prompt}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True), True


def apply_chat_template(tokenizer: Any, prompt: str, dataset: str) -> str:
    """Wrap the prompt as one user turn plus the assistant header, unless the dataset is few-shot/code or the
    tokenizer has no chat template (then the prompt is returned unchanged).

    The official `build_chat` hard-codes a format per model family; a tokenizer's own chat template is the
    modern equivalent of the same idea.
    """
    return _chat(tokenizer, prompt, dataset)[0]


def _encode(tokenizer: Any, text: str, *, add_special_tokens: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=add_special_tokens, truncation=False)["input_ids"])


def prepare_prompt(sample: LongBenchSample, tokenizer: Any, template: str, max_input_len: int, chat: bool) -> list[int]:
    """Token ids of the sample's prompt, built in the official order: format, truncate the middle, then template.

    Truncation runs on the bare prompt (tokenised without special tokens) and decodes each half separately with
    `skip_special_tokens=True`, as `pred.py` does; the chat template and BOS come afterwards, so `max_input_len`
    bounds the prompt content and the returned ids may be longer by the template and special tokens (and by a
    token or two where re-tokenising across the cut merges differently), exactly as in the official pipeline.

    Deviations: (1) the official code counts the tokenizer's special tokens (e.g. LLaMA's BOS) towards the
    budget; we count content tokens only. (2) When the chat template was applied, the final text is tokenised
    without adding special tokens, because templates such as LLaMA-3's already begin with BOS (this is what
    `apply_chat_template(tokenize=True)` does); plain prompts get the tokenizer's special tokens as usual.
    """
    prompt = build_prompt(sample, template)
    ids = _encode(tokenizer, prompt, add_special_tokens=False)
    if len(ids) > max_input_len:
        kept = truncate_middle(ids, max_input_len)
        half = len(kept) // 2
        prompt = tokenizer.decode(kept[:half], skip_special_tokens=True) + tokenizer.decode(
            kept[half:], skip_special_tokens=True
        )
    templated = False
    if chat:
        prompt, templated = _chat(tokenizer, prompt, sample.dataset)
    return _encode(tokenizer, prompt, add_special_tokens=not templated)


def max_new_tokens(dataset: str, dataset2maxlen: Mapping[str, int]) -> int:
    """The official generation budget of a dataset, with a clear error for a dataset the config lacks."""
    try:
        return dataset2maxlen[dataset]
    except KeyError:
        raise UserInputError(f"the prompt config has no maximum output length for dataset {dataset!r}") from None
