"""The Triton python-backend model that serves a pkv-export engine (loaded by the repository's model.py).

Text in, text out: `text_input` (BYTES [1]) -> `text_output` (BYTES [1]) and `output_ids` (INT64 [-1]).
Request parameters: `max_new_tokens` (int, default from the model config) and `stop` (a string; the text is
cut before its first occurrence). Requests that Triton's dynamic batcher hands over together run as one
engine batch (left-padded; every prompt keeps its own KV budget, so each answer equals the engine's direct
output for that prompt alone). A bad request gets an error response; the others in the batch are unaffected.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

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

        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        engine_dir = Path(params.get("engine_dir", "engine"))
        if not engine_dir.is_absolute():
            engine_dir = Path(args["model_repository"]) / args["model_version"] / engine_dir
        self.engine = open_engine(engine_dir, device="auto")  # CUDA when onnxruntime-gpu sees a GPU
        self.default_new_tokens = int(params.get("default_max_new_tokens", "32"))
        self.limit = min(MAX_NEW_TOKENS_LIMIT, self.engine.spec.max_position_embeddings)

    def _parse(self, request) -> tuple[list[int], int, str | None]:
        tensor = pb_utils.get_input_tensor_by_name(request, "text_input")
        if tensor is None:
            raise RequestError("missing input 'text_input'")
        values = tensor.as_numpy().reshape(-1)
        if values.size != 1:
            raise RequestError(f"'text_input' must hold exactly one prompt (got {values.size})")
        raw = values[0]
        text = raw.decode("utf-8", errors="strict") if isinstance(raw, bytes) else str(raw)
        if not text.strip():
            raise RequestError("empty prompt")
        params = json.loads(request.parameters() or "{}")
        new_tokens = params.get("max_new_tokens", self.default_new_tokens)
        if isinstance(new_tokens, bool) or not isinstance(new_tokens, int) or not 1 <= new_tokens <= self.limit:
            raise RequestError(f"max_new_tokens must be an integer in [1, {self.limit}] (got {new_tokens!r})")
        stop = params.get("stop")
        if stop is not None and (not isinstance(stop, str) or not stop):
            raise RequestError("stop must be a non-empty string")
        ids = self.engine.tokenizer(text)["input_ids"]
        if len(ids) > self.engine.max_input_len:
            raise RequestError(f"prompt has {len(ids)} tokens, the engine accepts at most {self.engine.max_input_len}")
        return ids, new_tokens, stop

    def execute(self, requests: list) -> list:
        responses: list = [None] * len(requests)
        batch: list[tuple[int, list[int], int, str | None]] = []
        for k, request in enumerate(requests):
            try:
                ids, new_tokens, stop = self._parse(request)
            except (RequestError, UnicodeDecodeError, json.JSONDecodeError) as e:
                responses[k] = pb_utils.InferenceResponse(error=pb_utils.TritonError(str(e)))
                continue
            batch.append((k, ids, new_tokens, stop))
        if not batch:
            return responses
        try:
            result = self.engine.generate([ids for _, ids, _, _ in batch], max(n for _, _, n, _ in batch))
        except Exception as e:  # keep serving: a failing batch answers with errors, the server stays up
            for k, *_ in batch:
                responses[k] = pb_utils.InferenceResponse(error=pb_utils.TritonError(f"generation failed: {e}"))
            return responses
        for row, (k, _, new_tokens, stop) in enumerate(batch):
            tokens = result.tokens[row][:new_tokens]
            text = self.engine.tokenizer.decode(tokens, skip_special_tokens=True)
            if stop and stop in text:
                text = text[: text.index(stop)]
            responses[k] = pb_utils.InferenceResponse(output_tensors=[
                pb_utils.Tensor("text_output", np.array([[text.encode("utf-8")]], dtype=np.object_)),
                pb_utils.Tensor("output_ids", np.array([tokens], dtype=np.int64)),
            ])
        return responses

    def finalize(self) -> None:
        self.engine = None
