"""Weight sources: read a checkpoint tensor by tensor, never all at once, never through pickle.

Both sources answer the same three questions (`names`, `shape`, `get`), so exporters can stream a model
layer by layer whether the weights come from safetensors files or from the deterministic random generator.
"""

from __future__ import annotations

import json
import math
import zlib
from pathlib import Path
from typing import Protocol

import torch

from exporter.specs import ModelSpec, tensor_shapes
from pkv_core.errors import UserInputError


class WeightSource(Protocol):
    def names(self) -> list[str]: ...
    def shape(self, name: str) -> tuple[int, ...]: ...
    def dtype(self, name: str) -> torch.dtype: ...
    def get(self, name: str) -> torch.Tensor: ...


FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_complete(spec: ModelSpec, source: WeightSource, where: str) -> None:
    """The checkpoint holds exactly the tensors the architecture uses (names are Hugging Face's), each with the
    shape config.json implies and a float dtype. A tensor the model would not use (a bias, an extra layer, an
    lm_head beside tied embeddings) means the config does not describe these weights: refused, never dropped."""
    expected = tensor_shapes(spec)
    have = set(source.names())
    for name, shape in expected.items():
        if name not in have:
            raise UserInputError(f"{where}: tensor '{name}' is missing from the checkpoint")
        if tuple(source.shape(name)) != tuple(shape):
            raise UserInputError(
                f"{where}: tensor '{name}' has shape {tuple(source.shape(name))}, config.json implies {shape}"
            )
        dtype = source.dtype(name)
        if dtype not in FLOAT_DTYPES:
            raise UserInputError(f"{where}: tensor '{name}' is {dtype}; only fp32, fp16 and bf16 weights are read")
    unused = sorted(n for n in have if n not in expected)
    if unused:
        more = f" and {len(unused) - 1} more" if len(unused) > 1 else ""
        raise UserInputError(f"{where}: tensor '{unused[0]}'{more} is not used by the {spec.arch} architecture "
                             f"config.json describes ({spec.num_layers} layers, tie_word_embeddings="
                             f"{str(spec.tie_word_embeddings).lower()}); the config does not match the weights")


class SafetensorsWeights:
    """Lazy reader over `model.safetensors` or a sharded set described by `model.safetensors.index.json`."""

    def __init__(self, directory: Path):
        from safetensors import SafetensorError, safe_open

        self.directory = directory
        index = directory / "model.safetensors.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise UserInputError(f"{index}: not a valid safetensors index (no weight_map)") from None
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(p.name for p in directory.glob("*.safetensors"))
            weight_map = None
        if not files:
            pickles = [p.name for p in directory.glob("*.bin")] + [p.name for p in directory.glob("*.pt*")]
            hint = f" (found {pickles[0]}: pickle checkpoints are refused, convert to safetensors)" if pickles else ""
            raise UserInputError(f"{directory}: no *.safetensors weights{hint}")
        self._handles = {}
        self._where: dict[str, str] = {}
        for fname in files:
            path = directory / fname
            if not path.is_file():
                raise UserInputError(f"{path}: shard listed in the index is missing")
            try:
                handle = safe_open(str(path), framework="pt")
                keys = list(handle.keys())
                _check_covered(path, handle, keys)
            except (SafetensorError, OSError, ValueError) as e:
                raise UserInputError(f"{path}: not a readable safetensors file ({_first_line(e)})") from None
            self._handles[fname] = handle
            for k in keys:
                self._where[k] = fname
        if weight_map is not None:
            for k, fname in weight_map.items():
                if self._where.get(k) != fname:
                    raise UserInputError(f"{index}: '{k}' is listed in {fname} but that shard does not hold it")

    def names(self) -> list[str]:
        return list(self._where)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handles[self._where[name]].get_slice(name).get_shape())

    def dtype(self, name: str) -> torch.dtype:
        return _SAFETENSORS_DTYPES.get(self._handles[self._where[name]].get_slice(name).get_dtype(), torch.uint8)

    def get(self, name: str) -> torch.Tensor:
        if name not in self._where:
            raise UserInputError(f"{self.directory}: tensor '{name}' is missing from the checkpoint")
        return self._handles[self._where[name]].get_tensor(name)


_SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
                       "I64": torch.int64, "I32": torch.int32, "I8": torch.int8, "U8": torch.uint8,
                       "BOOL": torch.bool}


def _check_covered(path: Path, handle, keys: list[str]) -> None:
    """A truncated file can have an intact header; compare the header's data size with the file's size."""
    header_len = int.from_bytes(path.open("rb").read(8), "little")
    metadata = json.loads(path.open("rb").read(8 + header_len)[8:])
    end = max((v["data_offsets"][1] for k, v in metadata.items() if k != "__metadata__"), default=0)
    if path.stat().st_size < 8 + header_len + end:
        raise ValueError(f"file is truncated: {path.stat().st_size} bytes, header needs {8 + header_len + end}")


def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


class RandomWeights:
    """Deterministic random weights for any spec: each tensor is drawn from its own seeded generator.

    Linear weights ~ N(0, 1/fan_in) keep activations at unit scale; q_proj gets a gain so attention is peaked
    (a nearly uniform attention would make top-k selection a coin toss on float rounding). Norm weights are
    near 1, not exactly 1, so a mis-mapped norm tensor shows up in tests.
    """

    Q_GAIN = 2.5

    def __init__(self, spec: ModelSpec, seed: int = 0, dtype: torch.dtype = torch.float32):
        self.spec, self.seed, self.dtype_ = spec, seed, dtype
        self._shapes = tensor_shapes(spec)

    def names(self) -> list[str]:
        return list(self._shapes)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._shapes[name]

    def dtype(self, name: str) -> torch.dtype:
        return self.dtype_

    def get(self, name: str) -> torch.Tensor:
        shape = self._shapes[name]
        g = torch.Generator().manual_seed((self.seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63))
        x = torch.randn(shape, generator=g, dtype=torch.float32)
        if len(shape) == 1:
            x = 1.0 + 0.1 * x
        elif not name.endswith("embed_tokens.weight"):
            x = x / math.sqrt(shape[1])
            if name.endswith("q_proj.weight"):
                x = x * self.Q_GAIN
        return x.to(self.dtype_)
