"""The Triton python-backend model that serves a pkv-export engine (loaded by the repository's model.py).

Text in, text out: `text_input` (BYTES [1]) -> `text_output` (BYTES [1]), `output_ids` (INT64 [-1]) and, where
the config declares them (repositories written since they exist), `finish_reason` (eos, length, stop),
`prompt_tokens` and `completion_tokens`, as the in-flight model answers. Request parameters: `max_new_tokens`
(int, default from the model config), `stop` (a string, or a JSON list of up to 4; the answer ends before the
first one) and `add_special_tokens` (false for a prompt already rendered by a chat template). Requests that
Triton's dynamic batcher hands over together run as one engine batch (left-padded; every prompt keeps its own KV
budget, so each answer equals the engine's direct output for that prompt alone). A bad request gets an error
response (engines/triton_request.py: a refusal or a failure); the others in the batch are unaffected.

Compressed contexts (multi-turn; engines with `compress_context`, i.e. onnx): a request with the parameters
`context_id` and `store_context: true` prefills and compresses its text once and keeps the cache under that id
(`room`: question + answer tokens each later question may add, default 512; at most `max_contexts` ids per model
instance, parameter of config.pbtxt, default 16, the least recently used dropped first); it answers with a JSON
text {"context_id", "context_tokens", "kv_bytes"}. A request with `context_id` alone is a question about that
context: it is answered from a copy of the stored cache, without prefilling the context again. The store belongs
to one model instance: serve with one instance (the default) when clients use context ids.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from pathlib import Path

import numpy as np

from engines.base import question_ids
from engines.text_stream import TextStream
from engines.triton_request import error, flag, max_new_tokens, parameters, prompt_text, stop_strings
from engines.triton_stub import die_with_server
from pkv_core.errors import UserInputError

try:  # only importable inside Triton's python backend
    import triton_python_backend_utils as pb_utils
except ImportError:  # pragma: no cover - outside Triton the module is still importable for documentation
    pb_utils = None

MAX_NEW_TOKENS_LIMIT = 4096


class RequestError(Exception):
    pass


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        from engines.registry import open_engine

        die_with_server()
        config = json.loads(args["model_config"])
        self.outputs = {o["name"] for o in config.get("output", [])}
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        engine_dir = Path(params.get("engine_dir", "engine"))
        if not engine_dir.is_absolute():
            engine_dir = Path(args["model_repository"]) / args["model_version"] / engine_dir
        self.engine = open_engine(engine_dir, device="auto")  # CUDA when onnxruntime-gpu sees a GPU
        self.default_new_tokens = int(params.get("default_max_new_tokens", "32"))
        self.limit = min(MAX_NEW_TOKENS_LIMIT, self.engine.spec.max_position_embeddings)
        self.contexts: OrderedDict = OrderedDict()  # context_id -> ContextCache, least recently used first
        self.max_contexts = int(params.get("max_contexts", "16"))

    def _context_request(self, text: str, params: dict, new_tokens: int) -> tuple[str, list[int]]:
        """(text_output, output_ids) of a request that stores a context or asks about a stored one."""
        context_id = params["context_id"]
        if not isinstance(context_id, str) or not context_id or len(context_id) > 256:
            raise RequestError("context_id must be a non-empty string of at most 256 characters")
        if not hasattr(self.engine, "compress_context"):
            raise RequestError(f"this engine ({self.engine.name}) cannot keep compressed contexts")
        if flag(params, "store_context", False, RequestError):
            room = params.get("room", 512)
            if isinstance(room, bool) or not isinstance(room, int) or not 1 <= room <= self.limit:
                raise RequestError(f"room must be an integer in [1, {self.limit}] (got {room!r})")
            cache = self.engine.compress_context(text, room=room)  # the engine checks that it fits
            self.contexts.pop(context_id, None)
            self.contexts[context_id] = cache
            while len(self.contexts) > self.max_contexts:
                self.contexts.popitem(last=False)
            return json.dumps({"context_id": context_id, "context_tokens": cache.length,
                               "kv_bytes": cache.kv_bytes}), []
        cache = self.contexts.get(context_id)
        if cache is None:
            raise RequestError(f"unknown context_id {context_id!r} (store it first with store_context)")
        self.contexts.move_to_end(context_id)
        result = self.engine.answer(cache, text, new_tokens)
        return result.text[0], result.tokens[0]

    def _parse(self, request) -> tuple[list[int] | str, int, list[str] | None, dict]:
        text = prompt_text(request, RequestError)
        params = parameters(request, RequestError)
        new_tokens = max_new_tokens(params, self.default_new_tokens, self.limit, RequestError)
        stop = stop_strings(params, RequestError)
        special = flag(params, "add_special_tokens", True, RequestError)
        if "context_id" in params:  # tokenised where the context or the question is used
            return text, new_tokens, stop, params
        ids = self.engine.tokenizer(text, add_special_tokens=special)["input_ids"]
        if len(ids) > self.engine.max_input_len:
            raise RequestError(f"prompt has {len(ids)} tokens, the engine accepts at most {self.engine.max_input_len}")
        return ids, new_tokens, stop, params

    def execute(self, requests: list) -> list:
        responses: list = [None] * len(requests)
        batch: list[tuple[int, list[int], int, list[str] | None]] = []
        for k, request in enumerate(requests):
            try:
                ids, new_tokens, stop, params = self._parse(request)
                if "context_id" in params:  # one at a time: each has its own cache
                    text, tokens = self._context_request(ids, params, new_tokens)
                    responses[k] = (self._answer(tokens, stop, len(question_ids(self.engine.tokenizer, ids)))
                                    if tokens else self._text_response(text, []))  # an answer, or a stored context
                    continue
            except (RequestError, UserInputError) as e:
                responses[k] = pb_utils.InferenceResponse(error=error(str(e)))
                continue
            except Exception as e:  # a failing context request must not take the batch or the server down
                responses[k] = pb_utils.InferenceResponse(error=error(f"generation failed: {e}"))
                continue
            batch.append((k, ids, new_tokens, stop))
        if not batch:
            return responses
        try:
            result = self.engine.generate([ids for _, ids, _, _ in batch], max(n for _, _, n, _ in batch))
        except Exception as e:  # keep serving: a failing batch answers with errors, the server stays up
            for k, *_ in batch:
                responses[k] = pb_utils.InferenceResponse(error=error(f"generation failed: {e}"))
            return responses
        for row, (k, ids, new_tokens, stop) in enumerate(batch):
            responses[k] = self._answer(result.tokens[row][:new_tokens], stop, len(ids))
        return responses

    def _answer(self, tokens: list[int], stop: list[str] | None, prompt_tokens: int):
        """The response for generated tokens: the answer ends before the first stop string (the tokens with it),
        as the in-flight model's does."""
        text = TextStream(self.engine.tokenizer, stop)
        for token in tokens:
            text.add(token)
            if text.stopped:
                break
        ids = list(text.ids)
        reason = "stop" if text.stopped else "eos" if ids and ids[-1] in self.engine.eos_ids else "length"
        return self._text_response(text.text, ids, reason, prompt_tokens)

    def _text_response(self, text: str, tokens: list[int], reason: str = "length", prompt_tokens: int = 0):
        tensors = {"text_output": np.array([[text.encode("utf-8")]], dtype=np.object_),
                   "output_ids": np.array([tokens], dtype=np.int64),
                   "finish_reason": np.array([[reason.encode()]], dtype=np.object_),
                   "prompt_tokens": np.array([[prompt_tokens]], dtype=np.int64),
                   "completion_tokens": np.array([[len(tokens)]], dtype=np.int64)}
        return pb_utils.InferenceResponse(output_tensors=[  # only what the config declares (older repositories)
            pb_utils.Tensor(name, value) for name, value in tensors.items() if name in self.outputs])

    def finalize(self) -> None:
        self.engine = None
