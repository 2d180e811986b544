"""The selections on the GPU kernels, from Python: `PyramidKVSelect` (SnapKV, PyramidKV, H2O), StreamingLLM's and
ChunkKV's, each the chain of kernels `select_stages` describes, launched in order on torch tensors (CUDA, or CPU
under TRITON_INTERPRET=1 where the tests run them against the PyTorch specifications).

The work is spread over the GPU: the score kernels run B x Hc x `splits` programs over shares of the keys, the
top-k kernels B x Hc x `programs` programs over shares of the scores (`triton_scores`, `triton_topk`,
`triton_chunks`, `triton_streaming` say how). The TensorRT plugins launch the same kernels, one plugin per
stage (`trt_plugin`, `trt_chain`). `splits`, `programs`, `block_k` and `align` change only how the work is cut:
the results are the spec's for any of them (the tests cut small rows into many shares to cross every edge).
"""

from __future__ import annotations

import torch

from trt_plugins import select_stages as st
from trt_plugins.chunkkv_select import num_chunks
from trt_plugins.pyramidkv_select import GRANULARITIES, OBSERVE, POOLINGS, as_row_budgets, check_budgets

TORCH_KINDS = {"i64": torch.int64, "i32": torch.int32, "f32": torch.float32}


def allocate(stage: st.Stage, inputs: dict, constants: dict, poison: bool = False) -> dict:
    """The outputs of one stage by its shape rule, on the inputs' device (`poison`: filled with -7 / NaN so that
    an element no program wrote shows)."""
    first = inputs[stage.inputs[0]]
    shapes = {name: tuple(t.shape) for name, t in inputs.items()}
    q_len = shapes["keys"][2] if "keys" in shapes else shapes["raw"][2] if "raw" in shapes else None
    outputs = {}
    for name, shape in zip(stage.outputs, st.output_shapes(stage, st.Dims(first.shape[0], q_len), constants),
                           strict=True):
        kind = st.KINDS.get(name, "f32")
        dtype = inputs[name.removesuffix("_out")].dtype if kind == "data" else TORCH_KINDS[kind]
        outputs[name] = torch.empty(shape, dtype=dtype, device=first.device)
        if poison:
            outputs[name].fill_(float("nan") if outputs[name].is_floating_point() else -7)
    return outputs


def launch(stage: st.Stage, tensors: dict, constants: dict, outputs: dict | None = None) -> dict:
    """Run one stage: `tensors` its inputs by name (contiguous, one device), `outputs` preallocated ones (the
    TensorRT plugin's buffers) or None to allocate them by the stage's shape rule. Returns the outputs by name."""
    inputs = {name: tensors[name].contiguous() for name in stage.inputs}
    if outputs is None:
        outputs = allocate(stage, inputs, constants)
    shapes = {name: tuple(t.shape) for name, t in inputs.items()}
    scalars = [int(v) for v in st.scalar_values(stage, shapes, outputs[stage.outputs[0]].shape[-1])]
    args = [inputs[n] for n in stage.inputs] + scalars + [outputs[n] for n in stage.outputs]
    grid = (stage.grid(inputs[stage.inputs[0]].shape[0], constants),)
    stage.kernel[grid](*args, **{k: constants[k] for k in stage.constexprs},
                       enable_fp_fusion=False)  # no fused multiply-add: the spec's float32, operation by operation
    return outputs


def run_chain(chain: tuple[st.Step, ...], tensors: dict, constants: dict) -> dict:
    """Every step of a chain in order; returns all tensors by name (the last writer of a name wins)."""
    env = dict(tensors)
    for step in chain:
        ins = {p: env[step.source(p)] for p in step.stage.inputs}
        env.update(launch(step.stage, ins, constants | step.constants))
    return env


def _budgets(lengths: torch.Tensor, selected, window: int, q: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    b = lengths.numel()
    lengths = lengths.to(torch.int64).reshape(b)
    budgets = as_row_budgets(selected, b)
    check_budgets(budgets.cpu(), lengths.cpu(), window, q)
    return lengths.to(device).contiguous(), budgets.to(device).contiguous()


def _blocks(q: int, block_k: int, splits: int | None, programs: int | None, align: int | None) -> dict:
    """How the work is cut. Left to None, `splits` / `programs` are the plugins' (`SPLITS`, `PROGRAMS`) or, for a
    short prompt, as many as it has shares of `align` positions (a power of two): no launch of empty programs."""
    align = block_k if align is None else align
    shares = 1 << max(0, -(-q // align) - 1).bit_length()
    return dict(splits=min(st.SPLITS, shares) if splits is None else splits,
                programs=min(st.PROGRAMS, shares) if programs is None else programs, block_k=block_k, align=align)


def pyramidkv_select_triton(queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, lengths: torch.Tensor,
                            selected: int | torch.Tensor, window: int, kernel: int = 7, pooling: str = "max",
                            granularity: str = "kv-head", observe: str = "window", width: int | None = None,
                            block_k: int = st.BLOCK_K, return_scores: bool = False, splits: int | None = None,
                            programs: int | None = None, align: int | None = None):
    """The op on the kernels: same arguments and results as `pyramidkv_select` (queries [B, q, H, d], keys / values
    [B, Hkv, q, d], lengths [B]); `width` pads the output further with -1 slots (a plugin's static width);
    `return_scores` adds the scores [B, Hc, 2, q] float32 (raw, pooled), as the plugin's 4th output."""
    if pooling not in POOLINGS or granularity not in GRANULARITIES or observe not in OBSERVE:
        raise ValueError(f"bad pooling/granularity/observe: {pooling}, {granularity}, {observe}")
    b, q, h, d = queries.shape
    hkv = keys.shape[1]
    if h % hkv or keys.shape[2] != q or window < 1:
        raise ValueError(f"bad shapes: queries {tuple(queries.shape)}, keys {tuple(keys.shape)}, window {window}")
    lengths, budgets = _budgets(lengths, selected, window, q, keys.device)
    if width is None:
        width = (int(budgets.max()) if b else 0) + min(window, q)
    constants = st.pyramidkv_constants(h, hkv, d, window, kernel, pooling, granularity, observe,
                                       **_blocks(q, block_k, splits, programs, align))
    constants["MAX_SELECTED"] = width - min(window, q)
    env = run_chain(st.PYRAMIDKV, dict(queries=queries, keys=keys, values=values, lengths=lengths,
                                       selected=budgets), constants)
    out = env["kept"], env["keys_out"], env["values_out"]
    return (*out, torch.stack([env["raw"], env["pooled"]], dim=2)) if return_scores else out


def streaming_select_triton(keys: torch.Tensor, values: torch.Tensor, lengths: torch.Tensor,
                            selected: int | torch.Tensor, window: int, sinks: int = 4, width: int | None = None,
                            block_k: int = st.BLOCK_K, programs: int | None = None, return_scores: bool = False):
    """StreamingLLM's selection on its kernel: same results as `streaming_select`."""
    b, hkv, q, d = keys.shape
    lengths, budgets = _budgets(lengths, selected, window, q, keys.device)
    if width is None:
        width = (int(budgets.max()) if b else 0) + min(window, q)
    programs = _blocks(max(width, 1), block_k, None, programs, None)["programs"]
    constants = st.streaming_constants(hkv, d, window, sinks, programs=programs, block_k=block_k)
    constants["MAX_SELECTED"] = width - min(window, q)
    env = run_chain(st.STREAMINGLLM, dict(keys=keys, values=values, lengths=lengths, selected=budgets), constants)
    out = env["kept"], env["keys_out"], env["values_out"]
    return (*out, env["scores"]) if return_scores else out


def _trimmed(env: dict, width: int | None):
    """The spec's output width (the longest row's kept tokens) unless a static width was asked for."""
    idx, k, v = env["kept"], env["keys_out"], env["values_out"]
    if width is not None:
        return idx, k, v
    n = int((idx >= 0).sum(-1).max()) if idx.numel() else 0
    return idx[..., :n], k[..., :n, :], v[..., :n, :]


def _chunk_constants(keys, window, chunk_size, kernel, pooling, width, q, num_heads, budgets, blocks) -> dict:
    hkv, d = keys.shape[1], keys.shape[3]
    constants = st.chunkkv_constants(num_heads, hkv, d, window, chunk_size, kernel, pooling, **blocks)
    widest = (int(budgets.max()) if budgets.numel() else 0) + min(window, q)
    constants["MAX_SELECTED"] = (widest if width is None else width) - min(window, q)
    return constants


def chunkkv_select_triton(queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, lengths: torch.Tensor,
                          selected: int | torch.Tensor, window: int, chunk_size: int = 10, kernel: int = 1,
                          pooling: str = "avg", width: int | None = None, block_k: int = st.BLOCK_K,
                          splits: int | None = None, programs: int | None = None, align: int | None = None):
    """ChunkKV on the kernels: same results as `chunkkv_select` (indices, K, V, chunk scores [B, C]); with `width`
    the outputs keep that many slots (the plugin's static width) instead of the longest row's."""
    b, q, h, _ = queries.shape
    lengths, budgets = _budgets(lengths, selected, window, q, keys.device)
    constants = _chunk_constants(keys, window, chunk_size, kernel, pooling, width, q, h, budgets,
                                 _blocks(q, block_k, splits, programs, align))
    env = run_chain(st.CHUNKKV, dict(queries=queries, keys=keys, values=values, lengths=lengths, selected=budgets),
                    constants)
    return (*_trimmed(env, width), env["chunk_scores"])


def chunkkv_from_scores_triton(scores: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, lengths: torch.Tensor,
                               selected: int | torch.Tensor, window: int, chunk_size: int, width: int | None = None,
                               block_k: int = st.BLOCK_K, programs: int | None = None, align: int | None = None):
    """ChunkKV's index reuse on the kernels: same results as `chunkkv_from_scores` (scores [B, C] f32)."""
    q = keys.shape[2]
    if scores.shape[-1] != num_chunks(q, chunk_size):
        raise ValueError(f"chunk scores {tuple(scores.shape)} do not cover {q} tokens in chunks of {chunk_size}")
    lengths, budgets = _budgets(lengths, selected, window, q, keys.device)
    constants = _chunk_constants(keys, window, chunk_size, 1, "none", width, q, keys.shape[1], budgets,
                                 _blocks(q, block_k, None, programs, align))
    env = run_chain(st.CHUNKKV_GATHER, dict(chunk_scores=scores.to(torch.float32), keys=keys, values=values,
                                            lengths=lengths, selected=budgets), constants)
    return _trimmed(env, width)
