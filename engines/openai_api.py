"""An OpenAI-compatible endpoint in front of the Triton server (`pkv-export serve --openai-port N`).

A small FastAPI application (run by uvicorn) that turns `/v1/completions` and `/v1/chat/completions` requests
into streamed gRPC requests to the in-flight Triton models (tritonclient's asyncio client), or one gRPC request to
a static model (Triton's dynamic batcher: KVzip, PyramidInfer, TensorRT engines; its answer then comes as one
piece), and their responses back into OpenAI's JSON or server-sent events (`stream: true`, ending with
`data: [DONE]`; a request refused before its first piece is an HTTP error, a failure after it an `error` event
before `[DONE]`). Chat messages are
rendered with the engine's own chat template (refused when it has none). Decoding is greedy: sampling
parameters (temperature, top_p, ...) are accepted and ignored; `n` > 1, `logprobs` and `echo` are refused.
`stop` takes a string or up to 4; the answer ends before the first one produced. A client that disconnects
cancels its request, which frees its KV slot. `usage` counts prompt and completion tokens (the final chunk of
a stream carries it when `stream_options.include_usage` is set).
"""

# No `from __future__ import annotations`: FastAPI reads the routes' parameter annotations (`request: Request`, a
# name local to make_app) as real classes.
import json
import time
import uuid
from pathlib import Path

from engines.triton_request import MAX_STOPS, is_failure
from pkv_core.errors import UserInputError


class ApiError(Exception):
    def __init__(self, message: str, status: int = 400, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.kind = status, kind


def _stops(value) -> list[str]:
    if value is None:
        return []
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops) or len(stops) > MAX_STOPS:
        raise ApiError(f"stop must be a non-empty string or a list of at most {MAX_STOPS} of them")
    return stops


def _max_tokens(body: dict, default: int) -> int:
    value = body.get("max_completion_tokens", body.get("max_tokens", default))
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ApiError("max_tokens must be a positive integer")
    return value


def _check_unsupported(body: dict) -> None:
    if body.get("n", 1) != 1:
        raise ApiError("n must be 1: this server decodes greedily, one answer per request")
    for key in ("logprobs", "echo", "best_of", "suffix"):
        if body.get(key) not in (None, False, 1 if key == "best_of" else None):
            raise ApiError(f"{key} is not supported by this server")


class Models:
    """The served models: name -> engine directory, with each engine's tokenizer (chat template, counts)."""

    def __init__(self, engines: dict[str, Path]):
        from transformers import AutoTokenizer

        from exporter.engine_dir import read_manifest

        self.tokenizers = {}
        for name, engine in engines.items():
            manifest = read_manifest(Path(engine))
            self.tokenizers[name] = AutoTokenizer.from_pretrained(str(Path(engine) / manifest["tokenizer"]),
                                                                  local_files_only=True, trust_remote_code=False)

    def tokenizer(self, name: str):
        if name not in self.tokenizers:
            raise ApiError(f"The model '{name}' does not exist", 404, "not_found_error")
        return self.tokenizers[name]


def _api_error(message: str) -> ApiError:
    """A Triton error as the API's: the model's failures are the server's (500), the rest refusals (400)."""
    failed = is_failure(message)
    return ApiError(message, 500 if failed else 400, "server_error" if failed else "invalid_request_error")


def _first(result, name: str):
    value = result.as_numpy(name)
    return None if value is None or not value.size else value.reshape(-1)[0]


async def _decoupled(client, model: str, cache: dict) -> bool:
    """Whether the Triton model streams (in-flight) or answers once (static); asked once per model."""
    if model not in cache:
        from tritonclient.utils import InferenceServerException

        try:
            config = await client.get_model_config(model)
        except InferenceServerException as e:
            raise _api_error(e.message()) from None
        cache[model] = bool(config.config.model_transaction_policy.decoupled)
    return cache[model]


async def _generate_once(client, model: str, prompt: str, params: dict):
    """A static model's one answer as the stream's only item: (text, final)."""
    import numpy as np
    import tritonclient.grpc.aio as grpcclient
    from tritonclient.utils import InferenceServerException

    text_input = grpcclient.InferInput("text_input", [1, 1], "BYTES")  # the batch dimension of a batching model
    text_input.set_data_from_numpy(np.array([[prompt.encode("utf-8")]], dtype=np.object_))
    static = {k: v for k, v in params.items() if k != "stream"}
    try:
        result = await client.infer(model, [text_input], parameters=static)
    except InferenceServerException as e:
        raise _api_error(e.message()) from None
    ids = result.as_numpy("output_ids")
    completion = int(ids.size) if ids is not None else 0
    reason, prompt_tokens = _first(result, "finish_reason"), _first(result, "prompt_tokens")
    if reason is None:  # a repository written before static models said why they stopped
        reason = b"length" if completion >= params["max_new_tokens"] else b"stop"
    final = {"finish_reason": reason.decode(), "completion_tokens": completion,
             "prompt_tokens": None if prompt_tokens is None else int(prompt_tokens)}
    yield _first(result, "text_output").decode("utf-8"), final


async def _generate(url: str, model: str, prompt: str, params: dict, modes: dict):
    """Yield (text piece, final) from the Triton model's stream; final = {finish_reason, prompt_tokens,
    completion_tokens} on the last response. Leaving the generator early (client gone, stop found) closes the
    stream, which cancels the request on the server. `modes` caches which models are decoupled."""
    import numpy as np
    import tritonclient.grpc.aio as grpcclient

    client = grpcclient.InferenceServerClient(url)
    try:
        static = not await _decoupled(client, model, modes)
    except BaseException:
        await client.close()
        raise
    if static:
        try:
            async for item in _generate_once(client, model, prompt, params):
                yield item
        finally:
            await client.close()
        return
    text_input = grpcclient.InferInput("text_input", [1], "BYTES")
    text_input.set_data_from_numpy(np.array([prompt.encode("utf-8")], dtype=np.object_))

    async def requests():
        yield {"model_name": model, "inputs": [text_input], "parameters": params,
               "enable_empty_final_response": True}

    stream = client.stream_infer(requests())
    try:
        async for result, error in stream:
            if error is not None:
                raise _api_error(error.message() if hasattr(error, "message") else str(error))
            piece = result.as_numpy("text_output")
            text = piece.reshape(-1)[0].decode("utf-8") if piece is not None and piece.size else ""
            reason = result.as_numpy("finish_reason")
            reason = reason.reshape(-1)[0].decode() if reason is not None and reason.size else ""
            final = None
            if result.get_response().parameters.get("triton_final_response").bool_param:
                final = {"finish_reason": reason or "stop",
                         "prompt_tokens": int(result.as_numpy("prompt_tokens").reshape(-1)[0]),
                         "completion_tokens": int(result.as_numpy("completion_tokens").reshape(-1)[0])}
            yield text, final
            if final is not None:
                return
    finally:
        stream.cancel()
        await client.close()


def _finish_reason(reason: str) -> str:
    """OpenAI's names: `stop` for EOS or a stop string, `length` for max_tokens."""
    return "length" if reason == "length" else "stop"


def make_app(grpc_url: str, engines: dict[str, Path], default_max_tokens: int = 16):
    """The FastAPI application serving `engines` (name -> directory) through the Triton server at `grpc_url`."""
    try:
        from fastapi import FastAPI, Request
        from fastapi.responses import JSONResponse, StreamingResponse
    except ImportError:
        raise UserInputError("the OpenAI endpoint needs fastapi and uvicorn: pip install 'pkv-export[triton]'") \
            from None
    models = Models(engines)
    modes: dict[str, bool] = {}  # model -> decoupled (in-flight), asked from the server at its first request
    app = FastAPI(title="pkv-export OpenAI-compatible endpoint")

    @app.exception_handler(ApiError)
    async def api_error(_, e: ApiError):
        return JSONResponse({"error": {"message": str(e), "type": e.kind, "code": None, "param": None}},
                            status_code=e.status)

    @app.get("/v1/models")
    async def list_models():
        return {"object": "list", "data": [{"id": name, "object": "model", "created": 0, "owned_by": "pkv-export"}
                                           for name in models.tokenizers]}

    async def body_of(request: Request) -> dict:
        try:
            body = await request.json()
        except (ValueError, UnicodeDecodeError):
            raise ApiError("the request body is not JSON") from None
        if not isinstance(body, dict) or not isinstance(body.get("model"), str):
            raise ApiError("the request needs a 'model' (string)")
        _check_unsupported(body)
        return body

    async def run(body: dict, prompt: str, chat: bool, templated: bool):
        stops = _stops(body.get("stop"))
        params = {"stream": True, "max_new_tokens": _max_tokens(body, default_max_tokens),
                  "add_special_tokens": not templated}
        if stops:
            params["stop"] = stops[0] if len(stops) == 1 else json.dumps(stops)  # the model cuts there itself
        created, rid = int(time.time()), ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        model = body["model"]
        kind = "chat.completion" if chat else "text_completion"

        def chunk(text: str, reason: str | None, first: bool = False) -> dict:
            if chat:
                delta = {"role": "assistant", "content": text} if first else ({"content": text} if text else {})
                choice = {"index": 0, "delta": delta, "finish_reason": reason}
            else:
                choice = {"index": 0, "text": text, "finish_reason": reason, "logprobs": None}
            return {"id": rid, "object": kind + ".chunk" if chat else kind, "created": created, "model": model,
                    "choices": [choice]}

        def pieces():
            return _generate(grpc_url, model, prompt, params, modes)

        if body.get("stream"):
            include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
            stream = pieces()
            try:  # a refusal before the first piece is an HTTP error, not a 200 with an empty stream
                head = await stream.__anext__()
            except StopAsyncIteration:
                head = None

            async def rest():
                if head is not None:
                    yield head
                async for item in stream:
                    yield item

            async def events():
                first = True
                try:
                    async for text, final in rest():
                        if text or first:
                            yield f"data: {json.dumps(chunk(text, None, first))}\n\n"
                            first = False
                        if final is not None:
                            yield f"data: {json.dumps(chunk('', _finish_reason(final['finish_reason'])))}\n\n"
                            if include_usage:
                                usage = _usage(final)
                                yield f"data: {json.dumps({**chunk('', None), 'choices': [], 'usage': usage})}\n\n"
                except ApiError as e:  # after the headers went out: an error event, as OpenAI's streams end
                    yield f"data: {json.dumps({'error': {'message': str(e), 'type': e.kind}})}\n\n"
                finally:
                    await stream.aclose()
                yield "data: [DONE]\n\n"

            return StreamingResponse(events(), media_type="text/event-stream")
        text, final = "", None
        async for piece, last in pieces():
            text += piece
            final = last or final
        reason = _finish_reason(final["finish_reason"]) if final else "stop"
        choice = {"index": 0, "finish_reason": reason}
        choice |= {"message": {"role": "assistant", "content": text}} if chat else {"text": text, "logprobs": None}
        return {"id": rid, "object": kind, "created": created, "model": model, "choices": [choice],
                "usage": _usage(final or {})}

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await body_of(request)
        models.tokenizer(body["model"])
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if not isinstance(prompt, str) or not prompt:
            raise ApiError("prompt must be a non-empty string (one prompt per request)")
        return await run(body, prompt, chat=False, templated=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await body_of(request)
        tokenizer = models.tokenizer(body["model"])
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in messages):
            raise ApiError("messages must be a non-empty list of {role, content} objects with text content")
        if not getattr(tokenizer, "chat_template", None):
            raise ApiError(f"the model '{body['model']}' has no chat template: use /v1/completions")
        prompt = tokenizer.apply_chat_template([{"role": m["role"], "content": m["content"]} for m in messages],
                                               tokenize=False, add_generation_prompt=True)
        return await run(body, prompt, chat=True, templated=True)

    return app


def _usage(final: dict) -> dict:
    prompt, completion = final.get("prompt_tokens"), final.get("completion_tokens")
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": None if prompt is None or completion is None else prompt + completion}
