"""Token ids in, text pieces out, for streaming answers: what a client may print as each token arrives.

The answer is decoded whole at every token (byte-level and BPE tokens do not decode one by one) and only what is
new is emitted, holding back a trailing incomplete UTF-8 character and any ending that could be the start of a
stop string; once a stop string appears, the answer ends before the first one (it is never sent).
"""

from __future__ import annotations


class TextStream:
    def __init__(self, tokenizer, stop: str | list[str] | None = None):
        self.tokenizer = tokenizer
        self.stops = [stop] if isinstance(stop, str) else list(stop or [])
        self.ids: list[int] = []
        self.sent = 0  # characters of the decoded answer already emitted
        self.stopped = False

    def _text(self) -> str:
        return self.tokenizer.decode(self.ids, skip_special_tokens=True)

    def _cut(self, text: str) -> int | None:
        """Where the first stop string starts, or None."""
        hits = [text.index(s) for s in self.stops if s in text]
        return min(hits) if hits else None

    def add(self, token: int) -> str:
        """Append a token; returns the new text that is safe to send (possibly empty). Once a stop string is
        complete, `stopped` is True and the text before it has been returned."""
        self.ids.append(token)
        text = self._text()
        cut = self._cut(text)
        if cut is not None:
            self.stopped = True
            return self._take(text, cut)
        end = len(text.rstrip("\ufffd")) if text.endswith("\ufffd") else len(text)  # an incomplete UTF-8 char
        hold = 0
        for stop in self.stops:  # hold back an ending that may grow into a stop string
            for k in range(min(len(stop) - 1, end - self.sent), hold, -1):
                if text[end - k : end] == stop[:k]:
                    hold = k
                    break
        return self._take(text, end - hold)

    def flush(self) -> str:
        """The rest of the answer once it has ended (held-back characters included, up to a stop string)."""
        text = self._text()
        cut = self._cut(text)
        return self._take(text, len(text) if cut is None else cut)

    def _take(self, text: str, end: int) -> str:
        piece = text[self.sent : end] if end > self.sent else ""
        self.sent = max(self.sent, end)
        return piece

    @property
    def text(self) -> str:
        """The whole answer so far, cut before the first stop string."""
        text = self._text()
        cut = self._cut(text)
        return text if cut is None else text[:cut]
