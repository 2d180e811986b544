"""In-flight (continuous) batching over fixed-size compressed slots, on the onnxruntime engine.

Requests wait in a FIFO queue. Every step of the loop advances every running sequence by one token in one batch
and gives the rest of a per-step token budget (`step_tokens`; engines/step_budget.py says how) to the next chunk
of one prompt waiting for its first token (the oldest, or every other step the next in line), in the same graph
run as the decode (engines/mixed_step.py): a long prompt is prefilled over several steps
(engines/chunked_prefill.py) while the running streams keep their pace. When its last chunk is done the method
compresses its cache (the kept sets of a whole prefill), its first token is streamed and it joins the decode
batch. A sequence that produced EOS, reached its `max_new_tokens` or was cancelled leaves at once, and its slot
goes to the next waiting request. The
decode binds the first n rows of the slot pools (engines/slots.py) as the past and present of every layer, so the
attention op writes in place and a step allocates nothing; the bindings are made once per n.

Memory (`kv_memory`): a prompt's slot is reserved when its first chunk starts. FullKV's chunks write into that
slot; a compressing method's chunks build the prompt's uncompressed cache beside the pools (its staging cache, 2 x
layers x KV heads x prompt tokens x head_dim x itemsize), which counts as held until the last chunk. A prompt starts
only when its slot and its staging cache fit beside everything held (slots in use or reserved, other prompts'
staging); otherwise it waits, and nothing overtakes it. When a staging cache starts, the free slots' pages are
handed back to the system (SlotPool.trim): slots and staging caches never hold more than `kv_memory`. A prompt
whose staging cache could never fit, every prompt of an engine without the chunk graphs (built before them, or
H2O, whose scores need every query), and every prompt when `step_tokens` is 0 are prefilled whole, one per step.

Greedy answers equal the engine's own `generate` for the prompt alone, token for token, whatever else is in
flight: the prefill is the same graph at batch 1 (or its chunks, equal to it), and every decode row attends only
to its own slots.

One scheduler thread runs the model; `submit` may be called from any thread; callbacks run on the scheduler
thread (keep them short: hand the token to a queue or a network send).
"""

from __future__ import annotations

import collections
import itertools
import threading
import time
from dataclasses import dataclass

import numpy as np

from engines.chunked_prefill import ChunkedPrefill, Prefilled, prefill_whole, staging_bytes
from engines.inflight_request import DoneFn, Request, RequestRefused, StopGeneration, TokenFn
from engines.mixed_step import run_mixed
from engines.slots import SlotPool
from engines.step_budget import chunk_tokens, prefill_budget, whose_turn
from exporter.slot_plan import DEFAULT_STEP_TOKENS, SlotPlan, check_supported, plan_slots
from pkv_core.errors import UserInputError

__all__ = ["InflightScheduler", "Request", "RequestRefused", "StopGeneration", "DEFAULT_STEP_TOKENS"]


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


@dataclass
class Prefilling:
    """A prompt in flight: its chunks so far, the staging bytes it holds, its reserved pool row (FullKV)."""

    request: Request
    run: ChunkedPrefill
    staging: int
    row: int | None


class InflightScheduler:
    """Continuous batching for one onnxruntime engine on the CPU provider (see the module docstring)."""

    def __init__(self, engine, kv_memory: int, max_new_tokens: int = 256, max_queue: int = 1024,
                 start: bool = True, step_tokens: int = DEFAULT_STEP_TOKENS):
        check_supported(engine.policy)
        if getattr(engine, "device_type", "cpu") != "cpu" or not getattr(engine, "in_place", False):
            raise UserInputError("in-flight batching runs onnxruntime-target engines on the CPU provider")
        if step_tokens < 0:
            raise UserInputError(f"--step-tokens must be at least 0 (0: prefill every prompt whole; got {step_tokens})")
        self.engine = engine
        self.plan: SlotPlan = plan_slots(engine.policy, engine.spec.num_layers, int(engine.manifest["cache_heads"]),
                                         engine.spec.head_dim, engine.manifest["dtype"], engine.max_input_len,
                                         max_new_tokens, kv_memory)
        self.kv_memory, self.step_tokens = kv_memory, step_tokens
        self.chunking = step_tokens > 0 and getattr(engine, "chunkable", False)
        # a step with decodes and a chunk runs both in one graph (engines/mixed_step.py) where the engine has it
        self.mixing = self.chunking and engine.chunk_sessions()["mixed"] is not None  # (sessions loaded now)
        self._window = engine.policy.window if engine.policy.compresses else 0
        self.pool = SlotPool(self.plan, engine.windowed)
        s = self.plan.slots
        self._tokens = np.zeros((s, 1), np.int64)
        self._positions = np.zeros((s, 1), np.int64)
        self._logits = np.zeros((s, engine.spec.vocab_size), np.float32)
        self._batches: dict[int, DecodeBatch] = {}
        self._rows: list[Request] = []  # the request in each active row
        self._waiting: collections.deque[Request] = collections.deque()
        self._prefilling: list[Prefilling] = []  # oldest first
        self._whole = 0  # slots reserved by the whole prefills of this step
        self._staging = 0  # bytes of the staging caches in flight
        self._turns = 0  # steps that had prompt work (engines.step_budget.whose_turn)
        self._ids = itertools.count()
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._closed = False
        self.max_queue = max_queue
        self.steps = 0
        self.prefill_tokens = 0
        # steps run and their seconds, with and without prompt work (cumulative, like Prometheus counters)
        self._step_totals = {"decode_only_steps": 0, "decode_only_seconds": 0.0, "mixed_steps": 0, "mixed_seconds": 0.0}
        self._thread = threading.Thread(target=self._loop, name="pkv-scheduler", daemon=True)
        if start:
            self._thread.start()

    # ------------------------------------------------------------------ public

    def submit(self, prompt: list[int], max_new_tokens: int, on_token: TokenFn | None = None,
               on_done: DoneFn | None = None, ignore_eos: bool = False) -> Request:
        """Queue a request (token ids); refused at once, with the reason, when it can never be served.
        `ignore_eos`: generate exactly max_new_tokens (benchmarks: every request the same length)."""
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
        request = Request(next(self._ids), list(prompt), max_new_tokens, on_token, on_done, ignore_eos=ignore_eos)
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
        """Slots in use (running or reserved by a prompt in flight), KV bytes held (those slots and the staging
        caches) against the limit, the queue, prompts in flight, and counters: decode steps, prompt tokens
        prefilled, loop steps with and without prompt work and their seconds (differences over a period give its
        mean step times)."""
        with self._lock:
            return {"slots_total": self.plan.slots, "slots_in_use": self.pool.active + self._reserved(),
                    "kv_bytes_held": self._held(), "kv_bytes_limit": self.kv_memory,
                    "queue_length": len(self._waiting), "prefilling": len(self._prefilling),
                    "staging_bytes": self._staging, "decode_steps": self.steps, "prefill_tokens": self.prefill_tokens,
                    "step_tokens": self.step_tokens if self.chunking else 0, **self._step_totals}

    def close(self, timeout: float = 30.0) -> None:
        """Stop the loop; every unfinished request ends as cancelled."""
        with self._wake:
            self._closed = True
            self._wake.notify()
        if self._thread.is_alive():
            self._thread.join(timeout)

    # ------------------------------------------------------------------ memory

    def _reserved(self) -> int:
        return len(self._prefilling) + self._whole

    def _held(self) -> int:
        return (self.pool.active + self._reserved()) * self.plan.slot_bytes + self._staging

    def _fits(self, staging: int) -> bool:
        """Whether one more slot and `staging` bytes fit beside everything held (under the lock)."""
        return (self.pool.active + self._reserved() < self.plan.slots
                and self._held() + self.plan.slot_bytes + staging <= self.kv_memory)

    # ------------------------------------------------------------------ the loop

    def _loop(self) -> None:
        while True:
            with self._wake:
                while not self._closed and not self._waiting and not self._rows and not self._prefilling:
                    self._wake.wait()
                if self._closed:
                    break
                work, dropped = self._plan()
            t0 = time.perf_counter()
            try:
                for request in dropped:
                    self._finish(request, "cancelled")
                self._drop_cancelled()
                mixed = self._mixable(work)
                if mixed is not None:  # the oldest prompt's chunk rides with the decode of every running row
                    work.remove(mixed)
                    self._mixed_step(*mixed)
                for item, n in work:
                    try:
                        if n is None:
                            self._prefill_whole(item)
                        else:
                            self._advance(item, n)
                    except Exception as e:  # noqa: BLE001 - that prompt fails; the others and the decodes go on
                        message = f"prefill failed: {type(e).__name__}: {e}"
                        if n is None:
                            self._finish(item, "error", message)
                        else:
                            self._drop_prefilling(item, "error", message)
                self._drop_cancelled()
                if self._rows and mixed is None:
                    self._step()
            except Exception as e:  # noqa: BLE001 - a bug here must not leave every client waiting forever
                self._fail_all(f"scheduler error: {type(e).__name__}: {e}", prefilling=True)
            kind = "mixed" if work or mixed is not None else "decode_only"
            with self._lock:
                self._step_totals[kind + "_steps"] += 1
                self._step_totals[kind + "_seconds"] += time.perf_counter() - t0
        with self._lock:
            leftovers = list(self._waiting) + list(self._rows) + [p.request for p in self._prefilling]
            self._waiting.clear()
            self._prefilling.clear()
        for r in leftovers:
            self._finish(r, "cancelled")

    def _plan(self) -> tuple[list[tuple[Request | Prefilling, int | None]], list[Request]]:
        """This step's prompt work (under the lock): [(prompt in flight, chunk tokens) or (request, None): a whole
        prefill], and the queued requests found cancelled."""
        work, dropped = [], []
        if not self.chunking:  # one whole prefill per step while a slot is free
            while self._waiting and self._waiting[0].cancelled:
                dropped.append(self._waiting.popleft())
            if self._waiting and self._fits(0):
                self._whole += 1
                work.append((self._waiting.popleft(), None))
            return work, dropped
        while self._waiting and self._waiting[0].cancelled:
            dropped.append(self._waiting.popleft())
        line = [*self._prefilling, *([self._waiting[0]] if self._waiting else [])]  # oldest first; the head may start
        if not line:
            return work, dropped
        # With nothing decoding there is no stream to keep: the chosen prompt is prefilled at once (on a CPU every
        # chunk costs a pass over the weights and the graph's fixed overhead).
        left = prefill_budget(self.step_tokens, len(self._rows)) if self._rows else None
        chosen = line[whose_turn(self._turns, len(line))]
        self._turns += 1
        if isinstance(chosen, Request):
            item = self._admit(chosen, left)
            if item is not None:
                return [item], dropped
            if not self._prefilling:
                return work, dropped  # the head waits for memory, and nothing overtakes it
            chosen = self._prefilling[0]
        return [(chosen, chunk_tokens(chosen.run.remaining, left or chosen.run.remaining, self._window))], dropped

    def _admit(self, head: Request, left: int | None) -> tuple[Request | Prefilling, int | None] | None:
        """Start the queue's head if its slot (and staging cache) fit (under the lock): its first chunk of at most
        `left` tokens, or a whole prefill when `left` is None (nothing decodes) or its staging cache could never
        fit beside one slot. None: it waits."""
        staging = staging_bytes(self.engine, len(head.prompt))
        chunked = left is not None and staging + self.plan.slot_bytes <= self.kv_memory
        if not self._fits(staging if chunked else 0):
            return None
        self._waiting.popleft()
        if not chunked:
            self._whole += 1
            return head, None
        prefilling = self._start(head, staging)
        return prefilling, chunk_tokens(len(head.prompt), left, self._window)

    def _start(self, request: Request, staging: int) -> Prefilling:
        """Reserve a prompt's slot (FullKV: a pool row its chunks write into) and its staging cache (under the lock)."""
        row, cache = None, None
        if staging == 0:
            row = self.pool.reserve()
            cache = ([k[row : row + 1] for k in self.pool.keys], [v[row : row + 1] for v in self.pool.values])
        else:
            self.pool.trim()  # the free slots' pages make the staging cache's room
        prefilling = Prefilling(request, ChunkedPrefill(self.engine, request.prompt, cache), staging, row)
        self._prefilling.append(prefilling)
        self._staging += staging
        return prefilling

    def _mixable(self, work: list) -> tuple[Prefilling, int] | None:
        """The first chunk of this step's work, when it can run with the decode (rows running, a mixed graph)."""
        if not self.mixing or not self._rows:
            return None
        return next(((p, n) for p, n in work if n is not None and not p.request.cancelled), None)

    def _mixed_step(self, p: Prefilling, n: int) -> None:
        rows = len(self._rows)
        try:
            run_mixed(self.engine, self.pool, rows, self._tokens, self._positions, self._logits, p.run, n)
        except Exception as e:  # noqa: BLE001 - the step failed for every row and the prompt: end them, keep serving
            self._fail_all(f"decode failed: {e}")
            self._drop_prefilling(p, "error", f"prefill failed: {e}")
            return
        self._chunk_ran(p, n)
        self._decoded(rows)
        self._after_chunk(p)

    def _advance(self, p: Prefilling, n: int) -> None:
        """Run a prompt's next chunk; after its last, its first token, and its cache into its slot."""
        if p.request.cancelled:
            self._drop_prefilling(p, "cancelled")
            return
        try:
            p.run.advance(n)
        except Exception as e:  # noqa: BLE001 - a failed prefill fails its request, not the server
            self._drop_prefilling(p, "error", f"prefill failed: {e}")
            return
        self._chunk_ran(p, n)
        self._after_chunk(p)

    def _chunk_ran(self, p: Prefilling, n: int) -> None:
        self.prefill_tokens += n
        if p.row is not None:
            self.pool.lengths[:, p.row] = p.run.done

    def _after_chunk(self, p: Prefilling) -> None:
        """After a prompt's last chunk: the selection, its first token, its cache into its slot."""
        if p.run.remaining:
            return
        try:
            done = p.run.finish()
        except Exception as e:  # noqa: BLE001 - a failed prefill fails its request, not the server
            self._drop_prefilling(p, "error", f"prefill failed: {e}")
            return
        first = int(np.argmax(done.logits))
        if self._emit(p.request, first):
            self._drop_prefilling(p, None)
            return
        with self._lock:
            self._prefilling.remove(p)
            self._staging -= p.staging
            if p.row is None:
                self._place(p.request, done, first)
                return
            row, moved = self.pool.activate(p.row, done.kept if self.pool.positions is not None else None)
            self._rebind(moved)
            self._join(p.request, row, first)

    def _prefill_whole(self, request: Request) -> None:
        try:
            if request.cancelled:
                self._finish(request, "cancelled")
                return
            try:
                done = prefill_whole(self.engine, request.prompt)
            except Exception as e:  # noqa: BLE001 - a failed prefill fails its request, not the server
                self._finish(request, "error", f"prefill failed: {e}")
                return
            self.prefill_tokens += len(request.prompt)
            first = int(np.argmax(done.logits))
            if self._emit(request, first):
                return
            with self._lock:
                self._place(request, done, first)
        finally:
            with self._lock:
                self._whole -= 1

    def _place(self, request: Request, done: Prefilled, first: int) -> None:
        """Copy a prefilled prompt into the next row and add it to the decode batch (under the lock)."""
        self._rebind(self.pool.clear_next_row())
        row = self.pool.place(done.keys, done.values, done.lengths,
                              done.kept if self.pool.positions is not None else None)
        self._join(request, row, first)

    def _join(self, request: Request, row: int, first: int) -> None:
        self._rows.append(request)
        self._tokens[row, 0] = first
        self._positions[row, 0] = len(request.prompt)

    def _rebind(self, moved: tuple[int, int] | None) -> None:
        """Point the chunks of the prompt whose reserved row moved (from, to) at its new row."""
        if moved is None:
            return
        source, target = moved
        for p in self._prefilling:
            if p.row == source:
                p.row = target
                p.run.bind([k[target : target + 1] for k in self.pool.keys],
                           [v[target : target + 1] for v in self.pool.values])

    def _drop_prefilling(self, p: Prefilling, reason: str | None, error: str | None = None) -> None:
        with self._lock:
            if p in self._prefilling:
                self._prefilling.remove(p)
                self._staging -= p.staging
                if p.row is not None:
                    self.pool.unreserve(p.row)
        if reason is not None:
            self._finish(p.request, reason, error)

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
        if token in self.engine.eos_ids and not request.ignore_eos:
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
        for p in [p for p in self._prefilling if p.request.cancelled]:
            self._drop_prefilling(p, "cancelled")

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
        self._decoded(n)

    def _decoded(self, n: int) -> None:
        """After a decode of rows [0, n): every row's next token, streamed; finished rows leave."""
        self.steps += 1
        self.pool.lengths[:, :n] += 1  # the token each row fed now sits in its cache
        self._positions[:n] += 1
        chosen = self._logits[:n].argmax(axis=-1)
        self._tokens[:n, 0] = chosen
        for row in range(n - 1, -1, -1):  # backwards: releasing a row moves the last one into it
            request = self._rows[row]
            if self._emit(request, int(chosen[row])):
                self._release(row)

    def _fail_all(self, message: str, prefilling: bool = False) -> None:
        """End every running sequence (and with `prefilling`, every prompt in flight) with an error and free
        their memory; the queue keeps waiting."""
        for row in range(len(self._rows) - 1, -1, -1):
            request = self._rows[row]
            self._release(row)
            self._finish(request, "error", message)
        for p in list(self._prefilling) if prefilling else []:
            self._drop_prefilling(p, "error", message)

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
