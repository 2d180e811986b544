"""Prompts in a model's chat template: one user turn, then the assistant's header (what the model continues).

Models trained on chat turns (instruct checkpoints, `tiny-retriever`) answer only in that format; the tokenizer's
own template is used, so nothing here knows a model family."""

from __future__ import annotations

from typing import Any

from pkv_core.errors import UserInputError

_SPLIT = "\x00PKV-CONTEXT-END\x00"


def has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def render_user_turn(tokenizer: Any, content: str) -> str:
    """The template's text for one user message plus the generation prompt (BOS included when the template has
    it, so encode the result without special tokens)."""
    messages = [{"role": "user", "content": content}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def require_chat_template(tokenizer: Any, name: str) -> None:
    if not has_chat_template(tokenizer):
        raise UserInputError(f"{name}'s tokenizer has no chat template; run without --chat")


def chat_prompt_ids(tokenizer: Any, text: str, name: str = "the model") -> list[int]:
    """Token ids of `text` as a user turn."""
    require_chat_template(tokenizer, name)
    return tokenizer(render_user_turn(tokenizer, text), add_special_tokens=False)["input_ids"]


def chat_context_ids(tokenizer: Any, context: str, questions: list[str], name: str = "the model",
                     separator: str = "\n\n") -> tuple[list[int], list[list[int]]]:
    """(context ids, ids of each question) such that context + question i is the user turn
    `context + separator + question i` up to tokenisation at the seam: the context can be prefilled and compressed
    once, then continued by each question and the template's closing tokens."""
    require_chat_template(tokenizer, name)
    head, tail = render_user_turn(tokenizer, context + _SPLIT).split(_SPLIT, 1)
    context_ids = tokenizer(head, add_special_tokens=False)["input_ids"]
    return context_ids, [tokenizer(separator + q + tail, add_special_tokens=False)["input_ids"] for q in questions]
