"""What both Triton models (engines/triton_model.py, engines/triton_inflight.py) read from a request the same way:
the one prompt in `text_input` and the `max_new_tokens` parameter, each refused with one line naming the problem."""

from __future__ import annotations

try:  # only importable inside Triton's python backend
    import triton_python_backend_utils as pb_utils
except ImportError:  # pragma: no cover - outside Triton the module is still importable for documentation
    pb_utils = None


def prompt_text(request, error: type[Exception]) -> str:
    """The request's one prompt: `text_input` [1] BYTES, UTF-8, not blank; else `error(message)`."""
    tensor = pb_utils.get_input_tensor_by_name(request, "text_input")
    if tensor is None:
        raise error("missing input 'text_input'")
    values = tensor.as_numpy().reshape(-1)
    if values.size != 1:
        raise error(f"'text_input' must hold exactly one prompt (got {values.size})")
    raw = values[0]
    text = raw.decode("utf-8", errors="strict") if isinstance(raw, bytes) else str(raw)
    if not text.strip():
        raise error("empty prompt")
    return text


def max_new_tokens(params: dict, default: int, limit: int, error: type[Exception]) -> int:
    """`max_new_tokens` from the request's parameters (default when absent), an integer in [1, limit]."""
    new_tokens = params.get("max_new_tokens", default)
    if isinstance(new_tokens, bool) or not isinstance(new_tokens, int) or not 1 <= new_tokens <= limit:
        raise error(f"max_new_tokens must be an integer in [1, {limit}] (got {new_tokens!r})")
    return new_tokens
