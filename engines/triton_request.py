"""What both Triton models (engines/triton_model.py, engines/triton_inflight.py) read from a request the same way:
the one prompt in `text_input` and the parameters `max_new_tokens`, `stop` and the true/false flags, each refused
with one line naming the problem; and the two kinds of error response a model sends.

A refusal (the request is bad: the client's to fix) goes out with Triton's INVALID_ARG code, a failure (the model
could not answer a good request) with INTERNAL, and every failure message starts with one of `FAILURES`, so that a
client can tell them apart from the message alone: the nvidia-pytriton build of tritonserver answers every model
error with HTTP 400 and sends no status code on gRPC streams, whatever the code (newer Tritons map INVALID_ARG to
400 and INTERNAL to 500)."""

from __future__ import annotations

import json

try:  # only importable inside Triton's python backend
    import triton_python_backend_utils as pb_utils
except ImportError:  # pragma: no cover - outside Triton the module is still importable for documentation
    pb_utils = None

MAX_STOPS = 4
# How the models' failure messages start (engines/scheduler.py, engines/triton_model.py); any other error is a refusal.
FAILURES = ("prefill failed", "decode failed", "scheduler error", "generation failed")


def is_failure(message: str) -> bool:
    """Whether an error message from a model says it failed (exit 1 / HTTP 500), not that it refused the request."""
    return message.startswith(FAILURES)


def error(message: str):
    """The error response's TritonError: INVALID_ARG for a refusal, INTERNAL for a failure (plain where the stub
    predates error codes)."""
    code = getattr(pb_utils.TritonError, "INTERNAL" if is_failure(message) else "INVALID_ARG", None)
    return pb_utils.TritonError(message) if code is None else pb_utils.TritonError(message, code)


def prompt_text(request, error: type[Exception]) -> str:
    """The request's one prompt: `text_input` [1] BYTES, UTF-8, not blank; else `error(message)`."""
    tensor = pb_utils.get_input_tensor_by_name(request, "text_input")
    if tensor is None:
        raise error("missing input 'text_input'")
    values = tensor.as_numpy().reshape(-1)
    if values.size != 1:
        raise error(f"'text_input' must hold exactly one prompt (got {values.size})")
    raw = values[0]
    try:
        text = raw.decode("utf-8", errors="strict") if isinstance(raw, bytes) else str(raw)
    except UnicodeDecodeError:
        raise error("'text_input' is not valid UTF-8") from None
    if not text.strip():
        raise error("empty prompt")
    return text


def parameters(request, error: type[Exception]) -> dict:
    """The request's parameters (a JSON object Triton builds from scalars)."""
    try:
        params = json.loads(request.parameters() or "{}")
    except json.JSONDecodeError:
        raise error("the request parameters are not JSON") from None
    if not isinstance(params, dict):
        raise error("the request parameters must be an object")
    return params


def max_new_tokens(params: dict, default: int, limit: int, error: type[Exception]) -> int:
    """`max_new_tokens` from the request's parameters (default when absent), an integer in [1, limit]."""
    new_tokens = params.get("max_new_tokens", default)
    if isinstance(new_tokens, bool) or not isinstance(new_tokens, int) or not 1 <= new_tokens <= limit:
        raise error(f"max_new_tokens must be an integer in [1, {limit}] (got {new_tokens!r})")
    return new_tokens


def flag(params: dict, name: str, default: bool, error: type[Exception]) -> bool:
    """A true/false parameter; any other value is refused (a string "yes" is not silently false)."""
    value = params.get(name, default)
    if not isinstance(value, bool):
        raise error(f"{name} must be true or false")
    return value


def stop_strings(params: dict, error: type[Exception]) -> list[str] | None:
    """`stop`: a non-empty string, or a JSON list of up to MAX_STOPS of them (request parameters are scalars, so
    several travel as the JSON text of a list); None when absent."""
    stop = params.get("stop")
    if stop is None:
        return None
    if isinstance(stop, str) and stop.startswith("[") and stop.endswith("]"):
        try:
            stop = json.loads(stop)
        except json.JSONDecodeError:
            pass
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not stops or len(stops) > MAX_STOPS or not all(
            isinstance(s, str) and s for s in stops):
        raise error(f"stop must be a non-empty string or a JSON list of at most {MAX_STOPS} of them")
    return stops
