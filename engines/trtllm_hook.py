"""Where and how the PyramidKV attention class is put into TensorRT-LLM 1.2, and the process it must run in.

Facts read in TensorRT-LLM's source (1.2-era files, see the report of issue 26 for the versions read):

* `tensorrt_llm/_torch/attention_backend/utils.py` imports `get_trtllm_sparse_attn_attention_backend` from
  `.sparse` when it is imported (`from .sparse import (...)`), and `get_attention_backend(backend_name,
  sparse_attn_config)` calls that name for the "TRTLLM" backend when a sparse config is given. The name is
  looked up in *that* module's globals at call time, so replacing `sparse.utils.<name>` afterwards changes
  nothing: the stock `RocketTrtllmAttention` still runs. `create_attention` (same module) calls
  `get_attention_backend`, so one binding covers both.
* `sparse/utils.py` dispatches on `sparse_attn_config.algorithm` in an if/elif chain; the LLM API's
  sparse-attention config is a pydantic union discriminated by `algorithm` ("rocket", "dsa", ...), so there
  is no registry and no new algorithm name can be passed through. The class is therefore swapped at the
  caller's binding, for configs whose algorithm is "rocket" (which also keeps RocketKV's KV cache manager,
  its metadata, and the attention module's `rope_fusion = False` for "rocket", i.e. post-RoPE q/k in the hook).
* `tensorrt_llm/llmapi/utils.py`: `enable_worker_single_process_for_tp1()` is `@cache`d and returns
  `os.environ.get("TLLM_WORKER_USE_SINGLE_PROCESS", "0") == "1"`; `tensorrt_llm/executor/executor.py`
  (`GenerationExecutor.create`) builds the in-process `GenerationExecutorWorker` only when no MPI workers are
  spawned (model world size 1) and that function (or return_logits) says so; otherwise the executor, and the
  model whose attention classes we replace, live in another process that never sees a patch made here.

The installation point is not hard-coded as a module attribute: it is read from the calling function itself
(`installation_point`), which must load the name as a global, so a TensorRT-LLM that moved the call elsewhere
fails loudly here instead of silently running RocketKV.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable, MutableMapping
from types import FunctionType

from pkv_core.errors import UserInputError

# (module, function) that chooses the attention class, and the name it calls to do so (1.2 source, above).
DISPATCH_CALLER = ("tensorrt_llm._torch.attention_backend.utils", "get_attention_backend")
DISPATCH_NAME = "get_trtllm_sparse_attn_attention_backend"
ROCKET_CLASS = ("tensorrt_llm._torch.attention_backend.sparse.rocket", "RocketTrtllmAttention")
ROCKET_ALGORITHM = "rocket"
# The executor runs in this process only with this variable set to exactly "1" (llmapi/utils.py, executor.py).
SINGLE_PROCESS_ENV = "TLLM_WORKER_USE_SINGLE_PROCESS"
SINGLE_PROCESS_PROBE = ("tensorrt_llm.llmapi.utils", "enable_worker_single_process_for_tp1")
IN_PROCESS_EXECUTOR = "GenerationExecutorWorker"  # tensorrt_llm/executor/worker.py; the proxy is another class


class HookError(RuntimeError):
    """The running TensorRT-LLM is not laid out the way the hook was written for."""


def installation_point(caller: Callable, name: str) -> MutableMapping:
    """The namespace in which `caller` looks `name` up when it runs (its module's globals), checked to be so."""
    if not isinstance(caller, FunctionType):
        raise HookError(f"{caller!r} is not a Python function: cannot find where it looks up {name}")
    if name not in caller.__code__.co_names:
        raise HookError(f"{caller.__module__}.{caller.__qualname__} does not call {name}: this TensorRT-LLM "
                        "chooses its sparse attention class elsewhere; the PyramidKV hook would not run")
    if name not in caller.__globals__:
        raise HookError(f"{name} is not bound in {caller.__module__}")
    return caller.__globals__


def install_dispatch(caller: Callable, name: str, choose: Callable[[object], type | None]) -> Callable:
    """Rebind `name` where `caller` looks it up: `choose(config)` first, the original when it returns None.
    Idempotent: a second install replaces the first one's choice instead of stacking. Returns the original."""
    namespace = installation_point(caller, name)
    original = getattr(namespace[name], "__pkv_original__", namespace[name])

    def dispatch(config):
        chosen = choose(config)
        return chosen if chosen is not None else original(config)

    dispatch.__pkv_original__ = original
    namespace[name] = dispatch
    return original


def resolve(path: tuple[str, str]):
    module, attr = path
    return getattr(importlib.import_module(module), attr)


def force_single_process(environ: MutableMapping[str, str]) -> None:
    """Make TensorRT-LLM build its executor in this process (where the hook is installed): set the variable to
    "1", the only value it accepts; refuse a caller who set it to anything else."""
    value = environ.get(SINGLE_PROCESS_ENV)
    if value not in (None, "1"):
        raise UserInputError(f"{SINGLE_PROCESS_ENV}={value}: the PyramidKV hook needs TensorRT-LLM's executor in "
                             f"this process (unset it or set it to 1)")
    environ[SINGLE_PROCESS_ENV] = "1"


def check_world_size(tp: int, pp: int) -> None:
    """With more than one rank TensorRT-LLM spawns MPI workers whatever the variable says: the hook cannot reach
    their attention classes."""
    if tp * pp != 1:
        raise UserInputError(f"the PyramidKV hook runs only with --tp 1 --pp 1 on TensorRT-LLM (this checkpoint: "
                             f"tp {tp}, pp {pp}): with more ranks the model lives in MPI worker processes the hook "
                             "cannot reach; build with --tp 1 --pp 1, or use --policy full")


def prepare_process(tp: int, pp: int) -> None:  # pragma: no cover - needs TensorRT-LLM
    """Before `LLM(...)`: one rank, the executor forced into this process, and TensorRT-LLM agreeing (its answer
    is cached on first use, so an earlier LLM in this process may have fixed it to False)."""
    check_world_size(tp, pp)
    force_single_process(os.environ)
    if not resolve(SINGLE_PROCESS_PROBE)():
        raise UserInputError(f"TensorRT-LLM already decided to run its executor in a worker process "
                             f"({SINGLE_PROCESS_ENV} was read before it was set): start a fresh process")


def check_executor_in_process(llm) -> None:  # pragma: no cover - needs TensorRT-LLM
    executor = getattr(llm, "_executor", None)
    if type(executor).__name__ != IN_PROCESS_EXECUTOR:
        raise HookError(f"TensorRT-LLM's executor is a {type(executor).__name__}, not the in-process "
                        f"{IN_PROCESS_EXECUTOR}: the PyramidKV hook would not run")
