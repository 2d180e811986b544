"""The TensorRT-LLM sparse-attention hook, built on CPU: what the context phase keeps per KV head equals the op
specification with the per-request budget, in RocketKV's layout (sorted positions relative to each sequence,
offsets), from either form of input RocketKV's hook receives; the attention class answers like that for a batch
of context and generation tokens; what it cannot run is refused; without TensorRT-LLM a checkpoint cannot be
run, which says so in one line."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from click.testing import CliRunner

from engines.trtllm_sparse import HookSpec, attention_class, context_indices, hook_spec, split_context
from methods import make_policy
from methods.budgets import pyramid_selected
from pkv_cli import main
from pkv_core.errors import UserInputError
from tests.engines.trtllm_fakes import HKV, D, FakeRocket, H, metadata
from trt_plugins.pyramidkv_select import pyramidkv_select

SPEC = HookSpec(budget=12, window=4, kernel=7, pooling="max")


def spec_segment(q: torch.Tensor, k: torch.Tensor, n: int, spec: HookSpec) -> torch.Tensor:
    """The op specification's kept positions of one sequence ([Hkv, kept] int64), straight from pyramidkv_select."""
    if n < spec.budget:
        return torch.arange(n).expand(HKV, n)
    want, _, _ = pyramidkv_select(q.reshape(1, n, H, D), k.reshape(n, HKV, D).transpose(0, 1)[None],
                                  torch.zeros(1, HKV, n, D), torch.tensor([n]), spec.budget - spec.window,
                                  spec.window, spec.kernel, spec.pooling)
    return want[0]


def test_context_indices_equal_the_spec_per_sequence():
    g = torch.Generator().manual_seed(0)
    lens = [40, 9, 25]  # the middle one is shorter than the budget: kept whole
    q, k = torch.randn(sum(lens), H * D, generator=g), torch.randn(sum(lens), HKV * D, generator=g)
    indices, offsets = context_indices(q, k, lens, H, HKV, D, SPEC)
    assert indices.dtype == torch.int32 and offsets.tolist() == [0, 12, 21, 33]
    start = 0
    for b, n in enumerate(lens):
        segment = indices[:, offsets[b] : offsets[b + 1]]
        assert torch.equal(segment.long(), spec_segment(q[start : start + n], k[start : start + n], n, SPEC))
        assert all(row == sorted(row) for row in segment.tolist()), "sorted, as the C++ compaction needs"
        start += n


def test_fused_and_separate_inputs_select_the_same_context_tokens():
    """RocketKV's hook gets the fused qkv (k None) or q and k apart, context tokens before generation tokens."""
    g = torch.Generator().manual_seed(1)
    ctx, gen = 30, 3
    qkv = torch.randn(ctx + gen, (H + 2 * HKV) * D, generator=g)
    q_f, k_f = split_context(qkv, None, ctx, H, HKV, D)
    q_s, k_s = split_context(qkv[:, : H * D], qkv[:, H * D : (H + HKV) * D], ctx, H, HKV, D)
    assert q_f.shape == (ctx, H * D) and k_f.shape == (ctx, HKV * D)
    assert torch.equal(q_f, q_s) and torch.equal(k_f, k_s) and torch.equal(k_f, qkv[:ctx, H * D : (H + HKV) * D])


def test_attention_class_answers_with_the_spec_and_turns_decode_sparsity_off():
    g = torch.Generator().manual_seed(2)
    lens, gen = [40, 9, 25], 2  # two generation tokens of other requests follow the context tokens
    qkv = torch.randn(sum(lens) + gen, (H + 2 * HKV) * D, generator=g)
    layer = attention_class(FakeRocket, SPEC)(layer_idx=3)
    indices, offsets = layer.sparse_kv_predict(qkv, None, metadata(lens))
    q, k, _ = qkv[: sum(lens)].split([H * D, HKV * D, HKV * D], dim=-1)
    start = 0
    for b, n in enumerate(lens):
        got = indices[:, offsets[b] : offsets[b + 1]].long()
        assert torch.equal(got, spec_segment(q[start : start + n], k[start : start + n], n, SPEC))
        start += n
    assert layer.sparse_attn_predict(qkv, None, metadata(lens)) == (None, None)
    no_context = SimpleNamespace(num_contexts=0, context_lens=torch.tensor([]), num_ctx_tokens=0)
    assert layer.sparse_kv_predict(qkv, None, no_context) == (None, None)
    assert layer.sparse_kv_predict(qkv[:20], None, metadata([9, 11])) == (None, None)  # nothing reaches the budget


def test_attention_class_refuses_split_prompts():
    qkv = torch.randn(20, (H + 2 * HKV) * D)
    bad = SimpleNamespace(num_contexts=1, context_lens=torch.tensor([20]), num_ctx_tokens=15)
    with pytest.raises(RuntimeError, match="chunked prefill"):
        attention_class(FakeRocket, SPEC)(0).sparse_kv_predict(qkv, None, bad)


def test_hook_spec_is_the_largest_layer_budget_and_refuses_what_it_would_run_as_snapkv():
    policy = make_policy("pyramidkv", kv_budget=32, window=4)
    record = {"name": policy.name, **policy.hyperparameters()}
    spec = hook_spec(record, 4, 1024)
    assert spec == HookSpec(max(pyramid_selected(4, 32, 4, 1024)) + 4, 4, 7, "max")
    assert hook_spec(record, 4, 20).budget == 21  # no prompt of <= 20 tokens is compressed: a budget above them
    for name, extra in (("streamingllm", {}), ("h2o", {}), ("chunkkv", {}), ("snapkv", {"granularity": "query-head"})):
        other = make_policy(name, **extra)
        with pytest.raises(UserInputError):
            hook_spec({"name": other.name, **other.hyperparameters()}, 4, 1024)


@pytest.fixture()
def no_tensorrt_llm():
    try:
        import tensorrt_llm  # noqa: F401
        pytest.skip("TensorRT-LLM is installed here")
    except ImportError:
        pass


def test_running_a_checkpoint_without_tensorrt_llm_is_one_line(tmp_path, no_tensorrt_llm):
    out = tmp_path / "ckpt"
    assert CliRunner().invoke(main, ["build", "--backend", "trtllm", "--out", str(out)]).exit_code == 0
    r = CliRunner().invoke(main, ["generate", "--engine", str(out), "--prompt", "hi"])
    assert r.exit_code == 2 and "tensorrt-llm==1.2" in r.stderr and "Traceback" not in r.stderr


def test_what_the_hook_cannot_run_is_refused_before_tensorrt_llm_is_needed(tmp_path, no_tensorrt_llm):
    out = tmp_path / "ckpt"
    assert CliRunner().invoke(main, ["build", "--backend", "trtllm", "--tp", "2", "--out", str(out)]).exit_code == 0
    r = CliRunner().invoke(main, ["generate", "--engine", str(out), "--prompt", "hi"])
    assert r.exit_code == 2 and "MPI worker processes the hook cannot reach" in r.stderr, r.output
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize("args", [["--policy", "streamingllm"], ["--policy", "chunkkv"], ["--policy", "h2o"],
                                  ["--policy", "kvzip"], ["--policy", "pyramidinfer"],
                                  ["--policy", "snapkv", "--granularity", "query-head"]])
def test_build_refuses_what_the_trtllm_hook_cannot_run(tmp_path, args):
    """The hook selects like SnapKV over KV heads: any other method (or query heads) is refused when the checkpoint
    is built, not run as SnapKV later; nothing is written."""
    out = tmp_path / "ckpt"
    r = CliRunner().invoke(main, ["build", "--backend", "trtllm", *args, "--out", str(out)])
    assert r.exit_code == 2 and "cannot run on --backend trtllm" in r.stderr and "Traceback" not in r.stderr
    assert not out.exists()
