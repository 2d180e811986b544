"""Weight sources: read a checkpoint tensor by tensor, never all at once, never through pickle.

Both sources answer the same three questions (`names`, `shape`, `get`), so exporters can stream a model
layer by layer whether the weights come from safetensors files or from the deterministic random generator.
"""

from __future__ import annotations

import json
import math
import re
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
    have = set(source.names())
    check_layer_count(spec, have, where)  # before the table of expected tensors is sized by config.json
    expected = tensor_shapes(spec)
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


_LAYER_TENSOR = re.compile(r"^model\.layers\.(\d+)\.")


def check_layer_count(spec: ModelSpec, names: set[str], where: str) -> None:
    """config.json's layer count against the layers the checkpoint holds (`model.layers.{i}.*`), from the names
    alone: a config claiming more layers than the weights is refused before anything is sized by it."""
    held = {int(m.group(1)) for n in names if (m := _LAYER_TENSOR.match(n))}
    count = max(held) + 1 if held else 0
    if count != spec.num_layers:
        raise UserInputError(f"{where}: config.json says num_hidden_layers = {spec.num_layers}, the checkpoint holds "
                             f"{count} layers; the config does not match the weights")


class SafetensorsWeights:
    """Lazy reader over `model.safetensors` or a sharded set described by `model.safetensors.index.json`."""

    def __init__(self, directory: Path):
        from safetensors import SafetensorError, safe_open

        self.directory = directory
        index = directory / "model.safetensors.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
                raise UserInputError(f"{index}: not a valid safetensors index (no weight_map)") from None
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise UserInputError(f"{index}: weight_map must map tensor names to file names")
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
            path = shard_path(directory, fname, index if weight_map is not None else directory)
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


def shard_path(directory: Path, fname, where: Path) -> Path:
    """The weight file `fname` of a checkpoint, refused unless it lies inside the checkpoint: a relative name
    without `..` whose real location (symlinks followed) is in the directory, or, for a snapshot of the Hugging Face
    cache (`.../snapshots/REV/`), in that repository's `blobs/` (where the cache's symlinks point). An index naming
    an absolute path, `../..` or a symlink out would make the loader read any file on the machine."""
    if not isinstance(fname, str) or not fname or Path(fname).is_absolute() or ".." in Path(fname).parts:
        raise UserInputError(f"{where}: weight file {fname!r} is not a file name inside the checkpoint; refused")
    path = directory / fname
    real = path.resolve()
    roots = [directory.resolve()]
    if directory.parent.name == "snapshots":
        roots.append(directory.parent.parent.resolve() / "blobs")
    if not any(real == root or root in real.parents for root in roots):
        raise UserInputError(f"{where}: weight file {fname!r} leads outside the checkpoint (to {real}); refused")
    return path


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


class SourceView:
    """A weight source seen through another: every question goes to `source` unless a subclass answers it (a
    check on each tensor, some tensors rewritten, some left out)."""

    def __init__(self, source: WeightSource):
        self.source = source

    def names(self) -> list[str]:
        return self.source.names()

    def shape(self, name: str) -> tuple[int, ...]:
        return self.source.shape(name)

    def dtype(self, name: str) -> torch.dtype:
        return self.source.dtype(name)

    def get(self, name: str) -> torch.Tensor:
        return self.source.get(name)


class LayerPrefix(SourceView):
    """The source without the decoder layers from `num_layers` on (`exporter.checkpoint.first_layers`)."""

    def __init__(self, source: WeightSource, num_layers: int):
        super().__init__(source)
        layer = re.compile(r"^model\.layers\.(\d+)\.")
        self._names = [n for n in source.names() if not (m := layer.match(n)) or int(m.group(1)) < num_layers]

    def names(self) -> list[str]:
        return list(self._names)


class FiniteWeights(SourceView):
    """A checkpoint's weight source whose tensors are checked for NaN / Inf as they stream in (one `isfinite`
    reduction per tensor, over slices, so no second full-size tensor is held): non-finite weights would build and
    generate garbage with exit code 0. Everything else is the wrapped source's."""

    SLICE = 1 << 24  # elements per reduction: bounds the boolean temporary to 16 MiB

    def __init__(self, source: WeightSource, where: str):
        super().__init__(source)
        self.where = where

    def get(self, name: str) -> torch.Tensor:
        tensor = self.source.get(name)
        if tensor.is_floating_point():
            flat = tensor.reshape(-1)
            for start in range(0, flat.numel(), self.SLICE):
                if not bool(torch.isfinite(flat[start : start + self.SLICE]).all()):
                    raise UserInputError(f"{self.where}: tensor '{name}' holds NaN or infinite values; the "
                                         "checkpoint is corrupt (an engine built from it would generate garbage)")
        return tensor

    def __getattr__(self, attr: str):  # the wrapped source's own attributes (its directory, a seed)
        if attr == "source":
            raise AttributeError(attr)
        return getattr(self.source, attr)


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
