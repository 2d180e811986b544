"""Streamed text pieces (engines/text_stream.py) concatenate to the decoded answer, never split a UTF-8
character, and stop before a stop string without ever sending part of it."""

from exporter.checkpoint import load_model


def tokenizer():
    return load_model("tiny-llama3").tokenizer()


def ids_of(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def test_pieces_concatenate_to_the_answer_and_keep_utf8_whole():
    from engines.text_stream import TextStream

    tok = tokenizer()
    text = "naïve café — 東京 ok"
    stream = TextStream(tok)
    pieces = [stream.add(t) for t in ids_of(tok, text)] + [stream.flush()]
    assert "".join(pieces) == text and not any("\ufffd" in p for p in pieces)


def test_stop_string_is_never_sent():
    from engines.text_stream import TextStream

    tok = tokenizer()
    stream = TextStream(tok, stop="END")
    pieces = []
    for t in ids_of(tok, "the answer is 42 ENDLESS tail"):
        pieces.append(stream.add(t))
        if stream.stopped:
            break
    assert stream.stopped and "".join(pieces) == "the answer is 42 " and stream.text == "the answer is 42 "
    assert all("E" not in p for p in pieces)
    held = TextStream(tok, stop="END")
    sent = "".join(held.add(t) for t in ids_of(tok, "send EN"))
    assert sent == "send " and held.flush() == "EN"  # the answer ended without the stop string: all of it


def test_the_first_of_several_stop_strings_ends_the_answer():
    from engines.text_stream import TextStream

    tok = tokenizer()
    stream = TextStream(tok, stop=["STOP", "\n\n"])
    pieces = []
    for t in ids_of(tok, "line one\n\nSTOP later"):
        pieces.append(stream.add(t))
        if stream.stopped:
            break
    assert "".join(pieces) == "line one" and stream.text == "line one"
