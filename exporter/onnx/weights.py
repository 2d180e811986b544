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


def exported_name(hf_name: str) -> str:
    """ONNX initializer name: the Hugging Face name, `.T` when stored transposed."""
    return hf_name + ".T" if hf_name.endswith("_proj.weight") or hf_name == "lm_head.weight" else hf_name


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
    """Stream every checkpoint tensor into `out` (tied embeddings get an explicit transposed lm_head)."""
    names = list(tensor_shapes(spec))
    torch_dtype = torch.float16 if out.np_dtype == np.float16 else torch.float32
    for i, name in enumerate(names):
        tensor = source.get(name).to(torch_dtype)
        if exported_name(name) != name:
            tensor = tensor.t()
        out.add(exported_name(name), tensor.contiguous().numpy())
        if name == "model.embed_tokens.weight" and spec.tie_word_embeddings:
            out.add("lm_head.weight.T", tensor.t().contiguous().numpy())
        del tensor
        if progress:
            progress(i + 1, len(names))


def planned_weight_bytes(spec: ModelSpec, dtype_bytes: int) -> int:
    shapes = tensor_shapes(spec)
    total = sum(int(np.prod(s)) for s in shapes.values()) * dtype_bytes
    if spec.tie_word_embeddings:
        total += spec.vocab_size * spec.hidden_size * dtype_bytes
    return total + ALIGN * (len(shapes) + 1)
