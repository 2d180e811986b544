"""A request to the in-flight scheduler (engines/scheduler.py): its prompt, its callbacks, what it produced."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from pkv_core.errors import UserInputError

TokenFn = Callable[[int], None]  # a generated token id; may raise StopGeneration
DoneFn = Callable[[str, str | None], None]  # (finish reason: eos | length | stop | cancelled | error, error)


class StopGeneration(Exception):  # noqa: N818 - a signal, not an error
    """Raised by an `on_token` callback to end its request after this token (a stop string was produced)."""


class RequestRefused(UserInputError):
    """The request can never be served by this scheduler (too long, too many new tokens, a closed scheduler)."""


@dataclass
class Request:
    """A submitted request. `tokens` grows as the scheduler generates; `cancel()` ends it at the next step."""

    id: int
    prompt: list[int]
    max_new_tokens: int
    on_token: TokenFn | None = None
    on_done: DoneFn | None = None
    ignore_eos: bool = False  # generate max_new_tokens whatever comes (benchmarks)
    tokens: list[int] = field(default_factory=list)
    submitted: float = field(default_factory=time.perf_counter)
    token_times: list[float] = field(default_factory=list)
    finish_reason: str | None = None
    error: str | None = None
    _cancel: threading.Event = field(default_factory=threading.Event)
    _done: threading.Event = field(default_factory=threading.Event)

    def cancel(self) -> None:
        self._cancel.set()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        return self._done.wait(timeout)

    @property
    def done(self) -> bool:
        return self._done.is_set()
