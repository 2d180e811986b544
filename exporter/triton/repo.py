"""`pkv-export triton`: a Triton model repository (python backend) serving an engine directory.

Layout written (NAME defaults to "pkv"):
    REPO/NAME/config.pbtxt      backend "python", the batching mode, instance group, the engine location
    REPO/NAME/1/model.py        a shim importing the model class (pkv-export installed): engines.triton_inflight
                                (in-flight batching, decoupled) or engines.triton_model (Triton's dynamic batcher)
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
from exporter.outputs import check_output, staging_dir
from exporter.slot_plan import DEFAULT_STEP_TOKENS
from pkv_core.errors import UserInputError

MARKER = "pkv-triton-repo.json"

MODEL_PY = '''"""Triton python-backend entry point written by pkv-export; the model is in the pkv-export package."""
import os
import site
import sys

# `pkv-export serve` points this at the environment pkv-export is installed in (the backend stub embeds the
# system interpreter, which does not see a virtual environment on its own), and at the pkv-export it runs itself.
if os.environ.get("PKV_SITE_PACKAGES"):
    site.addsitedir(os.environ["PKV_SITE_PACKAGES"])
if os.path.isdir(os.path.join(os.environ.get("PKV_SOURCE_ROOT", ""), "engines")):
    sys.path.insert(0, os.environ["PKV_SOURCE_ROOT"])

from engines.{module} import TritonPythonModel  # noqa: E402,F401
'''
MODEL_MODULES = {"inflight": "triton_inflight", "static": "triton_model"}
BATCHING = ("auto", "inflight", "static")


def inflight_config(name: str, kv_memory: int, max_new_tokens: int, default_new_tokens: int,
                    engine_dir: str = "engine", step_tokens: int = DEFAULT_STEP_TOKENS) -> str:
    """Decoupled (responses sent as tokens come), no Triton batching (the model's scheduler batches), one
    instance (it owns every slot)."""
    return f'''name: "{name}"
backend: "python"
max_batch_size: 0
model_transaction_policy {{ decoupled: true }}
input [
  {{ name: "text_input" data_type: TYPE_STRING dims: [ 1 ] }}
]
output [
  {{ name: "text_output" data_type: TYPE_STRING dims: [ 1 ] }},
  {{ name: "output_ids" data_type: TYPE_INT64 dims: [ -1 ] }},
  {{ name: "finish_reason" data_type: TYPE_STRING dims: [ 1 ] }},
  {{ name: "prompt_tokens" data_type: TYPE_INT64 dims: [ 1 ] }},
  {{ name: "completion_tokens" data_type: TYPE_INT64 dims: [ 1 ] }}
]
instance_group [
  {{ count: 1 kind: KIND_CPU }}
]
parameters {{ key: "batching" value: {{ string_value: "inflight" }} }}
parameters {{ key: "engine_dir" value: {{ string_value: {json.dumps(engine_dir)} }} }}
parameters {{ key: "kv_memory" value: {{ string_value: "{kv_memory}" }} }}
parameters {{ key: "max_new_tokens" value: {{ string_value: "{max_new_tokens}" }} }}
parameters {{ key: "default_max_new_tokens" value: {{ string_value: "{default_new_tokens}" }} }}
parameters {{ key: "step_tokens" value: {{ string_value: "{step_tokens}" }} }}
'''


def choose_batching(manifest: dict, batching: str) -> str:
    """`auto`: in-flight where the engine allows it (onnxruntime target, a policy with known slot sizes), else
    Triton's dynamic batcher; an explicit `inflight` that cannot run is refused with the reason."""
    from exporter.slot_plan import SlotsUnsupported, check_supported
    from methods import check_policy_record

    if batching == "static":
        return "static"
    problem = None
    if manifest["backend"] != "onnx" or manifest["onnx"]["target"] != "onnxruntime":
        problem = f"in-flight batching runs onnxruntime-target engines (this one is a {manifest['backend']} engine)"
    else:
        try:
            check_supported(check_policy_record(manifest["policy"]))
        except SlotsUnsupported as e:
            problem = str(e)
    if problem is None:
        return "inflight"
    if batching == "inflight":
        raise UserInputError(problem)
    return "static"


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
  {{ name: "output_ids" data_type: TYPE_INT64 dims: [ -1 ] }},
  {{ name: "finish_reason" data_type: TYPE_STRING dims: [ 1 ] }},
  {{ name: "prompt_tokens" data_type: TYPE_INT64 dims: [ 1 ] }},
  {{ name: "completion_tokens" data_type: TYPE_INT64 dims: [ 1 ] }}
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
                     copy: bool = True, batching: str | dict[str, str] = "static", kv_memory: int = 1 << 30,
                     max_new_tokens: int = 512, step_tokens: int = DEFAULT_STEP_TOKENS) -> Path:
    """One model per (name -> engine directory). Built in a temporary sibling and renamed at the end.

    copy=False references each engine where it is (absolute path) instead of copying it into the repository:
    what `serve --engine` uses, so a multi-GB engine is not copied at every start. `batching`: "static"
    (Triton's dynamic batcher hands the model groups of requests), "inflight" (the model's own scheduler over
    `kv_memory` bytes of slots sized for `max_new_tokens`, prompts prefilled in chunks under a budget of
    `step_tokens` tokens per step, 0: whole), or "auto" (in-flight where the engine allows it); one mode for every
    model, or a mode per model name."""
    if instances < 1 or max_batch_size < 1 or default_new_tokens < 1 or max_new_tokens < 1 or kv_memory < 1:
        raise UserInputError("--instances, --max-batch-size, --default-max-new-tokens, --max-new-tokens and "
                             "--kv-memory must be at least 1")
    if step_tokens < 0:
        raise UserInputError(f"--step-tokens must be at least 0 (0: prefill every prompt whole; got {step_tokens})")
    per_model = batching if isinstance(batching, dict) else dict.fromkeys(engines, batching)
    if set(per_model) != set(engines) or any(b not in BATCHING for b in per_model.values()):
        raise UserInputError(f"--batching must be one of {', '.join(BATCHING)} for every model")
    check_output(out, "triton-repo", force, engines.values())
    for name in engines:
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
            raise UserInputError(f"model name {name!r}: use letters, digits, '_', '.', '-'")
    # TensorRT engines run on the GPU (the python backend's TensorRT runner registers the pkv plugins in the stub);
    # ONNX engines on CPU instances (onnxruntime picks CUDA by itself where onnxruntime-gpu sees one).
    # TensorRT-LLM checkpoints run through its LLM API (PyTorch backend) inside the same python model, with KV cache
    # block reuse off: an evicting policy changes what a cached block holds, so blocks cannot be shared.
    manifests = {name: read_manifest(engine) for name, engine in engines.items()}  # refuses broken/edited engines
    kinds = {name: "KIND_GPU" if m["backend"] in ("tensorrt", "trtllm") else "KIND_CPU"
             for name, m in manifests.items()}
    modes = {name: choose_batching(m, per_model[name]) for name, m in manifests.items()}
    if instances > 1 and "inflight" in modes.values():
        raise UserInputError("in-flight batching runs one model instance (its scheduler owns every slot): "
                             "drop --instances or use --batching static")
    if "inflight" in modes.values():
        from exporter.slot_plan import plan_slots
        from exporter.specs import ModelSpec
        from methods import check_policy_record

        for name, m in manifests.items():  # a memory that holds no slot is refused before anything is written
            if modes[name] == "inflight":
                spec = ModelSpec.from_dict(m["model"])
                plan_slots(check_policy_record(m["policy"]), spec.num_layers, int(m["cache_heads"]), spec.head_dim,
                           m["dtype"], int(m["max_input_len"]), max_new_tokens, kv_memory)
    with staging_dir(out, "triton-repo", force, engines.values()) as tmp:
        for name, engine in engines.items():
            version = tmp / name / "1"
            version.mkdir(parents=True)
            where = "engine" if copy else str(Path(engine).resolve())
            if modes[name] == "inflight":
                config = inflight_config(name, kv_memory, max_new_tokens, default_new_tokens, where, step_tokens)
            else:
                config = config_pbtxt(name, max_batch_size, instances, queue_delay_us, default_new_tokens, where,
                                      kinds[name])
            (tmp / name / "config.pbtxt").write_text(config)
            (version / "model.py").write_text(MODEL_PY.replace("{module}", MODEL_MODULES[modes[name]]))
            if copy:
                shutil.copytree(engine, version / "engine")
        (tmp / MARKER).write_text(json.dumps({
            "format_version": 1,
            "models": {n: {"engine": str(Path(e).resolve()), "copied": copy, "batching": modes[n]}
                       for n, e in engines.items()},
        }, indent=2))
    return out


def check_repository(repo: Path) -> list[str]:
    """The model names of a Triton model repository to serve, or one line saying why `repo` is not one (an engine
    directory, a directory without models, a sub-directory without a config.pbtxt) before tritonserver starts."""
    repo = Path(repo)
    if not (repo / ".").is_dir():
        raise UserInputError(f"{repo}: no such model repository")
    if (repo / "pkv-engine.json").is_file():
        raise UserInputError(f"{repo} is an engine directory, not a model repository: serve it with --engine {repo} "
                             "(or write a repository from it with `pkv-export triton`)")
    models = []
    for entry in sorted(repo.iterdir()):
        if entry.is_dir():
            if not (entry / "config.pbtxt").is_file():
                raise UserInputError(f"{repo} is not a Triton model repository: {entry.name}/ has no config.pbtxt "
                                     "(one directory per model: NAME/config.pbtxt, NAME/1/model.py)")
            models.append(entry.name)
    if not models:
        raise UserInputError(f"{repo} holds no model (a Triton model repository has one directory per model, "
                             "e.g. written by `pkv-export triton`)")
    return models


def inflight_kv_memory(repo: Path) -> dict[str, int]:
    """name -> the KV bytes (`kv_memory`) each in-flight model of `repo` holds once loaded, read from its config."""
    out = {}
    for name in check_repository(repo):
        config = (Path(repo) / name / "config.pbtxt").read_text(errors="replace")
        memory = re.search(r'key: "kv_memory" value: \{ string_value: "(\d+)" \}', config)
        if memory and re.search(r'key: "batching" value: \{ string_value: "inflight" \}', config):
            out[name] = int(memory.group(1))
    return out
