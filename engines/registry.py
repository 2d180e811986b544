"""Backends by name: how to open a built engine directory. Heavy imports stay lazy."""

from __future__ import annotations

import importlib
from pathlib import Path

from exporter.engine_dir import read_manifest
from pkv_core.errors import UserInputError

RUNNERS = {"onnx": "engines.ort_engine:OrtEngine", "tensorrt": "engines.trt_engine:TensorRTEngine",
           "trtllm": "engines.trtllm_engine:TrtllmEngine"}


def runner_class(engine_dir: Path, manifest: dict) -> type:
    """The runner class of an engine directory's backend (imported, not instantiated: its class attributes say what
    it can do before any weights load)."""
    backend = manifest["backend"]
    if backend not in RUNNERS:
        raise UserInputError(f"{engine_dir}: backend '{backend}' has no runner here (runners: {', '.join(RUNNERS)})")
    module, cls = RUNNERS[backend].split(":")
    return getattr(importlib.import_module(module), cls)


def open_engine(engine_dir: Path, manifest: dict | None = None, **options):
    """The runner for an engine directory, chosen by its manifest's backend (`manifest`: already read)."""
    if manifest is None:
        manifest = read_manifest(Path(engine_dir))  # checked and verified once, handed to the runner
    return runner_class(engine_dir, manifest)(Path(engine_dir), manifest=manifest, **options)
