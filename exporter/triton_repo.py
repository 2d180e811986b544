"""`pkv-export triton`: a Triton model repository (python backend) serving an engine directory.

Layout written (NAME defaults to "pkv"):
    REPO/NAME/config.pbtxt      backend "python", dynamic batching, instance group, the engine location
    REPO/NAME/1/model.py        a shim importing engines.triton_model.TritonPythonModel (pkv-export installed)
    REPO/NAME/1/engine/         a copy of the engine directory (the repository is self-contained)
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

from exporter.engine_dir import read_manifest, staging_dir
from exporter.errors import UserInputError

MODEL_PY = '''"""Triton python-backend entry point written by pkv-export; the model is in the pkv-export package."""
import os
import site

# `pkv-export serve` points this at the environment pkv-export is installed in (the backend stub embeds the
# system interpreter, which does not see a virtual environment on its own).
if os.environ.get("PKV_SITE_PACKAGES"):
    site.addsitedir(os.environ["PKV_SITE_PACKAGES"])

from engines.triton_model import TritonPythonModel  # noqa: E402,F401
'''


def config_pbtxt(name: str, max_batch_size: int, instances: int, queue_delay_us: int, default_new_tokens: int) -> str:
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
  {{ count: {instances} kind: KIND_CPU }}
]
parameters {{ key: "engine_dir" value: {{ string_value: "engine" }} }}
parameters {{ key: "default_max_new_tokens" value: {{ string_value: "{default_new_tokens}" }} }}
'''


def write_repository(engines: dict[str, Path], out: Path, *, instances: int = 1, max_batch_size: int = 8,
                     queue_delay_us: int = 2000, default_new_tokens: int = 32, force: bool = False) -> Path:
    """One model per (name -> engine directory). Built in a temporary sibling and renamed at the end."""
    if instances < 1 or max_batch_size < 1 or default_new_tokens < 1:
        raise UserInputError("--instances, --max-batch-size and --default-max-new-tokens must be at least 1")
    for name, engine in engines.items():
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
            raise UserInputError(f"model name {name!r}: use letters, digits, '_', '.', '-'")
        read_manifest(engine)  # refuse unfinished or broken engines up front
    with staging_dir(out, force) as tmp:
        for name, engine in engines.items():
            version = tmp / name / "1"
            version.mkdir(parents=True)
            (tmp / name / "config.pbtxt").write_text(
                config_pbtxt(name, max_batch_size, instances, queue_delay_us, default_new_tokens))
            (version / "model.py").write_text(MODEL_PY)
            shutil.copytree(engine, version / "engine")
    return out
