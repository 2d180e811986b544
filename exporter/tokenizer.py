"""The embedded byte-level tokenizer of the tiny presets: one token per UTF-8 byte, plus three specials.

Built in memory with `tokenizers` (nothing downloaded), wrapped as a transformers fast tokenizer so the rest
of the product treats it like a checkpoint's own tokenizer. Ids: bytes 0..255, then BOS 256, EOS 257, PAD 258.
"""

from __future__ import annotations

from functools import lru_cache

BOS, EOS, PAD = "<|begin_of_text|>", "<|end_of_text|>", "<|pad|>"

# A LLaMA-3-shaped chat template, so prompts built "with the model's chat template" work on tiny presets too.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def _byte_alphabet() -> list[str]:
    """GPT-2's byte → printable-unicode map, in byte order (so token id == byte value)."""
    from tokenizers.pre_tokenizers import ByteLevel

    alphabet = ByteLevel.alphabet()
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    mapping, extra = {}, 0
    for b in range(256):
        if b in printable:
            mapping[b] = chr(b)
        else:
            mapping[b] = chr(256 + extra)
            extra += 1
    chars = [mapping[b] for b in range(256)]
    assert set(chars) == set(alphabet)
    return chars


@lru_cache(maxsize=1)
def byte_level_tokenizer():
    """A `PreTrainedTokenizerFast` that maps text to UTF-8 bytes, prepends BOS and pads on the left."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(_byte_alphabet())}
    vocab.update({BOS: 256, EOS: 257, PAD: 258})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([BOS, EOS, PAD])
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, 256)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD, padding_side="left"
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast
