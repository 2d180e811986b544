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

from exporter.quantize import WeightQuant, unpack, weight_bytes
from exporter.specs import ModelSpec, tensor_shapes
from exporter.weights import WeightSource
from trt_plugins.onnx_graph import NP_TO_ONNX

# Quantized weights' storage types beside the graph builder's float and index types.
TENSOR_TYPES = {**NP_TO_ONNX, np.dtype("uint8"): onnx.TensorProto.UINT8, np.dtype("int8"): onnx.TensorProto.INT8}

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

    def add(self, name: str, array: np.ndarray, data_type: int | None = None, dims: list[int] | None = None) -> str:
        """Append `array`'s bytes as initializer `name`; `data_type`/`dims` for a type numpy has not (INT4: two
        values per byte, `array` holds the packed bytes)."""
        array = np.ascontiguousarray(array)
        pad = (-self._offset) % ALIGN
        self._file.write(b"\0" * pad)
        self._offset += pad
        nbytes = array.nbytes
        self._file.write(memoryview(array).cast("B"))  # no extra copy of a multi-GB tensor
        t = onnx.TensorProto(name=name, data_type=data_type or TENSOR_TYPES[array.dtype],
                             dims=list(array.shape) if dims is None else dims)
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


def is_quantized(name: str) -> bool:
    """An exported linear weight of the decoder (`--weights` quantizes these; lm_head stays in the dtype)."""
    return name.endswith(".weight.T") and name.startswith("model.layers.")


def write_model_weights(spec: ModelSpec, source: WeightSource, out: ExternalWeights, progress=None,
                        quant: WeightQuant | None = None, layout: str = "nbits") -> None:
    """Stream the checkpoint into `out`, one exported tensor at a time (tied embeddings get an explicit lm_head).
    With `quant`, each decoder linear weight is quantized as it streams (`layout`: the target's, see
    `add_quantized`)."""
    torch_dtype = torch.float16 if out.np_dtype == np.float16 else torch.float32
    tensors = exported_tensors(spec)
    groups = spec.num_layers + 2  # progress: the embedding, each layer, then the final norm and lm_head
    for i, (name, parts) in enumerate(tensors):
        tensor = torch.cat([source.get(p).to(torch_dtype) for p in parts], dim=0) if len(parts) > 1 \
            else source.get(parts[0]).to(torch_dtype)
        if name.endswith(".T"):
            tensor = tensor.t()
        if quant is not None and is_quantized(name):
            add_quantized(out, name, tensor.contiguous().numpy(), quant, layout)
        else:
            out.add(name, tensor.contiguous().numpy())
        del tensor
        group = _group(name, spec.num_layers)
        following = _group(tensors[i + 1][0], spec.num_layers) if i + 1 < len(tensors) else groups
        if progress and following != group:  # a part finished: (parts written, parts, bytes written)
            progress(group + 1, groups, out.nbytes)


def _group(name: str, num_layers: int) -> int:
    """0 for the embedding, 1 + l for layer l's tensors, num_layers + 1 for the final norm and lm_head."""
    if name.startswith("model.layers."):
        return 1 + int(name.split(".")[2])
    return 0 if name.startswith("model.embed_tokens") else num_layers + 1


def add_quantized(out: ExternalWeights, name: str, weight: np.ndarray, quant: WeightQuant, layout: str) -> None:
    """weight [K, N] -> initializers `name.q`, `name.scales` and (asymmetric) `name.zp`.

    layout "nbits" (onnxruntime's MatMulNBits): q uint8 [N, K/block, block*bits/8], scales [N, K/block],
    zp uint8 [N, ceil(K/block*bits/8)]. layout "dq" (standard blocked DequantizeLinear, axis 0): q [K, N] INT4/INT8
    (symmetric: the value minus 2^(bits-1), no zero point) or UINT4/UINT8 with zp [K/block, N]; scales
    [K/block, N]. Both hold the same quantized values (onnxruntime's quantizer)."""
    packed, scales, zero_points = quant.quantize(weight)
    if layout == "nbits":
        out.add(name + ".q", packed)
        out.add(name + ".scales", scales)
        if zero_points is not None:
            out.add(name + ".zp", zero_points)
        return
    k, n = weight.shape
    blocks = k // quant.block_size
    values = unpack(packed.reshape(n, -1), quant.bits)[:, :k].T.astype(np.int16)  # [K, N]
    zp = None if zero_points is None else np.ascontiguousarray(unpack(zero_points, quant.bits)[:, :blocks].T)
    if zp is None:
        values -= 1 << (quant.bits - 1)
    types = {(8, True): onnx.TensorProto.INT8, (8, False): onnx.TensorProto.UINT8,
             (4, True): onnx.TensorProto.INT4, (4, False): onnx.TensorProto.UINT4}
    data_type = types[(quant.bits, zp is None)]
    out.add(name + ".q", *_typed(values, quant.bits, zp is None), data_type, [k, n])
    out.add(name + ".scales", np.ascontiguousarray(scales.T))
    if zp is not None:
        out.add(name + ".zp", *_typed(zp.astype(np.int16), quant.bits, False), data_type, [blocks, n])


def _typed(values: np.ndarray, bits: int, signed: bool) -> tuple[np.ndarray]:
    """Integer values -> the bytes of an INT8/UINT8 tensor, or of an INT4/UINT4 one (row-major, two per byte, the
    first in the low nibble, as ONNX packs them)."""
    if bits == 8:
        return (values.astype(np.int8 if signed else np.uint8),)
    flat = (values.reshape(-1) & 0x0F).astype(np.uint8)
    if flat.size % 2:
        flat = np.append(flat, np.uint8(0))
    return (flat[0::2] | (flat[1::2] << 4),)


def planned_weight_bytes(spec: ModelSpec, dtype_bytes: int, quant: WeightQuant | None = None) -> int:
    """The bytes `write_model_weights` writes (alignment included): the disk check of `build`."""
    tensors = len(tensor_shapes(spec)) + 1
    if quant is not None:  # scales (and zero points) beside each of the 5 exported linear weights of a layer
        tensors += spec.num_layers * 5 * (1 if quant.symmetric else 2)
    return weight_bytes(spec, dtype_bytes, quant) + ALIGN * tensors
