"""A checkpoint's tokenizer, loaded and checked before anything is written or any weight is read.

transformers reports a broken tokenizer file with whatever its parser raises (UnicodeDecodeError, JSONDecodeError,
TypeError, "need sentencepiece"), and a tokenizer with more ids than the model's embedding only fails later, deep
inside a forward (IndexError, onnxruntime's Gather). Here every such checkpoint is one `UserInputError` naming the
file and what is wrong with it, so `generate`, `build` and `compare` refuse it up front and `build` never copies a
broken file into an engine.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from exporter.specs import ModelSpec
from pkv_core.errors import UserInputError

# JSON files a Hugging Face tokenizer directory may hold, each a JSON object when present.
JSON_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json")


def check_tokenizer_files(directory: Path) -> None:
    """The tokenizer files of `directory` are present and well-formed: a `tokenizer.json` (whose `model` is an
    object) or a SentencePiece `tokenizer.model` with the sentencepiece package installed; every JSON file readable,
    non-empty UTF-8 text holding one JSON object."""
    for name in JSON_FILES:
        path = directory / name
        if not path.exists():
            continue
        where = str(path)
        if not path.is_file():
            raise UserInputError(f"{where}: not a file")
        raw = path.read_bytes()
        if not raw.strip():
            raise UserInputError(f"{where}: empty file (a tokenizer file must hold a JSON object)")
        try:
            data = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError:
            raise UserInputError(f"{where}: not UTF-8 text (a tokenizer file must hold a JSON object)") from None
        except json.JSONDecodeError as e:
            raise UserInputError(f"{where}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg}; "
                                 "truncated?)") from None
        if not isinstance(data, dict):
            raise UserInputError(f"{where}: expected a JSON object, found {type(data).__name__}")
        if name == "tokenizer.json" and not isinstance(data.get("model"), dict):
            raise UserInputError(f"{where}: no tokenizer model (the 'model' object is missing or not an object)")
    if (directory / "tokenizer.json").is_file():
        return
    if (directory / "tokenizer.model").is_file():
        if importlib.util.find_spec("sentencepiece") is None:
            raise UserInputError(f"{directory}: the tokenizer is a SentencePiece tokenizer.model without a "
                                 "tokenizer.json; install sentencepiece (pip install sentencepiece) or add the "
                                 "checkpoint's tokenizer.json")
        return
    raise UserInputError(f"{directory}: no tokenizer.json or tokenizer.model (the tokenizer files are missing)")


def load_checked_tokenizer(directory: Path, spec: ModelSpec):
    """The checkpoint's own fast or slow tokenizer (left padding, a pad token), its files and vocabulary checked."""
    check_tokenizer_files(directory)
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(directory), local_files_only=True, trust_remote_code=False)
    except Exception as e:  # the parsers of transformers, tokenizers and sentencepiece raise anything
        first = (str(e).strip().splitlines() or [""])[0]
        raise UserInputError(f"{directory}: the tokenizer cannot be loaded ({type(e).__name__}: {first})") from None
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    check_vocabulary(tok, spec, str(directory))
    return tok


def check_vocabulary(tok, spec: ModelSpec, where: str) -> None:
    """Every token id the tokenizer can produce has a row in the model's embedding (ids < vocab_size)."""
    vocab = tok.get_vocab()
    largest = max(vocab.values(), default=-1)
    if largest >= spec.vocab_size:
        raise UserInputError(f"{where}: the tokenizer has token ids up to {largest} ({len(vocab)} tokens), but "
                             f"config.json's vocab_size is {spec.vocab_size}: those ids have no embedding row; the "
                             "tokenizer does not belong to this model")
