"""`pkv-export triton`: a Triton model repository (python backend) serving an engine directory.

Layout written (NAME defaults to "pkv"):
    REPO/NAME/config.pbtxt      backend "python", dynamic batching, instance group, the engine location
    REPO/NAME/1/model.py        a shim importing engines.triton_model.TritonPythonModel (pkv-export installed)
    REPO/NAME/1/engine/         a copy of the engine directory (the repository is self-contained), or, with
                                copy=False, nothing: config.pbtxt names the engine directory in place
    REPO/pkv-triton-repo.json   marks the directory as a pkv-export repository (what `--force` may replace)
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

from exporter.engine_dir import read_manifest
from exporter.errors import UserInputError
from exporter.outputs import check_output, staging_dir

MARKER = "pkv-triton-repo.json"

MODEL_PY = '''"""Triton python-backend entry point written by pkv-export; the model is in the pkv-export package."""
import os
import site

# `pkv-export serve` points this at the environment pkv-export is installed in (the backend stub embeds the
# system interpreter, which does not see a virtual environment on its own).
if os.environ.get("PKV_SITE_PACKAGES"):
    site.addsitedir(os.environ["PKV_SITE_PACKAGES"])

from engines.triton_model import TritonPythonModel  # noqa: E402,F401
'''


def config_pbtxt(name: str, max_batch_size: int, instances: int, queue_delay_us: int, default_new_tokens: int,
                 engine_dir: str = "engine", kind: str = "KIND_CPU") -> str:
    return f'''name: "{name}"
backend: "python"
max_batch_size: {max_batch_size}
input [
  {{ name: "text_input" data_type: TYPE_STRING dims: [ 1 ] }}
]
output [
  {{ name: "text_output" data_type: TYPE_STRING dims: [ 1 ] }},
  {{ name: "output_ids" data_type: TYPE_INT64 dims: [ -1 ] }}
]
dynamic_batching {{
  max_queue_delay_microseconds: {queue_delay_us}
}}
instance_group [
  {{ count: {instances} kind: {kind} }}
]
parameters {{ key: "engine_dir" value: {{ string_value: {json.dumps(engine_dir)} }} }}
parameters {{ key: "default_max_new_tokens" value: {{ string_value: "{default_new_tokens}" }} }}
'''


def write_repository(engines: dict[str, Path], out: Path, *, instances: int = 1, max_batch_size: int = 8,
                     queue_delay_us: int = 2000, default_new_tokens: int = 32, force: bool = False,
                     copy: bool = True) -> Path:
    """One model per (name -> engine directory). Built in a temporary sibling and renamed at the end.

    copy=False references each engine where it is (absolute path) instead of copying it into the repository:
    what `serve --engine` uses, so a multi-GB engine is not copied at every start."""
    if instances < 1 or max_batch_size < 1 or default_new_tokens < 1:
        raise UserInputError("--instances, --max-batch-size and --default-max-new-tokens must be at least 1")
    check_output(out, "triton-repo", force, engines.values())
    for name in engines:
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
            raise UserInputError(f"model name {name!r}: use letters, digits, '_', '.', '-'")
    # TensorRT engines run on the GPU (the python backend's TensorRT runner registers the pkv plugins in the stub);
    # ONNX engines on CPU instances (onnxruntime picks CUDA by itself where onnxruntime-gpu sees one).
    # TensorRT-LLM checkpoints run through its LLM API (PyTorch backend) inside the same python model, with KV cache
    # block reuse off: an evicting policy changes what a cached block holds, so blocks cannot be shared.
    kinds = {name: "KIND_GPU" if read_manifest(engine)["backend"] in ("tensorrt", "trtllm") else "KIND_CPU"
             for name, engine in engines.items()}  # read_manifest refuses unfinished, broken or edited engines
    with staging_dir(out, "triton-repo", force, engines.values()) as tmp:
        for name, engine in engines.items():
            version = tmp / name / "1"
            version.mkdir(parents=True)
            where = "engine" if copy else str(Path(engine).resolve())
            (tmp / name / "config.pbtxt").write_text(
                config_pbtxt(name, max_batch_size, instances, queue_delay_us, default_new_tokens, where, kinds[name]))
            (version / "model.py").write_text(MODEL_PY)
            if copy:
                shutil.copytree(engine, version / "engine")
        (tmp / MARKER).write_text(json.dumps({
            "format_version": 1,
            "models": {n: {"engine": str(Path(e).resolve()), "copied": copy} for n, e in engines.items()},
        }, indent=2))
    return out
