"""Shared fixtures: tiny models (deterministic random weights) and checkpoints written from them."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch

# Triton-lang kernels run under the interpreter on a machine without a GPU. Triton reads this once, when a kernel
# is first defined, and torch may import triton early: set it before any test module loads.
if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
from safetensors.torch import save_file

from exporter.checkpoint import LoadedModel, load_model
from exporter.specs import ModelSpec, tensor_shapes

TINY_MODELS = ["tiny-llama3", "tiny-mistral"]


def pytest_configure(config):
    """One thread per process: the tests run tiny models, where a thread pool only waits, and pytest-xdist runs
    several workers (torch here; torch and onnxruntime in every process a test starts, through the environment).

    Under pytest-xdist every worker also gets a temporary directory of its own (TMPDIR, inherited by every process
    it starts): a starting `serve` removes what dead processes left in the temporary directory, and a test that
    kills one looks for exactly those leftovers, so no worker may sweep another's."""
    torch.set_num_threads(1)
    # The machinery's tests run the tiny presets: without --model, every command (in-process or a subprocess)
    # takes tiny-llama3 rather than the real default model; tests of the real model name it.
    os.environ["PKV_EXPORT_MODEL"] = "tiny-llama3"
    os.environ["OMP_NUM_THREADS"] = "1"
    os.environ["PKV_ORT_THREADS"] = "1"  # engines.ort_engine.THREADS_ENV
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    if worker:
        own = Path(tempfile.gettempdir()) / f"pkv-tests-{worker}-{os.getpid()}"
        own.mkdir(exist_ok=True)
        config.pkv_tmpdir = own
        os.environ["TMPDIR"] = str(own)
        tempfile.tempdir = None  # gettempdir() reads TMPDIR again


def pytest_unconfigure(config):
    own = getattr(config, "pkv_tmpdir", None)
    if own is not None:
        shutil.rmtree(own, ignore_errors=True)


@pytest.fixture(scope="session", autouse=True)
def isolated_hash_cache(tmp_path_factory):
    """The sha256 cache of verified engine files lives in a per-session directory, never the user's."""
    import os

    os.environ["PKV_EXPORT_CACHE_DIR"] = str(tmp_path_factory.mktemp("pkv-cache"))


@pytest.fixture(scope="session", params=TINY_MODELS)
def tiny(request) -> LoadedModel:
    return load_model(request.param)


def write_checkpoint(loaded: LoadedModel, directory: Path, shards: int = 1) -> Path:
    """Write a Hugging Face checkpoint directory (config, tokenizer, safetensors, sharded with an index)."""
    directory.mkdir(parents=True, exist_ok=True)
    spec: ModelSpec = loaded.spec
    spec.to_hf_config().save_pretrained(directory)
    loaded.tokenizer().save_pretrained(directory)
    names = list(tensor_shapes(spec))
    tensors = {n: loaded.weights.get(n).contiguous() for n in names}
    if shards == 1:
        save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
        return directory
    chunk = -(-len(names) // shards)
    weight_map = {}
    for i in range(shards):
        fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = names[i * chunk : (i + 1) * chunk]
        save_file({n: tensors[n] for n in part}, str(directory / fname), metadata={"format": "pt"})
        weight_map.update({n: fname for n in part})
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return directory


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    return write_checkpoint(load_model("tiny-llama3"), tmp_path_factory.mktemp("ckpt") / "tiny-llama3")


@pytest.fixture(scope="session")
def built_engine(tmp_path_factory):
    """built_engine(model, method, options=None, target="onnxruntime") -> (OrtEngine, ReferenceEngine): the ONNX
    engine of `method` with tests/matrix.py's small settings plus `options` (None: the matrix's defaults for it),
    max input 1024 tokens, and the reference with the same policy. Built once per session (per xdist worker) for
    every test that asks for the same engine."""
    from engines.ort_engine import OrtEngine
    from engines.reference import ReferenceEngine
    from exporter.onnx.export import build_onnx_engine
    from methods import make_policy
    from tests import matrix

    cache: dict = {}

    def get(model: str, name: str, options: dict | None = None, target: str = "onnxruntime"):
        options = matrix.small(name, **(matrix.DEFAULTS.get(name, {}) if options is None else options))
        key = (model, name, tuple(sorted(options.items())), target)
        if key not in cache:
            loaded = load_model(model)
            policy = make_policy(name, **options)
            out = tmp_path_factory.mktemp("engines") / f"{model}-{name}-{target}"
            build_onnx_engine(loaded, policy, out, max_input_len=1024, target=target)
            cache[key] = (OrtEngine(out), ReferenceEngine(loaded, policy))
        return cache[key]

    return get
