"""Weight-only quantization of the linear layers: what `build --weights int8|int4` writes, and the same weights
dequantized for the reference.

The quantizer is onnxruntime's own (`onnxruntime.quantization.matmul_nbits_quantizer`: its C++ kernels
`quantize_matmul_{4,8}bits`, round to nearest, block-wise along the input dimension K of a [K, N] weight), called
one tensor at a time as the weights stream in, so the build's peak memory stays that of one tensor. The reference
reads the same quantized values back through `DequantizedWeights`, so an engine and its reference differ only by
float error and the kept index sets stay exact.

Quantized: every linear layer of the decoder (q/k/v, o, gate, up, down). The embedding and `lm_head` stay in the
engine's dtype (they are 2 x vocab x hidden: 13 % of LLaMA-3-8B's parameters, 3 % of 70B's).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from exporter.weights import SourceView
from pkv_core.errors import UserInputError

WEIGHT_FORMATS = ("fp", "int8", "int4")  # fp: the engine's dtype (no quantization)
BLOCK_SIZES = (32, 64, 128)
ACCURACY_LEVELS = (0, 4)
LINEAR_SUFFIXES = tuple(f"{m}.weight" for m in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                                "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"))


@dataclass(frozen=True)
class WeightQuant:
    """bits 8 or 4; block_size: consecutive K rows sharing one scale (and zero point) per output column;
    symmetric: zero point fixed at 2^(bits-1), else one per block; accuracy_level: how onnxruntime's MatMulNBits
    computes (0: in float, equal to the dequantized reference to float error; 4: activations quantized to int8 per
    block, onnxruntime-genai's CPU default, faster and no longer float-exact)."""

    bits: int
    block_size: int = 32
    symmetric: bool = True
    accuracy_level: int = 0  # MatMulNBits's: 0 float arithmetic (the reference's), 4 int8 activations (CPU speed)

    def __post_init__(self) -> None:
        if self.bits not in (4, 8):
            raise UserInputError(f"weight-only quantization has 4 or 8 bits (got {self.bits})")
        if self.block_size not in BLOCK_SIZES:
            raise UserInputError(f"--block-size must be one of {', '.join(map(str, BLOCK_SIZES))} "
                                 f"(got {self.block_size})")
        if self.accuracy_level not in ACCURACY_LEVELS:
            raise UserInputError(f"--accuracy-level must be 0 or 4 (got {self.accuracy_level})")

    @property
    def name(self) -> str:
        return f"int{self.bits}"

    def record(self) -> dict:
        """The manifest's `weights` block (read back by `from_record`)."""
        return {"format": self.name, "block_size": self.block_size, "symmetric": self.symmetric,
                "accuracy_level": self.accuracy_level,
                "quantized": "decoder linear layers (embedding and lm_head in the engine dtype)",
                "quantizer": "onnxruntime.quantization.matmul_nbits_quantizer (round to nearest)"}

    @classmethod
    def from_record(cls, record: dict | None) -> WeightQuant | None:
        if not record or record.get("format", "fp") == "fp":
            return None
        return cls(int(record["format"].removeprefix("int")), int(record["block_size"]), bool(record["symmetric"]),
                   int(record.get("accuracy_level", 0)))

    def quantize(self, weight: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """weight [K, N] float32/float16 -> (packed uint8 [N, K/block, block*bits/8], scales [N, K/block] in the
        weight's dtype, zero points uint8 [N, ceil(K/block * bits/8)] or None when symmetric): MatMulNBits's
        layout (K a multiple of the block size: every preset's sizes are multiples of 128)."""
        from onnxruntime.quantization.matmul_nbits_quantizer import (
            DefaultWeightOnlyQuantConfig,
            DefaultWeightOnlyQuantizer,
        )

        k, _ = weight.shape
        if k % self.block_size:
            raise UserInputError(f"a linear layer's input size {k} is not a multiple of --block-size {self.block_size}")
        config = DefaultWeightOnlyQuantConfig(block_size=self.block_size, is_symmetric=self.symmetric, bits=self.bits)
        packed, scales, zero_points = DefaultWeightOnlyQuantizer(config).qbits_block_quant(np.ascontiguousarray(weight))
        return packed, scales, None if self.symmetric else zero_points

    def dequantize(self, packed: np.ndarray, scales: np.ndarray, zero_points: np.ndarray | None, k: int) -> np.ndarray:
        """The inverse of `quantize`'s layout: -> [K, N] float32, (q - zero point) * scale, as MatMulNBits computes
        it (the scale in its stored dtype, widened to float32)."""
        n, blocks, _ = packed.shape
        q = unpack(packed.reshape(n, -1), self.bits)[:, :k].reshape(n, blocks, self.block_size)  # [N, blocks, bs]
        if zero_points is None:
            zp = np.full((n, blocks), 1 << (self.bits - 1), np.int32)
        else:
            zp = unpack(zero_points, self.bits)[:, :blocks].astype(np.int32)  # [N, blocks]
        w = (q.astype(np.int32) - zp[:, :, None]).astype(np.float32) * scales.astype(np.float32)[:, :, None]
        return np.ascontiguousarray(w.reshape(n, k).T)


def weight_bytes(spec, dtype_bytes: float, quant: WeightQuant | None = None) -> int:
    """Bytes of a model's weights: every tensor in `dtype_bytes`, or with `quant` the decoder's linear layers as
    packed values plus one scale (in the dtype) and, asymmetric, one zero point per block of each output column."""
    from exporter.specs import tensor_shapes

    shapes = tensor_shapes(spec)
    total = sum(int(np.prod(s)) for s in shapes.values()) * dtype_bytes
    if spec.tie_word_embeddings:
        total += spec.vocab_size * spec.hidden_size * dtype_bytes  # engines hold an explicit lm_head
    if quant is not None:
        linear = sum(int(np.prod(s)) for n, s in shapes.items() if is_linear(n))
        per_block = quant.block_size * quant.bits / 8 + dtype_bytes + (0 if quant.symmetric else quant.bits / 8)
        total += linear / quant.block_size * per_block - linear * dtype_bytes
    return int(total)


def unpack(packed: np.ndarray, bits: int) -> np.ndarray:
    """uint8 [..., M] -> uint8 [..., M * 8 / bits]: 4-bit values low nibble first (MatMulNBits's order)."""
    if bits == 8:
        return packed
    return np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(*packed.shape[:-1], -1)


def parse_weights(fmt: str, block_size: int, symmetric: bool, accuracy_level: int = 0) -> WeightQuant | None:
    """`--weights`, `--block-size`, `--symmetric/--asymmetric`, `--accuracy-level` -> the quantization, None for
    `fp`."""
    if fmt not in WEIGHT_FORMATS:
        raise UserInputError(f"--weights must be one of {', '.join(WEIGHT_FORMATS)} (got {fmt!r})")
    return None if fmt == "fp" else WeightQuant(int(fmt.removeprefix("int")), block_size, symmetric, accuracy_level)


def is_linear(name: str) -> bool:
    """A Hugging Face tensor name of a decoder linear layer (what `--weights` quantizes)."""
    return name.endswith(LINEAR_SUFFIXES)


class LinearLayersRewritten(SourceView):
    """A weight source that returns the source's tensors, with the decoder's linear layers passed through
    `rewrite(name, tensor)` (a subclass's quantize-and-dequantize): the reference of a quantized engine."""

    def __init__(self, source):
        super().__init__(source)
        self.seed = getattr(source, "seed", None)

    def get(self, name: str) -> torch.Tensor:
        tensor = self.source.get(name)
        return self.rewrite(name, tensor) if is_linear(name) else tensor

    def rewrite(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class DequantizedWeights(LinearLayersRewritten):
    """The decoder linear layers quantized and dequantized exactly as the engine holds them. `dtype`: the
    engine's, which the weights are cast to before quantizing (as the build does)."""

    def __init__(self, source, quant: WeightQuant, dtype: torch.dtype = torch.float32):
        super().__init__(source)
        self.quant, self.engine_dtype = quant, dtype  # not `dtype`: that is the source protocol's method

    def rewrite(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        weight = tensor.to(self.engine_dtype).t().contiguous().numpy()  # [K, N] = [in, out], as the engine stores it
        packed, scales, zero_points = self.quant.quantize(weight)
        return torch.from_numpy(self.quant.dequantize(packed, scales, zero_points, weight.shape[0])).t().contiguous()
