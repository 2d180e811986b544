"""The onnxruntime engine: runs an engine directory built by `build --backend onnx`.

The generation loop is written on `onnxruntime.InferenceSession` (onnxruntime-genai cannot run per-layer cache
lengths). Caches stay in onnxruntime's memory between steps through I/O binding: each step's `present.*`
OrtValues are bound as the next step's `past_key_values.*` without a round trip through numpy.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from engines.base import (
    GenerationResult,
    ProgressFn,
    encode_batch,
    eos_ids,
    finish_result,
    pad_id,
    unpad_indices,
)
from engines.greedy import greedy_loop
from exporter.engine_dir import read_manifest
from exporter.errors import UserInputError
from exporter.specs import ModelSpec

CACHE_PARTS = ("key", "value", "positions")


def choose_providers(device: str = "auto") -> list[str]:
    """CPU by default; CUDA when asked for (or on auto) and onnxruntime-gpu sees a GPU."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    if device == "cuda":
        if "CUDAExecutionProvider" not in available:
            raise UserInputError("--device cuda needs onnxruntime-gpu and a GPU (pip install 'pkv-export[gpu]'); "
                                 f"available providers: {', '.join(available)}")
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    if device == "auto" and "CUDAExecutionProvider" in available:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


class OrtEngine:
    name = "onnxruntime"

    def __init__(self, engine_dir: Path, device: str = "cpu", threads: int = 0, manifest: dict | None = None):
        import onnxruntime as ort
        from transformers import AutoTokenizer

        self.dir = Path(engine_dir)
        self.manifest = manifest if manifest is not None else read_manifest(self.dir)
        if self.manifest.get("backend") != "onnx":
            raise UserInputError(f"{self.dir}: a '{self.manifest.get('backend')}' engine, not an onnx one")
        self.spec = ModelSpec.from_dict(self.manifest["model"])
        self.max_input_len = int(self.manifest["max_input_len"])
        self.tokenizer = AutoTokenizer.from_pretrained(str(self.dir / self.manifest["tokenizer"]),
                                                       local_files_only=True, trust_remote_code=False)
        self.tokenizer.padding_side = "left"
        self.pad_id = pad_id(self.tokenizer)
        self.eos_ids = eos_ids(self.spec.eos_token_id, self.tokenizer)
        self.providers = choose_providers(device)

        def options(arena: bool):
            opts = ort.SessionOptions()
            opts.log_severity_level = 3
            opts.intra_op_num_threads = threads
            opts.enable_cpu_mem_arena = arena
            return opts

        try:
            # The prefill's peak (the [B, H, q, q] attention) would stay reserved in the CPU arena after the run;
            # without the arena it is returned, so a long prompt does not pin its peak for the engine's life.
            self.prefill = ort.InferenceSession(str(self.dir / "prefill.onnx"), options(arena=False),
                                                providers=self.providers)
            self.decode = ort.InferenceSession(str(self.dir / "decode.onnx"), options(arena=True),
                                               providers=self.providers)
        except Exception as e:  # onnxruntime raises its own exception types
            raise UserInputError(f"{self.dir}: onnxruntime cannot load the engine ({str(e).splitlines()[0]})") from None
        self.device_type = "cuda" if self.providers[0] == "CUDAExecutionProvider" else "cpu"
        self.prefill_outputs = [o.name for o in self.prefill.get_outputs()]
        self.decode_outputs = [o.name for o in self.decode.get_outputs()]

    def run_prefill(self, input_ids: np.ndarray, mask: np.ndarray, positions: np.ndarray) -> dict:
        """One prefill through I/O binding; returns {output name: OrtValue}."""
        binding = self.prefill.io_binding()
        for name, array in (("input_ids", input_ids), ("attention_mask", mask), ("position_ids", positions)):
            binding.bind_cpu_input(name, np.ascontiguousarray(array, dtype=np.int64))
        for name in self.prefill_outputs:
            binding.bind_output(name, self.device_type)
        self.prefill.run_with_iobinding(binding)
        return dict(zip(self.prefill_outputs, binding.get_outputs(), strict=True))

    def run_decode(self, cache: dict, token: np.ndarray, position: np.ndarray) -> dict:
        """One decode step; `cache` maps present.{i}.* names to OrtValues from the previous run."""
        binding = self.decode.io_binding()
        binding.bind_cpu_input("input_ids", np.ascontiguousarray(token.reshape(-1, 1), dtype=np.int64))
        binding.bind_cpu_input("position_ids", np.ascontiguousarray(position.reshape(-1, 1), dtype=np.int64))
        for layer in range(self.spec.num_layers):
            for part in CACHE_PARTS:
                binding.bind_ortvalue_input(f"past_key_values.{layer}.{part}", cache[f"present.{layer}.{part}"])
        for name in self.decode_outputs:
            binding.bind_output(name, self.device_type)
        self.decode.run_with_iobinding(binding)
        return dict(zip(self.decode_outputs, binding.get_outputs(), strict=True))

    def cache_bytes(self, outputs: dict) -> int:
        """Bytes of K/V actually held (positions excluded) in a set of present.* outputs."""
        total = 0
        for layer in range(self.spec.num_layers):
            for part in ("key", "value"):
                value = outputs[f"present.{layer}.{part}"]
                total += int(np.prod(value.shape())) * (2 if "float16" in value.data_type() else 4)
        return total

    def generate(
        self,
        prompts: list[str] | list[list[int]],
        max_new_tokens: int = 32,
        *,
        return_logits: bool = False,
        return_indices: bool = False,
        progress: ProgressFn | None = None,
    ) -> GenerationResult:
        input_ids, mask, positions = encode_batch(self.tokenizer, prompts, self.pad_id, self.max_input_len,
                                                  max_new_tokens)
        t0 = time.perf_counter()
        outputs = self.run_prefill(input_ids.numpy(), mask.numpy(), positions.numpy())
        timings = {"prefill": time.perf_counter() - t0}
        kept_raw = [outputs[f"kept_indices.{i}"].numpy() for i in range(self.spec.num_layers)]  # [B, Hc, n_i]
        kept = [unpad_indices(torch.from_numpy(k), mask) for k in kept_raw] if return_indices else None
        timings["kv_bytes_after_prefill"] = self.cache_bytes(outputs)
        cache = {k: v for k, v in outputs.items() if k.startswith("present.")}

        def step(token: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
            nonlocal cache
            out = self.run_decode(cache, token.numpy(), pos.numpy())
            cache = {k: v for k, v in out.items() if k.startswith("present.")}
            return torch.from_numpy(out["logits"].numpy())

        first = torch.from_numpy(outputs["logits"].numpy())
        generated, step_logits, timings["decode"] = greedy_loop(
            first, positions[:, -1] + 1, step, self.eos_ids, self.pad_id, max_new_tokens, progress
        )
        pol, lengths = self.manifest["policy"], mask.sum(-1)
        selected = None
        if pol["name"] != "full" and int(lengths.max()) >= pol["kv_budget"]:  # else nothing was compressed
            # The prefix slots of each layer hold the picks, then -1 for a prompt whose budget is smaller.
            selected = [[int((k[b, 0, : -pol["window"]] >= 0).sum()) for k in kept_raw] for b in range(len(lengths))]
        return finish_result(self.tokenizer, generated, mask, step_logits, return_logits, kept, selected, timings)
