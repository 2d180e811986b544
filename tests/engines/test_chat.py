"""Chat-template prompts (engines/chat.py): the split context + question is the single user turn."""

from __future__ import annotations

import pytest

from engines.chat import chat_context_ids, chat_prompt_ids, has_chat_template
from exporter.checkpoint import load_model
from pkv_core.errors import UserInputError


@pytest.fixture(scope="module")
def tokenizer():
    return load_model("tiny-retriever", need_weights=False).tokenizer()


def test_a_prompt_is_one_user_turn_then_the_assistant_header(tokenizer):
    text = tokenizer.decode(chat_prompt_ids(tokenizer, "Hello there."))
    assert text == "<|begin_of_text|><|user|>\nHello there.\n<|assistant|>\n"


@pytest.mark.parametrize("questions", [["What?"], ["Question: What is it?", "And the other one?"]])
def test_context_and_each_question_make_the_whole_turn(tokenizer, questions):
    context = "Some context. It has two sentences."
    head, asked = chat_context_ids(tokenizer, context, questions)
    assert len(asked) == len(questions)
    for q, ids in zip(questions, asked, strict=True):
        assert head + ids == chat_prompt_ids(tokenizer, context + "\n\n" + q)
    assert tokenizer.decode(head).endswith(context)


def test_a_tokenizer_without_a_template_is_a_user_error(tokenizer, monkeypatch):
    bare = tokenizer  # the embedded tokenizer is shared (cached): monkeypatch puts its template back
    monkeypatch.setattr(bare, "chat_template", None)
    assert not has_chat_template(bare)
    with pytest.raises(UserInputError, match="my-model's tokenizer has no chat template; run without --chat"):
        chat_prompt_ids(bare, "x", "my-model")
    with pytest.raises(UserInputError, match="my-model's tokenizer has no chat template"):
        chat_context_ids(bare, "x", ["y"], "my-model")
