"""A text client for served engines over tritonclient's HTTP or gRPC protocol.

Static models (Triton's dynamic batcher) answer one request with one response (`infer`). In-flight models are
decoupled: over gRPC the client opens a stream and reads responses until the final one; over HTTP it reads
Triton's `generate_stream` endpoint (server-sent events). Either way `generate` returns the whole answer, and
`on_piece` sees each text piece as it arrives when streaming was asked for.

Errors carry the server's own message: a request the server refused (a bad parameter, a prompt too long, an
unknown model or context id) is a UserInputError (exit 2), a model that failed or a server that cannot be reached
a JobError (exit 1); the models' failure messages say which (engines/triton_request.py).
"""

from __future__ import annotations

import json
import queue
import time
import urllib.error
import urllib.request
from collections.abc import Callable

import numpy as np

from engines.triton_request import is_failure
from pkv_core.errors import JobError, UserInputError


def server_error(message: str) -> Exception:
    """The error a server's answer means: the model failed (JobError), or the request was refused (UserInputError)."""
    if is_failure(message):
        return JobError(f"server error: {message}")
    return UserInputError(f"the server refused the request: {message}")


def check_url(url: str) -> None:
    """host:port with a port in 1..65535 (tritonclient would raise a bare ValueError deep inside)."""
    host, sep, port = url.rpartition(":")
    if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise UserInputError(f"--url {url!r}: expected HOST:PORT with a port in 1..65535, e.g. 127.0.0.1:8000")


class TritonTextClient:
    def __init__(self, url: str, protocol: str = "http", timeout: float = 300.0):
        check_url(url)
        try:
            if protocol == "http":
                import tritonclient.http as tc

                self._client = tc.InferenceServerClient(url, connection_timeout=timeout, network_timeout=timeout)
            else:
                import tritonclient.grpc as tc

                self._client = tc.InferenceServerClient(url)
        except ImportError:
            raise UserInputError("the client needs tritonclient: pip install 'pkv-export[triton]'") from None
        self.tc, self.protocol, self.timeout, self.url = tc, protocol, timeout, url

    def __enter__(self) -> TritonTextClient:
        return self

    def __exit__(self, *exc) -> None:
        self._client.close()

    def decoupled(self, model: str) -> bool:
        """Whether the model streams (in-flight batching); cached per model."""
        from tritonclient.utils import InferenceServerException

        cache = self.__dict__.setdefault("_decoupled", {})
        if model not in cache:
            try:
                config = self._client.get_model_config(model)
            except InferenceServerException as e:
                raise _exception(e) from None
            except OSError as e:
                raise JobError(f"cannot reach the server: {e}") from None
            if self.protocol == "http":
                cache[model] = bool(config.get("model_transaction_policy", {}).get("decoupled"))
            else:
                cache[model] = bool(config.config.model_transaction_policy.decoupled)
        return cache[model]

    def generate(self, model: str, prompt: str, max_new_tokens: int | None = None, stop: str | None = None, *,
                 context_id: str | None = None, store_context: bool = False, room: int | None = None,
                 stream: bool = False, on_piece: Callable[[str], None] | None = None) -> dict:
        """{'text', 'output_ids', 'seconds', ...}; a server-side error becomes JobError with Triton's message.

        With `context_id` and `store_context`, `prompt` is a context the model compresses and keeps under that id;
        with `context_id` alone, `prompt` is a question about that stored context. With `stream`, an in-flight
        model sends the answer piece by piece (`on_piece` gets each; the result adds `first_piece_seconds`)."""
        from tritonclient.utils import InferenceServerException

        if self.decoupled(model):
            params = {"stream": bool(stream)}
            if max_new_tokens is not None:
                params["max_new_tokens"] = int(max_new_tokens)
            if stop is not None:
                params["stop"] = stop
            if context_id is not None:
                params["context_id"] = context_id
            run = self._stream_grpc if self.protocol == "grpc" else self._stream_http
            return run(model, prompt, params, on_piece)
        if stream:
            raise UserInputError(f"model {model!r} answers in one piece (Triton's dynamic batcher): serve it with "
                                 "--batching inflight to stream")

        data = np.array([[prompt.encode("utf-8")]], dtype=np.object_)
        inp = self.tc.InferInput("text_input", list(data.shape), "BYTES")
        inp.set_data_from_numpy(data)
        params = {}
        if max_new_tokens is not None:
            params["max_new_tokens"] = int(max_new_tokens)
        if stop is not None:
            params["stop"] = stop
        if context_id is not None:
            params["context_id"] = context_id
            if store_context:
                params["store_context"] = True
                if room is not None:
                    params["room"] = int(room)
        outputs = [self.tc.InferRequestedOutput("text_output"), self.tc.InferRequestedOutput("output_ids")]
        t0 = time.perf_counter()
        try:
            kwargs = {"client_timeout": self.timeout} if self.protocol == "grpc" else {}
            result = self._client.infer(model, [inp], outputs=outputs, parameters=params or None, **kwargs)
        except InferenceServerException as e:
            raise _exception(e) from None
        except OSError as e:
            raise JobError(f"cannot reach the server: {e}") from None
        text = result.as_numpy("text_output").reshape(-1)[0]
        return {"text": text.decode("utf-8") if isinstance(text, bytes) else str(text),
                "output_ids": result.as_numpy("output_ids").reshape(-1).tolist(),
                "seconds": round(time.perf_counter() - t0, 4)}

    def _stream_grpc(self, model: str, prompt: str, params: dict, on_piece) -> dict:
        responses: queue.Queue = queue.Queue()
        data = np.array([prompt.encode("utf-8")], dtype=np.object_)
        inp = self.tc.InferInput("text_input", [1], "BYTES")
        inp.set_data_from_numpy(data)
        t0 = time.perf_counter()
        self._client.start_stream(callback=lambda result, error: responses.put((result, error)))
        try:
            self._client.async_stream_infer(model, [inp], parameters=params, enable_empty_final_response=True)
            pieces = _Pieces(t0, on_piece)
            while True:
                try:
                    result, error = responses.get(timeout=self.timeout)
                except queue.Empty:
                    raise JobError(f"no answer within {self.timeout:.0f} s") from None
                if error is not None:
                    raise _exception(error)
                final = result.get_response().parameters.get("triton_final_response")
                pieces.add(_text(result.as_numpy("text_output")), result.as_numpy("output_ids"),
                           result.as_numpy("finish_reason"), result.as_numpy("prompt_tokens"),
                           result.as_numpy("completion_tokens"))
                if final is not None and final.bool_param:
                    return pieces.result()
        except OSError as e:
            raise JobError(f"cannot reach the server: {e}") from None
        finally:
            self._client.stop_stream(cancel_requests=True)

    def _stream_http(self, model: str, prompt: str, params: dict, on_piece) -> dict:
        body = json.dumps({"text_input": prompt, **params}).encode()
        request = urllib.request.Request(f"http://{self.url}/v2/models/{model}/generate_stream", data=body,
                                         method="POST", headers={"Content-Type": "application/json"})
        t0 = time.perf_counter()
        pieces = _Pieces(t0, on_piece)
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                for raw in response:
                    line = raw.decode("utf-8").strip()
                    if not line.startswith("data:"):
                        continue
                    event = json.loads(line[5:])
                    if "error" in event:
                        raise server_error(str(event["error"]))
                    pieces.add(event.get("text_output", ""), event.get("output_ids"), event.get("finish_reason"),
                               event.get("prompt_tokens"), event.get("completion_tokens"))
        except urllib.error.HTTPError as e:
            raise server_error(_http_message(e)) from None
        except OSError as e:
            raise JobError(f"cannot reach the server: {e}") from None
        return pieces.result()


def _exception(error) -> Exception:
    """tritonclient's InferenceServerException (or any error a stream callback got) as ours."""
    from tritonclient.utils import InferenceServerException

    known = isinstance(error, InferenceServerException)
    message = error.message() if known else str(error)
    status = str(error.status()) if known else ""
    if status.endswith(("UNAVAILABLE", "DEADLINE_EXCEEDED")) or "failed to connect" in message:
        return JobError(f"cannot reach the server: {message}")  # (gRPC; over HTTP that is an OSError)
    return server_error(message)


def _http_message(e: urllib.error.HTTPError) -> str:
    """The server's reason in an HTTP error: Triton's JSON {"error": ...}, or the first server-sent event of a
    refused generate_stream (`data: {"error": ...}`); the status line only when the body says nothing."""
    try:
        body = e.read().decode("utf-8", errors="replace").strip()
    except OSError:
        body = ""
    for line in [body, *body.splitlines()]:
        line = line.removeprefix("data:").strip()
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if isinstance(event, dict) and "error" in event:
            return str(event["error"])
    return f"HTTP {e.code} {e.reason}"


def _text(value) -> str:
    value = np.asarray(value).reshape(-1)[0] if value is not None and np.asarray(value).size else ""
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _ints(value) -> list[int]:
    return [] if value is None else [int(x) for x in np.asarray(value).reshape(-1)]


class _Pieces:
    """The responses of one streamed request, gathered into one answer."""

    def __init__(self, t0: float, on_piece):
        self.t0, self.on_piece = t0, on_piece
        self.text, self.ids, self.first, self.reason, self.usage = "", [], None, None, {}

    def add(self, text, ids, reason, prompt_tokens, completion_tokens) -> None:
        text = _text(text) if not isinstance(text, str) else text
        if text:
            if self.first is None:
                self.first = time.perf_counter() - self.t0
            if self.on_piece:
                self.on_piece(text)
        self.text += text
        self.ids += _ints(ids)
        reason = _text(reason) if reason is not None and not isinstance(reason, str) else reason
        if reason:
            self.reason = reason
            self.usage = {"prompt_tokens": _ints(prompt_tokens)[0] if _ints(prompt_tokens) else None,
                          "completion_tokens": _ints(completion_tokens)[0] if _ints(completion_tokens) else None}

    def result(self) -> dict:
        return {"text": self.text, "output_ids": self.ids, "seconds": round(time.perf_counter() - self.t0, 4),
                "first_piece_seconds": None if self.first is None else round(self.first, 4),
                "finish_reason": self.reason, **self.usage}
