"""The TensorRT-LLM engine: runs a `build --backend trtllm` directory with TensorRT-LLM 1.2's PyTorch backend and
the `pyramidkv` sparse-attention algorithm of `engines.trtllm_sparse` (GPU hosts only).

The PyTorch backend loads Hugging Face checkpoints: the runner uses the checkpoint recorded in the manifest
(`model.checkpoint_dir`) with the policy of the manifest; the rank files of the same directory are the
TensorRT-engine path's input (`trtllm-build`), which cannot run any KV selection. KV cache block reuse is off
(eviction requires it). Without TensorRT-LLM it says what is missing.

With a compressing policy the hook must run where the model runs: TensorRT-LLM's LLM API puts its executor in a
separate worker process by default, where a class installed here never arrives, so the runner accepts only
tp = pp = 1 and sets TLLM_WORKER_USE_SINGLE_PROCESS=1 before building the LLM, then checks that TensorRT-LLM
took it (engines/trtllm_hook.py says where in TensorRT-LLM's source these facts come from).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from engines.base import GenerationResult, ProgressFn, encode_batch, finish_result
from engines.built import BuiltEngine
from pkv_core.errors import UserInputError

TRTLLM_HINT = ("TensorRT-LLM 1.2 on a GPU host: pip install --extra-index-url https://pypi.nvidia.com "
               "'tensorrt-llm==1.2.*'")


def require_trtllm():
    try:
        import tensorrt_llm
    except ImportError:
        raise UserInputError(f"running a TensorRT-LLM checkpoint needs {TRTLLM_HINT}") from None
    if not tensorrt_llm.__version__.startswith("1.2"):
        raise UserInputError(f"TensorRT-LLM {tensorrt_llm.__version__} found; the pyramidkv integration is written "
                             f"for 1.2 ({TRTLLM_HINT})")
    return tensorrt_llm


class TrtllmEngine(BuiltEngine):
    name = "tensorrt-llm"
    backend = "trtllm"
    reports_kept_indices = False  # TensorRT-LLM's LLM API returns tokens and logits, not what its cache holds

    def __init__(self, engine_dir: Path, device: str = "cuda", manifest: dict | None = None):
        super().__init__(engine_dir, manifest)
        from engines.trtllm_hook import check_world_size
        from engines.trtllm_sparse import hook_spec

        trt = self.manifest["trtllm"]
        fmt = self.manifest.get("weights", {}).get("format", "fp")
        if fmt != "fp":  # the runner loads the Hugging Face checkpoint: it would run unquantized weights, silently
            raise UserInputError(f"{engine_dir}: --weights {fmt} rank files are trtllm-build's input; this runner "
                                 "(TensorRT-LLM's PyTorch backend on the Hugging Face checkpoint) cannot run them")
        compresses = self.policy.compresses
        if compresses:  # what the hook cannot run is refused before anything is loaded, GPU or not
            hook_spec(self.manifest["policy"], self.spec.num_layers, self.max_input_len)
            check_world_size(trt["tp"], trt["pp"])
        require_trtllm()
        if not torch.cuda.is_available():  # pragma: no cover - TensorRT-LLM without a GPU
            raise UserInputError("TensorRT-LLM needs a CUDA GPU")
        self._load(trt, compresses)  # pragma: no cover - GPU host

    def _load(self, trt: dict, compresses: bool) -> None:  # pragma: no cover - TensorRT-LLM 1.2, GPU
        from tensorrt_llm import LLM
        from tensorrt_llm.llmapi import KvCacheConfig

        from engines.trtllm_hook import check_executor_in_process, prepare_process
        from engines.trtllm_sparse import install
        from exporter.trtllm.checkpoint import DTYPES

        checkpoint = self.manifest["model"].get("checkpoint_dir")
        if not checkpoint:
            raise UserInputError(f"{self.dir}: built from random weights; TensorRT-LLM's PyTorch backend needs the "
                                 "Hugging Face checkpoint it came from")
        sparse = None
        if compresses:
            prepare_process(trt["tp"], trt["pp"])  # the executor in this process, where the hook is installed
            sparse = install(self.manifest["policy"], self.spec.num_layers, self.max_input_len)
        self.llm = LLM(model=checkpoint, backend="pytorch", tensor_parallel_size=trt["tp"],
                       pipeline_parallel_size=trt["pp"], sparse_attention_config=sparse,
                       dtype=DTYPES[self.manifest["dtype"]][1],  # the build's --dtype, not the checkpoint's
                       attn_backend="TRTLLM",  # the backend whose sparse class the hook replaces
                       kv_cache_config=KvCacheConfig(enable_block_reuse=False),  # eviction needs reuse off
                       enable_chunked_prefill=False)  # the hook needs whole prompts in one context call
        if sparse is not None:
            check_executor_in_process(self.llm)

    def generate(self, prompts: list[str] | list[list[int]], max_new_tokens: int = 32, *,  # pragma: no cover
                 return_logits: bool = False, return_indices: bool = False,
                 progress: ProgressFn | None = None) -> GenerationResult:
        from tensorrt_llm import SamplingParams

        input_ids, mask, _ = encode_batch(self.tokenizer, prompts, self.pad_id, self.max_input_len, max_new_tokens,
                                          max_positions=self.spec.max_position_embeddings)
        ids = [row[m.bool()].tolist() for row, m in zip(input_ids, mask, strict=True)]
        # Greedy, stopping at every EOS id the other engines stop at (TensorRT-LLM's default is the tokenizer's one).
        params = SamplingParams(max_tokens=max_new_tokens, top_k=1, return_generation_logits=return_logits,
                                stop_token_ids=sorted(self.eos_ids))
        t0 = time.perf_counter()
        outputs = self.llm.generate(ids, params)
        seconds = time.perf_counter() - t0
        tokens = [list(o.outputs[0].token_ids) for o in outputs]
        steps = generation_steps([o.outputs[0].generation_logits for o in outputs],
                                 [len(t) for t in tokens]) if return_logits else []
        if progress:
            progress(max_new_tokens, max_new_tokens)
        return finish_result(self.tokenizer, tokens, mask, steps, return_logits, None, None,
                             {"prefill": 0.0, "decode": seconds})


def generation_steps(rows: list[torch.Tensor], lengths: list[int]) -> list[torch.Tensor]:
    """Per-row generation logits -> one [B, V] float32 tensor per step, as `finish_result` stacks them.

    rows[b]: TensorRT-LLM's `generation_logits` of row b, one row per generated token ([T_b, V], or [1, T_b, V]
    with the beam axis); lengths[b]: its generated tokens (T_b). Rows stop at different steps (EOS): there are
    max(T_b) steps, and a row has no logits after its last token. The other engines feed finished rows pad_id
    (engines/greedy.py) and so compute logits nobody reads; TensorRT-LLM computes none, so those entries are NaN
    ("not computed"), which engines/compare.py does not count against a finished row.
    """
    if len(rows) != len(lengths) or not rows:
        raise ValueError(f"{len(rows)} logits rows for {len(lengths)} generated rows")
    flat = []
    for b, (x, n) in enumerate(zip(rows, lengths, strict=True)):
        if x is None:
            raise ValueError(f"row {b}: TensorRT-LLM returned no generation logits")
        x = x[0] if x.dim() == 3 and x.shape[0] == 1 else x
        if x.dim() != 2 or x.shape[0] != n:
            raise ValueError(f"row {b}: generation logits {tuple(x.shape)} for {n} generated tokens")
        flat.append(x.float().cpu())
    steps = max(lengths)
    padded = torch.full((len(flat), steps, flat[0].shape[-1]), float("nan"))
    for b, x in enumerate(flat):
        padded[b, : x.shape[0]] = x
    return list(padded.unbind(1))
