"""Runtimes behind one interface (`engines.base.Engine`): the PyTorch reference, onnxruntime, and on GPU hosts
TensorRT / TensorRT-LLM. Validation and serving only ever talk to that interface."""
