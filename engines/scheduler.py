"""In-flight (continuous) batching over fixed-size compressed slots, on the onnxruntime engine.

Requests wait in a FIFO queue; while a slot is free the oldest is prefilled alone (and compressed by the
engine's own prefill graph), its first token streamed, and its cache copied into a slot; then every step of the
decode loop advances every active sequence by one token in one batch. A sequence that produced EOS, reached its
`max_new_tokens` or was cancelled leaves at once, and its slot goes to the next waiting request. The decode binds
the first n rows of the slot pools (engines/slots.py) as the past and present of every layer, so the attention op
writes in place and a step allocates nothing; the bindings are made once per n.

Greedy answers equal the engine's own `generate` for the prompt alone, token for token, whatever else is in
flight: the prefill is the same graph at batch 1, and every decode row attends only to its own slots.

One scheduler thread runs the model; `submit` may be called from any thread; callbacks run on the scheduler
thread (keep them short: hand the token to a queue or a network send).
"""

from __future__ import annotations

import collections
import itertools
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from engines.slots import SlotPool
from exporter.slot_plan import SlotPlan, check_supported, plan_slots
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


class DecodeBatch:
    """The decode session bound to the first n rows of the pools (one per n, made when first needed)."""

    def __init__(self, engine, pool: SlotPool, n: int, tokens: np.ndarray, positions: np.ndarray,
                 logits: np.ndarray):
        import onnxruntime as ort

        def value(array: np.ndarray):
            return ort.OrtValue.ortvalue_from_numpy(array)  # CPU: shares the array's memory

        binding = engine.decode.io_binding()
        binding.bind_ortvalue_input("input_ids", value(tokens[:n]))
        binding.bind_ortvalue_input("position_ids", value(positions[:n]))
        self._values = []  # the OrtValues must outlive the binding
        for layer in range(len(pool.keys)):
            k, v = value(pool.keys[layer][:n]), value(pool.values[layer][:n])
            lengths = value(pool.lengths[layer, :n])
            binding.bind_ortvalue_input(f"past_key_values.{layer}.key", k)
            binding.bind_ortvalue_input(f"past_key_values.{layer}.value", v)
            binding.bind_ortvalue_input(f"past_lengths.{layer}", lengths)
            binding.bind_ortvalue_output(f"present.{layer}.key", k)  # written in place
            binding.bind_ortvalue_output(f"present.{layer}.value", v)
            self._values += [k, v, lengths]
            if pool.positions is not None:
                held = value(pool.positions[layer][:n])
                binding.bind_ortvalue_input(f"cache_positions.{layer}", held)
                self._values.append(held)
        out = value(logits[:n])
        binding.bind_ortvalue_output("logits", out)
        self._values.append(out)
        self.binding, self.session = binding, engine.decode

    def run(self) -> None:
        self.session.run_with_iobinding(self.binding)


class InflightScheduler:
    """Continuous batching for one onnxruntime engine on the CPU provider (see the module docstring)."""

    def __init__(self, engine, kv_memory: int, max_new_tokens: int = 256, max_queue: int = 1024,
                 start: bool = True):
        check_supported(engine.policy)
        if getattr(engine, "device_type", "cpu") != "cpu" or not getattr(engine, "in_place", False):
            raise UserInputError("in-flight batching runs onnxruntime-target engines on the CPU provider")
        self.engine = engine
        self.plan: SlotPlan = plan_slots(engine.policy, engine.spec.num_layers, int(engine.manifest["cache_heads"]),
                                         engine.spec.head_dim, engine.manifest["dtype"], engine.max_input_len,
                                         max_new_tokens, kv_memory)
        self.pool = SlotPool(self.plan, engine.windowed)
        s = self.plan.slots
        self._tokens = np.zeros((s, 1), np.int64)
        self._positions = np.zeros((s, 1), np.int64)
        self._logits = np.zeros((s, engine.spec.vocab_size), np.float32)
        self._batches: dict[int, DecodeBatch] = {}
        self._rows: list[Request] = []  # the request in each active row
        self._waiting: collections.deque[Request] = collections.deque()
        self._ids = itertools.count()
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._closed = False
        self.max_queue = max_queue
        self.steps = 0
        self._thread = threading.Thread(target=self._loop, name="pkv-scheduler", daemon=True)
        if start:
            self._thread.start()

    # ------------------------------------------------------------------ public

    def submit(self, prompt: list[int], max_new_tokens: int, on_token: TokenFn | None = None,
               on_done: DoneFn | None = None) -> Request:
        """Queue a request (token ids); refused at once, with the reason, when it can never be served."""
        if not prompt:
            raise RequestRefused("empty prompt")
        if len(prompt) > self.engine.max_input_len:
            raise RequestRefused(f"prompt has {len(prompt)} tokens, the engine accepts at most "
                                 f"{self.engine.max_input_len}")
        if not 1 <= max_new_tokens <= self.plan.max_new_tokens:
            raise RequestRefused(f"max_new_tokens must be in [1, {self.plan.max_new_tokens}] (the slots were sized "
                                 f"for {self.plan.max_new_tokens} new tokens)")
        if len(prompt) + max_new_tokens > self.engine.spec.max_position_embeddings:
            raise RequestRefused(f"{len(prompt)} prompt + {max_new_tokens} new tokens exceed the model's "
                                 f"{self.engine.spec.max_position_embeddings} positions")
        request = Request(next(self._ids), list(prompt), max_new_tokens, on_token, on_done)
        with self._wake:
            if self._closed:
                raise RequestRefused("the scheduler is shut down")
            if len(self._waiting) >= self.max_queue:
                raise RequestRefused(f"the queue is full ({self.max_queue} requests waiting)")
            self._waiting.append(request)
            self._wake.notify()
        return request

    def generate(self, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
        """Submit every prompt at once and wait: each row's greedy tokens (a convenience for tests and scripts)."""
        requests = [self.submit(p, max_new_tokens) for p in prompts]
        for r in requests:
            r.wait()
        errors = [r.error for r in requests if r.error]
        if errors:
            raise RuntimeError(errors[0])
        return [r.tokens for r in requests]

    def stats(self) -> dict:
        with self._lock:
            return {"slots_total": self.plan.slots, "slots_in_use": self.pool.active,
                    "kv_bytes_held": self.pool.bytes_held(), "kv_bytes_limit": self.plan.slots * self.plan.slot_bytes,
                    "queue_length": len(self._waiting), "decode_steps": self.steps}

    def close(self, timeout: float = 30.0) -> None:
        """Stop the loop; every unfinished request ends as cancelled."""
        with self._wake:
            self._closed = True
            self._wake.notify()
        if self._thread.is_alive():
            self._thread.join(timeout)

    # ------------------------------------------------------------------ the loop

    def _loop(self) -> None:
        while True:
            with self._wake:
                while not self._closed and not self._waiting and not self._rows:
                    self._wake.wait()
                if self._closed:
                    break
                admit = self._waiting.popleft() if self._waiting and self.pool.active < self.plan.slots else None
            try:
                if admit is not None:
                    self._admit(admit)  # one prefill per iteration: running sequences keep decoding between them
                self._drop_cancelled()
                if self._rows:
                    self._step()
            except Exception as e:  # noqa: BLE001 - a bug here must not leave every client waiting forever
                self._fail_all(f"scheduler error: {type(e).__name__}: {e}")
        with self._lock:
            leftovers = list(self._waiting) + list(self._rows)
            self._waiting.clear()
        for r in leftovers:
            self._finish(r, "cancelled")

    def _admit(self, request: Request) -> None:
        if request.cancelled:
            self._finish(request, "cancelled")
            return
        engine = self.engine
        ids = np.array([request.prompt], np.int64)
        try:
            out = engine.run_prefill(ids, np.ones_like(ids), np.arange(ids.shape[1])[None], 0)
            layers = range(engine.spec.num_layers)
            lengths = [int(out[f"kv_lengths.{i}"].numpy()[0]) for i in layers]
            keys = [out[f"present.{i}.key"].numpy()[0] for i in layers]
            values = [out[f"present.{i}.value"].numpy()[0] for i in layers]
            held = [out[f"kept_indices.{i}"].numpy()[0] for i in layers] if self.pool.positions is not None else None
            first = int(np.argmax(out["logits"].numpy()[0]))
        except Exception as e:  # noqa: BLE001 - a failed prefill fails its request, not the server
            self._finish(request, "error", f"prefill failed: {e}")
            return
        if self._emit(request, first):
            return
        with self._lock:
            row = self.pool.place(keys, values, lengths, held)
            self._rows.append(request)
        self._tokens[row, 0] = first
        self._positions[row, 0] = len(request.prompt)

    def _emit(self, request: Request, token: int) -> bool:
        """Record and stream a token; True when the request is finished by it."""
        request.tokens.append(token)
        request.token_times.append(time.perf_counter())
        if request.on_token:
            try:
                request.on_token(token)
            except StopGeneration:
                self._finish(request, "stop")
                return True
            except Exception:  # noqa: BLE001 - a client's callback failing (its connection gone) cancels it
                request.cancel()
        if token in self.engine.eos_ids:
            self._finish(request, "eos")
            return True
        if len(request.tokens) >= request.max_new_tokens:
            self._finish(request, "length")
            return True
        return False

    def _drop_cancelled(self) -> None:
        for row in range(len(self._rows) - 1, -1, -1):
            if self._rows[row].cancelled:
                request = self._rows[row]
                self._release(row)
                self._finish(request, "cancelled")

    def _release(self, row: int) -> None:
        with self._lock:
            moved = self.pool.release(row)
            last = self._rows.pop()
            if moved is not None:
                self._rows[row] = last
                self._tokens[row] = self._tokens[moved]
                self._positions[row] = self._positions[moved]

    def _step(self) -> None:
        n = len(self._rows)
        batch = self._batches.get(n)
        if batch is None:
            batch = self._batches[n] = DecodeBatch(self.engine, self.pool, n, self._tokens, self._positions,
                                                   self._logits)
        try:
            batch.run()
        except Exception as e:  # noqa: BLE001 - the step failed for every row: end them, keep serving
            self._fail_all(f"decode failed: {e}")
            return
        self.steps += 1
        self.pool.lengths[:, :n] += 1  # the token each row fed now sits in its cache
        self._positions[:n] += 1
        chosen = self._logits[:n].argmax(axis=-1)
        self._tokens[:n, 0] = chosen
        for row in range(n - 1, -1, -1):  # backwards: releasing a row moves the last one into it
            request = self._rows[row]
            if self._emit(request, int(chosen[row])):
                self._release(row)

    def _fail_all(self, message: str) -> None:
        """End every running sequence with an error and free the pools; the queue keeps waiting."""
        for row in range(len(self._rows) - 1, -1, -1):
            request = self._rows[row]
            self._release(row)
            self._finish(request, "error", message)

    def _finish(self, request: Request, reason: str, error: str | None = None) -> None:
        if request.done:
            return
        request.finish_reason, request.error = reason, error
        request._done.set()
        if request.on_done:
            try:
                request.on_done(reason, error)
            except Exception:  # noqa: BLE001 - a client gone while finishing changes nothing here
                pass
