"""Where an engine can run a method: the names every method's positive list of backends is written in.

A method lists the backends it runs on (`KVPolicy.runs_on`); `build`, the engines and the server ask
`policy.check_backend(name)` and refuse the rest with one line that says where the method does run.
"""

from __future__ import annotations

ONNXRUNTIME = "onnx:onnxruntime"  # build --backend onnx --target onnxruntime
ONNX_TENSORRT = "onnx:tensorrt"  # build --backend onnx --target tensorrt (standard ops, plugin-ready selection)
TENSORRT = "tensorrt"  # build --backend tensorrt: plans with the pkv plugins (GPU hosts)
TRTLLM = "trtllm"  # build --backend trtllm: TensorRT-LLM 1.2's sparse-attention hook (GPU hosts)
SLOTS = "slots"  # serve --batching inflight: fixed-size KV slots, sized before a request is admitted

ALL = frozenset({ONNXRUNTIME, ONNX_TENSORRT, TENSORRT, TRTLLM, SLOTS})

DESCRIPTIONS = {
    ONNXRUNTIME: "--backend onnx --target onnxruntime",
    ONNX_TENSORRT: "--backend onnx --target tensorrt",
    TENSORRT: "--backend tensorrt",
    TRTLLM: "--backend trtllm",
    SLOTS: "in-flight batching (serve --batching inflight)",
}


def build_backend(backend: str, target: str = "onnxruntime") -> str:
    """The backend name of a `build --backend B [--target T]`."""
    return f"onnx:{target}" if backend == "onnx" else backend
