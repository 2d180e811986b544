"""The tokenizer of a GGUF file: converted from its metadata once, then loaded from the user's cache.

transformers builds a fast tokenizer (vocabulary, merges, special tokens, chat template) from the GGUF's
`tokenizer.*` metadata; for a 49k-token vocabulary that takes several seconds, so the result is saved under
`$PKV_EXPORT_CACHE_DIR/gguf/<sha256 of the file>/tokenizer` (written to a temporary sibling and renamed, so a
killed conversion never leaves a half-written cache) and the next load reads it in well under a second.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path

from exporter.gguf_checkpoint import gguf_cache_dir
from pkv_core.errors import UserInputError

CACHE_MARKER = "tokenizer_config.json"


def gguf_tokenizer_dir(path: Path) -> Path:
    """A directory of Hugging Face tokenizer files equivalent to the GGUF's tokenizer (converted on first use)."""
    target = gguf_cache_dir(path) / "tokenizer"
    if (target / CACHE_MARKER).is_file():
        return target
    tokenizer = convert_tokenizer(path)
    tmp = target.with_name(f".{target.name}.partial-{os.getpid()}")
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        tokenizer.save_pretrained(str(tmp))
        with contextlib.suppress(FileNotFoundError):
            shutil.rmtree(target)  # a cache without its marker is incomplete
        tmp.rename(target)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if (target / CACHE_MARKER).is_file():  # another process converted it meanwhile
            return target
        raise
    return target


def convert_tokenizer(path: Path):
    """transformers' conversion of the GGUF tokenizer metadata (no network, no remote code)."""
    from transformers import AutoTokenizer

    path = Path(path)
    try:
        return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name, local_files_only=True,
                                             trust_remote_code=False)
    except (ValueError, KeyError, TypeError, IndexError, OSError, AttributeError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UserInputError(f"{path}: the GGUF's tokenizer cannot be read ({first})") from None
