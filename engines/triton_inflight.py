"""The Triton python-backend model for in-flight batching (decoupled: tokens are sent as they are produced).

`execute` only hands each request to the engine's `InflightScheduler` (engines/scheduler.py) and returns; the
scheduler thread prefills, decodes every active sequence one token per step, and the callbacks here send the
responses through each request's response sender. Inputs and parameters as the static model
(engines/triton_model.py): `text_input` (BYTES [1]), `max_new_tokens`, `stop` (a string, or a JSON list of up to 4),
`add_special_tokens` (false for a prompt already rendered by a chat template), `ignore_eos` (true: generate
`max_new_tokens` tokens whatever comes, as benchmarks want), and `stream` (true: one response
per token as it is produced, with the text it completes (empty while a character or a possible stop string is
incomplete), then a final one; false: one response with the whole answer). Every final
response carries `finish_reason` (eos, length, stop, cancelled) and the token counts `prompt_tokens` /
`completion_tokens`. A request whose client went away (Triton marks it cancelled) leaves its slot at the next
step. A request with the parameter `status: true` is answered at once with the scheduler's numbers as JSON; the
same numbers are Prometheus gauges on the metrics port (`pkv_slots_in_use`, `pkv_slots_total`,
`pkv_kv_bytes_held`, `pkv_kv_bytes_limit`, `pkv_queue_length`, `pkv_prefilling`, labelled by model).

Config parameters (config.pbtxt, written by `pkv-export triton --batching inflight`): `engine_dir`,
`kv_memory` (bytes the slots and the chunked prefills' staging caches may hold), `max_new_tokens` (the most a
request may ask for: the slots' size), `default_max_new_tokens`, `step_tokens` (the scheduler's per-step token
budget; 0 prefills every prompt whole).
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np

from engines.scheduler import DEFAULT_STEP_TOKENS, InflightScheduler, RequestRefused, StopGeneration
from engines.text_stream import TextStream
from engines.triton_request import error, flag, max_new_tokens, parameters, prompt_text, stop_strings
from engines.triton_stub import die_with_server

try:  # only importable inside Triton's python backend
    import triton_python_backend_utils as pb_utils
except ImportError:  # pragma: no cover - outside Triton the module is still importable for documentation
    pb_utils = None

GAUGES = {"slots_in_use": "sequences holding a KV slot", "slots_total": "KV slots the memory holds",
          "kv_bytes_held": "bytes of the slots in use and of the staging caches of prompts in flight",
          "kv_bytes_limit": "bytes the slots and staging caches may hold (--kv-memory)",
          "queue_length": "requests waiting for a slot",
          "prefilling": "prompts being prefilled in chunks (their slot reserved)"}


class BadRequest(Exception):
    pass


class Live:
    """One request in flight: its Triton request and response sender, its text stream, its scheduler handle."""

    def __init__(self, triton_request, tokenizer, prompt_tokens: int, stream: bool, stop: list[str] | None):
        self.triton_request = triton_request
        self.sender = triton_request.get_response_sender()
        self.text = TextStream(tokenizer, stop)
        self.prompt_tokens, self.stream = prompt_tokens, stream
        self.handle = None


def _response(text: str, ids: list[int], finish_reason: str = "", prompt_tokens: int = 0,
              completion_tokens: int = 0):
    return pb_utils.InferenceResponse(output_tensors=[
        pb_utils.Tensor("text_output", np.array([text.encode("utf-8")], dtype=np.object_)),
        pb_utils.Tensor("output_ids", np.array(ids, dtype=np.int64)),
        pb_utils.Tensor("finish_reason", np.array([finish_reason.encode()], dtype=np.object_)),
        pb_utils.Tensor("prompt_tokens", np.array([prompt_tokens], dtype=np.int64)),
        pb_utils.Tensor("completion_tokens", np.array([completion_tokens], dtype=np.int64)),
    ])


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        from engines.registry import open_engine

        die_with_server()
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        engine_dir = Path(params.get("engine_dir", "engine"))
        if not engine_dir.is_absolute():
            engine_dir = Path(args["model_repository"]) / args["model_version"] / engine_dir
        self.engine = open_engine(engine_dir, device="cpu")
        self.scheduler = InflightScheduler(self.engine, int(params["kv_memory"]), int(params["max_new_tokens"]),
                                           step_tokens=int(params.get("step_tokens", DEFAULT_STEP_TOKENS)))
        self.default_new_tokens = min(int(params.get("default_max_new_tokens", "32")),
                                      self.scheduler.plan.max_new_tokens)
        self.live: dict[int, Live] = {}
        self.lock = threading.Lock()
        name = args["model_name"]
        # The families must outlive their metrics (the backend refuses a metric whose family was collected).
        self.families = {key: pb_utils.MetricFamily(name=f"pkv_{key}", description=text,
                                                    kind=pb_utils.MetricFamily.GAUGE) for key, text in GAUGES.items()}
        self.gauges = {key: family.Metric(labels={"model": name}) for key, family in self.families.items()}
        self.stopping = threading.Event()
        self.watcher = threading.Thread(target=self._watch, name="pkv-watch", daemon=True)
        self.watcher.start()

    # ------------------------------------------------------------------ requests

    def _parse(self, request) -> tuple[list[int], int, list[str] | None, bool, dict]:
        params = parameters(request, BadRequest)
        if flag(params, "status", False, BadRequest):
            return [], 0, None, False, params
        text = prompt_text(request, BadRequest)
        new_tokens = max_new_tokens(params, self.default_new_tokens, self.scheduler.plan.max_new_tokens, BadRequest)
        stops = stop_strings(params, BadRequest)
        special = flag(params, "add_special_tokens", True, BadRequest)
        stream = flag(params, "stream", False, BadRequest)
        flag(params, "ignore_eos", False, BadRequest)  # checked here; the scheduler reads it
        if "context_id" in params:
            raise BadRequest("compressed contexts (context_id) are served by --batching static models")
        return self.engine.tokenizer(text, add_special_tokens=special)["input_ids"], new_tokens, stops, stream, params

    def execute(self, requests: list) -> None:
        for request in requests:
            try:
                ids, new_tokens, stop, stream, params = self._parse(request)
            except BadRequest as e:
                self._fail(request.get_response_sender(), str(e))
                continue
            if params.get("status") is True:
                sender = request.get_response_sender()
                stats = json.dumps(self.scheduler.stats())
                sender.send(_response(stats, []), flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
                continue
            live = Live(request, self.engine.tokenizer, len(ids), stream, stop)
            try:
                with self.lock:
                    live.handle = self.scheduler.submit(ids, new_tokens, on_token=self._on_token(live),
                                                        on_done=self._on_done(live),
                                                        ignore_eos=params.get("ignore_eos", False))
                    self.live[live.handle.id] = live
            except RequestRefused as e:
                self._fail(live.sender, str(e))
        return None

    def _on_token(self, live: Live):
        def on_token(token: int) -> None:
            piece = live.text.add(token)
            if live.text.stopped:
                if live.stream and piece:
                    live.sender.send(_response(piece, []))  # the stop string's token is not part of the answer
                raise StopGeneration
            if live.stream:  # every token as it is produced; its text may still be held back (empty piece)
                live.sender.send(_response(piece, [token]))

        return on_token

    def _on_done(self, live: Live):
        def on_done(reason: str, error: str | None) -> None:
            with self.lock:
                if live.handle is not None:
                    self.live.pop(live.handle.id, None)
            final = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
            if reason == "error":
                self._fail(live.sender, error or "generation failed")
                return
            rest = live.text.flush()  # streamed: what was held back; whole: the answer, cut at a stop string
            text, ids = (rest, []) if live.stream else (live.text.text, list(live.text.ids))
            live.sender.send(_response(text, ids, reason, live.prompt_tokens, len(live.text.ids)), flags=final)

        return on_done

    @staticmethod
    def _fail(sender, message: str) -> None:
        """The request's final response: an error, a refusal or a failure by its message (triton_request.error)."""
        sender.send(pb_utils.InferenceResponse(error=error(message)),
                    flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)

    # ------------------------------------------------------------------ housekeeping

    def _watch(self) -> None:
        """Every 50 ms: cancel the sequences whose client went away; publish the gauges."""
        while not self.stopping.wait(0.05):
            try:
                with self.lock:
                    gone = [live for live in self.live.values() if live.triton_request.is_cancelled()]
                for live in gone:
                    live.handle.cancel()
                for key, value in self.scheduler.stats().items():
                    if key in self.gauges:
                        self.gauges[key].set(value)
            except Exception as e:  # noqa: BLE001 - keep watching; the server log says what went wrong
                print(f"pkv in-flight model: watcher: {e}", flush=True)

    def finalize(self) -> None:
        self.stopping.set()
        self.watcher.join(5)
        self.scheduler.close()
        self.gauges = {}
        self.engine = None
