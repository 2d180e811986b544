"""Where the PyramidKV class goes into TensorRT-LLM, and the process it must be in.

TensorRT-LLM cannot be installed here, so these tests rebuild the one structural fact the installation depends
on with real Python modules: `attention_backend/utils.py` binds `get_trtllm_sparse_attn_attention_backend` by
`from .sparse import ...` when it is imported and calls it from `get_attention_backend` (TensorRT-LLM 1.2-era
source). Replacing the name in the module that defines it (what engines/trtllm_sparse.py used to do) leaves
the caller's binding alone; `install_dispatch` rebinds it where the caller looks it up. The names themselves are
data (engines/trtllm_hook.py), pinned here to what the source says.
"""

from __future__ import annotations

import sys
import types

import pytest

from engines import trtllm_hook as hook
from pkv_core.errors import UserInputError

DEFINING = '''
def get_trtllm_sparse_attn_attention_backend(sparse_attn_config):
    if sparse_attn_config.algorithm == "rocket":
        return "RocketTrtllmAttention"
    raise ValueError(sparse_attn_config.algorithm)
'''
CALLING = '''
from {defining} import get_trtllm_sparse_attn_attention_backend


def get_attention_backend(backend_name, sparse_attn_config=None):
    if backend_name == "TRTLLM":
        if sparse_attn_config is not None:
            return get_trtllm_sparse_attn_attention_backend(sparse_attn_config)
        return "TrtllmAttention"
    return "VanillaAttention"


def create_attention(backend_name, sparse_attention_config=None):
    return get_attention_backend(backend_name, sparse_attention_config)
'''


@pytest.fixture()
def modules(monkeypatch, request):
    """A defining module and a caller that imported the name from it when it was imported, as in 1.2."""
    suffix = request.node.name.replace("[", "_").replace("]", "_")
    defining = types.ModuleType(f"pkv_fake_sparse_utils_{suffix}")
    exec(compile(DEFINING, defining.__name__, "exec"), defining.__dict__)
    monkeypatch.setitem(sys.modules, defining.__name__, defining)
    calling = types.ModuleType(f"pkv_fake_attention_utils_{suffix}")
    exec(compile(CALLING.format(defining=defining.__name__), calling.__name__, "exec"), calling.__dict__)
    return defining, calling


class Ours:
    pass


def rocket(budget=12, window=4):
    return types.SimpleNamespace(algorithm="rocket", prompt_budget=budget, window_size=window)


def choose(config):
    return Ours if config.algorithm == "rocket" and config.prompt_budget == 12 else None


def test_replacing_the_name_where_it_is_defined_does_not_reach_the_caller(modules):
    """Issue 26 #6: the old installation point. The stock class keeps running, silently."""
    defining, calling = modules
    setattr(defining, hook.DISPATCH_NAME, lambda config: Ours)
    assert calling.get_attention_backend("TRTLLM", rocket()) == "RocketTrtllmAttention"


def test_install_dispatch_rebinds_the_name_where_the_caller_looks_it_up(modules):
    _, calling = modules
    original = hook.install_dispatch(calling.get_attention_backend, hook.DISPATCH_NAME, choose)
    assert calling.get_attention_backend("TRTLLM", rocket()) is Ours
    assert calling.create_attention("TRTLLM", rocket()) is Ours  # create_attention goes through it
    assert calling.get_attention_backend("TRTLLM", rocket(budget=99)) == "RocketTrtllmAttention"  # not ours
    assert calling.get_attention_backend("TRTLLM") == "TrtllmAttention"
    assert original(rocket()) == "RocketTrtllmAttention"


def test_installing_twice_does_not_stack(modules):
    _, calling = modules
    hook.install_dispatch(calling.get_attention_backend, hook.DISPATCH_NAME, choose)
    first = calling.__dict__[hook.DISPATCH_NAME].__pkv_original__
    hook.install_dispatch(calling.get_attention_backend, hook.DISPATCH_NAME, lambda config: None)
    assert calling.__dict__[hook.DISPATCH_NAME].__pkv_original__ is first
    assert calling.get_attention_backend("TRTLLM", rocket()) == "RocketTrtllmAttention"


def test_a_caller_that_does_not_call_the_name_is_refused(modules):
    """A TensorRT-LLM that chooses its class elsewhere fails here instead of running RocketKV silently."""
    _, calling = modules
    with pytest.raises(hook.HookError, match="does not call"):
        hook.install_dispatch(calling.create_attention, hook.DISPATCH_NAME, choose)
    with pytest.raises(hook.HookError):
        hook.install_dispatch(print, hook.DISPATCH_NAME, choose)


def test_names_are_those_of_the_tensorrt_llm_source():
    """tensorrt_llm/_torch/attention_backend/utils.py (get_attention_backend calls the name it imported from
    .sparse), sparse/rocket.py (RocketTrtllmAttention), llmapi/utils.py (enable_worker_single_process_for_tp1
    reads TLLM_WORKER_USE_SINGLE_PROCESS == "1"), executor/executor.py (GenerationExecutorWorker in process)."""
    assert hook.DISPATCH_CALLER == ("tensorrt_llm._torch.attention_backend.utils", "get_attention_backend")
    assert hook.DISPATCH_NAME == "get_trtllm_sparse_attn_attention_backend"
    assert hook.ROCKET_CLASS == ("tensorrt_llm._torch.attention_backend.sparse.rocket", "RocketTrtllmAttention")
    assert hook.ROCKET_ALGORITHM == "rocket"
    assert hook.SINGLE_PROCESS_ENV == "TLLM_WORKER_USE_SINGLE_PROCESS"
    assert hook.SINGLE_PROCESS_PROBE == ("tensorrt_llm.llmapi.utils", "enable_worker_single_process_for_tp1")
    assert hook.IN_PROCESS_EXECUTOR == "GenerationExecutorWorker"


def test_the_executor_is_forced_into_this_process_with_the_one_value_tensorrt_llm_accepts():
    """Issue 26 #7: TensorRT-LLM compares the variable with "1" exactly; anything else means a worker process."""
    env: dict[str, str] = {}
    hook.force_single_process(env)
    assert env == {hook.SINGLE_PROCESS_ENV: "1"}
    hook.force_single_process(env)
    assert env == {hook.SINGLE_PROCESS_ENV: "1"}
    for value in ("0", "true", ""):
        with pytest.raises(UserInputError, match=hook.SINGLE_PROCESS_ENV):
            hook.force_single_process({hook.SINGLE_PROCESS_ENV: value})


@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2), (2, 2)])
def test_more_than_one_rank_is_refused(tp, pp):
    """With a model world size above 1 TensorRT-LLM spawns MPI workers whatever the variable says."""
    hook.check_world_size(1, 1)
    with pytest.raises(UserInputError, match="MPI worker processes"):
        hook.check_world_size(tp, pp)
