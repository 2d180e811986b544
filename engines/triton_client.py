"""A text client for served engines over tritonclient's HTTP or gRPC protocol."""

from __future__ import annotations

import time

import numpy as np

from exporter.errors import JobError, UserInputError


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
        self.tc, self.protocol, self.timeout = tc, protocol, timeout

    def __enter__(self) -> TritonTextClient:
        return self

    def __exit__(self, *exc) -> None:
        self._client.close()

    def generate(self, model: str, prompt: str, max_new_tokens: int | None = None, stop: str | None = None, *,
                 context_id: str | None = None, store_context: bool = False, room: int | None = None) -> dict:
        """{'text', 'output_ids', 'seconds'}; a server-side error becomes JobError with Triton's message.

        With `context_id` and `store_context`, `prompt` is a context the model compresses and keeps under that id;
        with `context_id` alone, `prompt` is a question about that stored context."""
        from tritonclient.utils import InferenceServerException

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
            raise JobError(f"server error: {e.message()}") from None
        except OSError as e:
            raise JobError(f"cannot reach the server: {e}") from None
        text = result.as_numpy("text_output").reshape(-1)[0]
        return {"text": text.decode("utf-8") if isinstance(text, bytes) else str(text),
                "output_ids": result.as_numpy("output_ids").reshape(-1).tolist(),
                "seconds": round(time.perf_counter() - t0, 4)}
