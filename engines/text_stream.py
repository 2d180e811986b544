"""Token ids in, text pieces out, for streaming answers: what a client may print as each token arrives.

The answer is decoded whole at every token (byte-level and BPE tokens do not decode one by one) and only what is
new is emitted, holding back a trailing incomplete UTF-8 character and any ending that could be the start of a
stop string; once the stop string appears, the answer ends before it (it is never sent).
"""

from __future__ import annotations


class TextStream:
    def __init__(self, tokenizer, stop: str | None = None):
        self.tokenizer, self.stop = tokenizer, stop or None
        self.ids: list[int] = []
        self.sent = 0  # characters of the decoded answer already emitted
        self.stopped = False

    def _text(self) -> str:
        return self.tokenizer.decode(self.ids, skip_special_tokens=True)

    def add(self, token: int) -> str:
        """Append a token; returns the new text that is safe to send (possibly empty). After a stop string was
        completed, `stopped` is True and the text up to it has been returned."""
        self.ids.append(token)
        text = self._text()
        if self.stop and self.stop in text:
            end = text.index(self.stop)
            self.stopped = True
            return self._take(text, end)
        end = len(text)
        if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for its other bytes
            end = len(text.rstrip("\ufffd"))
        if self.stop:  # hold back an ending that may grow into the stop string
            for k in range(min(len(self.stop) - 1, end - self.sent), 0, -1):
                if text[end - k : end] == self.stop[:k]:
                    end -= k
                    break
        return self._take(text, end)

    def flush(self) -> str:
        """The rest of the answer once it has ended (held-back characters included, up to a stop string)."""
        text = self._text()
        end = text.index(self.stop) if self.stop and self.stop in text else len(text)
        return self._take(text, end)

    def _take(self, text: str, end: int) -> str:
        piece = text[self.sent : end] if end > self.sent else ""
        self.sent = max(self.sent, end)
        return piece

    @property
    def text(self) -> str:
        """The whole answer so far, cut before a stop string."""
        text = self._text()
        return text[: text.index(self.stop)] if self.stop and self.stop in text else text
