"""A safetensors file written tensor by tensor: the header (every name, dtype, shape, offset) is known before
the first byte of data, so tensors are written straight to their offsets as they are produced, and a rank file
of a 70B model never has to exist in memory at once."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import torch

DTYPES = {torch.float32: ("F32", 4), torch.float16: ("F16", 2), torch.bfloat16: ("BF16", 2), torch.int8: ("I8", 1)}


class StreamingSafetensors:
    def __init__(self, path: Path, layout: dict[str, tuple[tuple[int, ...], torch.dtype]],
                 metadata: dict | None = None):
        """layout: name -> (shape, dtype), in file order."""
        self.path = Path(path)
        header: dict = {"__metadata__": metadata or {"format": "pt"}}
        offset = 0
        self.offsets: dict[str, tuple[int, int]] = {}
        for name, (shape, dtype) in layout.items():
            code, item = DTYPES[dtype]
            size = item * int(torch.Size(shape).numel())
            header[name] = {"dtype": code, "shape": list(shape), "data_offsets": [offset, offset + size]}
            self.offsets[name] = (offset, size)
            offset += size
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
        self.data_start = 8 + len(raw)
        self.layout = layout
        self.written: set[str] = set()
        self._file = self.path.open("wb")
        self._file.write(struct.pack("<Q", len(raw)) + raw)
        self._file.truncate(self.data_start + offset)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        shape, dtype = self.layout[name]
        if tuple(tensor.shape) != tuple(shape) or tensor.dtype != dtype:
            raise ValueError(f"{name}: {tuple(tensor.shape)} {tensor.dtype}, planned {tuple(shape)} {dtype}")
        start, size = self.offsets[name]
        data = tensor.contiguous().reshape(-1).view(torch.uint8).numpy()  # bytes without a copy (bf16 included)
        assert data.nbytes == size
        self._file.seek(self.data_start + start)
        self._file.write(data)
        self.written.add(name)

    def close(self, check: bool = True) -> None:
        self._file.close()
        if not check:  # abandoning a failed write: the staging directory goes away with it
            return
        missing = set(self.layout) - self.written
        if missing:
            raise ValueError(f"{self.path.name}: tensors planned but never written: {sorted(missing)[:3]}")
