"""Write a model's weights once, tensor by tensor, as ONNX external data shared by the prefill and decode graphs.

Only one tensor is in memory at a time, so the build's peak memory is set by the largest tensor (the embedding),
not by the number of layers. Linear weights are stored transposed ([in, out]) so the graphs use plain MatMul.
Offsets are page-aligned so onnxruntime can memory-map the file.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import torch

from exporter.specs import ModelSpec, tensor_shapes
from exporter.weights import WeightSource
from trt_plugins.onnx_graph import NP_TO_ONNX

WEIGHTS_FILE = "weights.bin"
ALIGN = 4096


def exported_tensors(spec: ModelSpec) -> list[tuple[str, list[str]]]:
    """(ONNX initializer name, the Hugging Face tensors it is made of) in write order.

    Linear weights are stored transposed ([in, out], name ending in `.T`) so the graphs use plain MatMul; the
    q/k/v projections are packed (parts concatenated along the output dimension): one MatMul, split after it
    (or by GroupQueryAttention itself in decode)."""
    out = [("model.embed_tokens.weight", ["model.embed_tokens.weight"])]
    for layer in range(spec.num_layers):
        p = f"model.layers.{layer}."
        out += [
            (p + "input_layernorm.weight", [p + "input_layernorm.weight"]),
            (p + "self_attn.qkv_proj.weight.T", [p + f"self_attn.{x}_proj.weight" for x in "qkv"]),
            (p + "self_attn.o_proj.weight.T", [p + "self_attn.o_proj.weight"]),
            (p + "post_attention_layernorm.weight", [p + "post_attention_layernorm.weight"]),
            (p + "mlp.gate_proj.weight.T", [p + "mlp.gate_proj.weight"]),
            (p + "mlp.up_proj.weight.T", [p + "mlp.up_proj.weight"]),
            (p + "mlp.down_proj.weight.T", [p + "mlp.down_proj.weight"]),
        ]
    head = "model.embed_tokens.weight" if spec.tie_word_embeddings else "lm_head.weight"
    return out + [("model.norm.weight", ["model.norm.weight"]), ("lm_head.weight.T", [head])]


class ExternalWeights:
    def __init__(self, directory: Path, np_dtype: np.dtype):
        self.path = directory / WEIGHTS_FILE
        self.np_dtype = np.dtype(np_dtype)
        self.tensors: dict[str, onnx.TensorProto] = {}
        self._file = self.path.open("wb")
        self._offset = 0

    def add(self, name: str, array: np.ndarray) -> str:
        array = np.ascontiguousarray(array)
        pad = (-self._offset) % ALIGN
        self._file.write(b"\0" * pad)
        self._offset += pad
        nbytes = array.nbytes
        self._file.write(memoryview(array).cast("B"))  # no extra copy of a multi-GB tensor
        t = onnx.TensorProto(name=name, data_type=NP_TO_ONNX[array.dtype], dims=list(array.shape))
        t.data_location = onnx.TensorProto.EXTERNAL
        for key, value in (("location", WEIGHTS_FILE), ("offset", str(self._offset)), ("length", str(nbytes))):
            entry = t.external_data.add()
            entry.key, entry.value = key, value
        self._offset += nbytes
        self.tensors[name] = t
        return name

    def close(self) -> None:
        self._file.close()

    @property
    def nbytes(self) -> int:
        return self._offset


def write_model_weights(spec: ModelSpec, source: WeightSource, out: ExternalWeights, progress=None) -> None:
    """Stream the checkpoint into `out`, one exported tensor at a time (tied embeddings get an explicit lm_head)."""
    torch_dtype = torch.float16 if out.np_dtype == np.float16 else torch.float32
    tensors = exported_tensors(spec)
    for i, (name, parts) in enumerate(tensors):
        tensor = torch.cat([source.get(p).to(torch_dtype) for p in parts], dim=0) if len(parts) > 1 \
            else source.get(parts[0]).to(torch_dtype)
        if name.endswith(".T"):
            tensor = tensor.t()
        out.add(name, tensor.contiguous().numpy())
        del tensor
        if progress:
            progress(i + 1, len(tensors))


def planned_weight_bytes(spec: ModelSpec, dtype_bytes: int) -> int:
    shapes = tensor_shapes(spec)
    total = sum(int(np.prod(s)) for s in shapes.values()) * dtype_bytes
    if spec.tie_word_embeddings:
        total += spec.vocab_size * spec.hidden_size * dtype_bytes
    return total + ALIGN * (len(shapes) + 1)
