"""pkv-export's model side and its writers: checkpoint loading, model specs and presets, `plan`, the slot planner,
engine directories and their manifests, and the ONNX / TensorRT / TensorRT-LLM / Triton writers. The KV methods
themselves are `methods/`."""

__version__ = "0.1.0"
