"""The onnxruntime engine: runs an engine directory built by `build --backend onnx` (either target).

The generation loop is written on `onnxruntime.InferenceSession` (onnxruntime-genai cannot run per-layer cache
lengths). Prompts are right-padded (every row's real tokens first). The prefill returns every layer's cache
already sized for the whole generation (its kept tokens first, then `max_new_tokens - 1` free slots); decode
binds each layer's buffer as both its past and its present input/output through I/O binding, so the attention
op writes the new token in place and no cache is copied between steps (onnxruntime target; the tensorrt
target's TensorScatter returns a new buffer under onnxruntime). Per layer, `past_lengths.{i}` says how many
slots of each row are valid.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import torch

from engines.base import (
    ContextCache,
    GenerationResult,
    ProgressFn,
    check_room,
    encode_batch,
    finish_result,
    question_ids,
)
from engines.built import BuiltEngine
from engines.graph_io import check_graph_io
from engines.greedy import greedy_loop
from engines.ort_cuda import cuda_problems
from exporter.onnx.chunk import CHUNK, SELECT
from exporter.onnx.mixed import MIXED
from pkv_core.errors import UserInputError

THREADS_ENV = "PKV_ORT_THREADS"
CHUNK_GRAPHS = (CHUNK, SELECT, MIXED)


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


class OrtEngine(BuiltEngine):
    name = "onnxruntime"
    backend = "onnx"

    def __init__(self, engine_dir: Path, device: str = "cpu", threads: int | None = None,
                 manifest: dict | None = None):
        """threads: onnxruntime's intra-op threads per session; None: $PKV_ORT_THREADS, else 0 (one per core). Set
        it where several engines share the cores (a server of several models, parallel test workers): each
        session's pool spins on every core otherwise, and small graphs then wait on each other."""
        import onnxruntime as ort

        super().__init__(engine_dir, manifest)
        if threads is None:
            threads = int(os.environ.get(THREADS_ENV, "0"))
        self.providers = choose_providers(device)
        if self.providers[0] == "CUDAExecutionProvider":
            problems = cuda_problems(self.dir, self.manifest)
            if problems and device == "cuda":
                raise UserInputError(f"{self.dir}: onnxruntime's CUDA provider cannot run this engine: "
                                     + "; ".join(problems))
            if problems:  # device "auto": the CPU provider runs it as built
                self.providers = ["CPUExecutionProvider"]

        self.threads = threads
        options = self.session_options
        try:
            # The prefill's peak (activations of a long prompt) would stay reserved in the CPU arena after the run;
            # without the arena it is returned, so a long prompt does not pin its peak for the engine's life.
            self.prefill = ort.InferenceSession(str(self.dir / "prefill.onnx"), options(arena=False),
                                                providers=self.providers)
            self.decode = ort.InferenceSession(str(self.dir / "decode.onnx"), options(arena=True),
                                               providers=self.providers)
            # The method's own graphs (PyramidInfer's evict.onnx), run by its stage (`policy.onnxruntime_stage`)
            self.graphs = {name: ort.InferenceSession(str(self.dir / name), options(arena=False),
                                                      providers=self.providers)
                           for name in self.manifest["onnx"]["graphs"]
                           if name not in ("prefill.onnx", "decode.onnx", *CHUNK_GRAPHS)}
        except Exception as e:  # onnxruntime raises its own exception types
            raise UserInputError(f"{self.dir}: onnxruntime cannot load the engine ({str(e).splitlines()[0]})") from None
        self._chunk_sessions: dict | None = None
        check_graph_io(self.dir, self.spec, int(self.manifest["cache_heads"]), self.windowed,
                       {"prefill.onnx": self.prefill, "decode.onnx": self.decode})
        self.device_type = "cuda" if self.providers[0] == "CUDAExecutionProvider" else "cpu"
        from exporter.onnx.targets import TARGETS

        self.in_place = TARGETS[self.manifest["onnx"]["target"]].in_place_decode
        self.prefill_outputs = [o.name for o in self.prefill.get_outputs()]
        self.decode_outputs = [o.name for o in self.decode.get_outputs()]

    def session_options(self, arena: bool):
        """Options of every session of this engine (the method's own graphs and a sweep's selection graphs too)."""
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        opts.intra_op_num_threads = self.threads
        opts.enable_cpu_mem_arena = arena
        # onnxruntime fuses DequantizeLinear + MatMul (the tensorrt target's quantized weights) into MatMulNBits
        # at accuracy level 4 (int8 activations) by default; level 0 keeps float arithmetic, as the reference.
        opts.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
        return opts

    @property
    def chunkable(self) -> bool:
        """Whether this engine can prefill a prompt in chunks (its build wrote chunk.onnx: an in-flight engine of a
        method that chunks exactly, built by a pkv-export that knows how; engines.chunked_prefill runs them)."""
        return self.device_type == "cpu" and CHUNK in self.manifest["onnx"]["graphs"]

    def chunk_sessions(self) -> dict:
        """{"chunk", "select", "mixed": session or None}, loaded when first asked for (only a server chunks)."""
        import onnxruntime as ort

        if self._chunk_sessions is None:
            names = [n for n in CHUNK_GRAPHS if n in self.manifest["onnx"]["graphs"]]
            try:
                # chunk and mixed runs are small and frequent: the arena keeps their buffers (select runs once)
                loaded = {n: ort.InferenceSession(str(self.dir / n), self.session_options(arena=n != SELECT),
                                                  providers=self.providers) for n in names}
            except Exception as e:  # onnxruntime raises its own exception types
                raise UserInputError(f"{self.dir}: onnxruntime cannot load {', '.join(names)} "
                                     f"({str(e).splitlines()[0]})") from None
            self._chunk_sessions = {"chunk": loaded.get(CHUNK), "select": loaded.get(SELECT),
                                    "mixed": loaded.get(MIXED)}
        return self._chunk_sessions

    def run_prefill(self, input_ids: np.ndarray, mask: np.ndarray, positions: np.ndarray, reserve: int) -> dict:
        """One prefill through I/O binding; returns {output name: OrtValue}."""
        binding = self.prefill.io_binding()
        for name, array in (("input_ids", input_ids), ("attention_mask", mask), ("position_ids", positions),
                            ("reserve_tokens", np.array([reserve]))):
            binding.bind_cpu_input(name, np.ascontiguousarray(array, dtype=np.int64))
        for name in self.prefill_outputs:
            binding.bind_output(name, self.device_type)
        self.prefill.run_with_iobinding(binding)
        return dict(zip(self.prefill_outputs, binding.get_outputs(), strict=True))

    def decode_binding(self, cache: dict, kept: dict):
        """An I/O binding for the decode loop with every layer's cache bound once. Returns (binding, step) where
        step(token [B], position [B], past_lengths [L, B]) runs one decode and returns the logits [B, V].

        The step's small inputs (tokens, positions, every layer's lengths) and the logits live in host arrays bound
        once through OrtValues that share their memory: a step writes into them and runs, with no per-layer
        binding and no allocation (only a change of shape, e.g. a question's S tokens, binds anew)."""
        import onnxruntime as ort

        binding = self.decode.io_binding()
        layers = self.spec.num_layers
        batch = cache["present.0.key"].shape()[0]
        for layer in range(layers):
            if self.windowed:
                binding.bind_ortvalue_input(f"cache_positions.{layer}", kept[f"kept_indices.{layer}"])
        names = self.decode_outputs
        growing = [n for n in names if n.startswith("attn_rows.")]  # PyramidInfer: one more slot every step
        lengths = np.zeros((layers, batch), np.int64)  # [L, B]: rows are contiguous, one OrtValue per layer
        host = {"lengths": [ort.OrtValue.ortvalue_from_numpy(lengths[layer]) for layer in range(layers)]}
        for layer, value in enumerate(host["lengths"]):
            binding.bind_ortvalue_input(f"past_lengths.{layer}", value)

        def bind_cache() -> None:
            for layer in range(layers):
                for part in ("key", "value"):
                    binding.bind_ortvalue_input(f"past_key_values.{layer}.{part}", cache[f"present.{layer}.{part}"])

        def bind_step_inputs(shape: tuple[int, int]) -> None:
            """(Re)bind tokens and positions of this shape: once, and again only when S changes."""
            host["tokens"], host["positions"] = np.zeros(shape, np.int64), np.zeros(shape, np.int64)
            host["bound"] = [ort.OrtValue.ortvalue_from_numpy(host["tokens"]),
                             ort.OrtValue.ortvalue_from_numpy(host["positions"])]
            binding.bind_ortvalue_input("input_ids", host["bound"][0])
            binding.bind_ortvalue_input("position_ids", host["bound"][1])

        def step(token: np.ndarray, position: np.ndarray, past_lengths: np.ndarray,
                 cache_positions: list[np.ndarray] | None = None) -> np.ndarray:
            """token / position: [B] (one token per row) or [B, S] (S tokens: a question at batch 1);
            past_lengths [L, B] valid slots per layer and row before these tokens.
            `cache_positions` (PyramidInfer on a sliding-window model): every slot's position, per layer.
            The step's outputs stay in `step.outputs` (PyramidInfer reads its attention rows there)."""
            tokens, positions = (x if x.ndim == 2 else x.reshape(-1, 1) for x in (token, position))
            if host.get("tokens") is None or host["tokens"].shape != tokens.shape:
                bind_step_inputs(tokens.shape)
            host["tokens"][...] = tokens
            host["positions"][...] = positions
            lengths[...] = past_lengths
            for layer, held in enumerate(cache_positions or []):
                binding.bind_cpu_input(f"cache_positions.{layer}", held)
            for name in growing:  # outputs whose shape changes every step: allocated anew by each run
                binding.bind_output(name, self.device_type)
            self.decode.run_with_iobinding(binding)
            if growing or not self.in_place or self.device_type != "cpu":
                out = dict(zip(names, binding.get_outputs(), strict=True))
                step.outputs = out
                if not self.in_place:  # the step returned new buffers: they are the next step's past
                    cache.update({k: v for k, v in out.items() if k.startswith("present.")})
                    bind_cache()
                return out["logits"].numpy().copy()  # the bound output is reused by the next step
            return host["logits"][: tokens.shape[0]].copy()

        bind_cache()
        for name in names:  # in output order: get_outputs() follows the binding order
            if self.in_place and name in cache:
                binding.bind_ortvalue_output(name, cache[name])  # written in place, every step
            elif name == "logits" and self.device_type == "cpu":
                host["logits"] = np.zeros((batch, self.spec.vocab_size), np.float32)
                host["logits_value"] = ort.OrtValue.ortvalue_from_numpy(host["logits"])
                binding.bind_ortvalue_output(name, host["logits_value"])
            else:
                binding.bind_output(name, self.device_type)
        return binding, step

    def cache_bytes(self, kept: dict) -> int:
        """Bytes of K/V the prefill kept (the compressed cache; the decode slots behind it excluded)."""
        itemsize = 2 if self.manifest["dtype"] == "fp16" else 4
        total = 0
        for layer in range(self.spec.num_layers):
            b, hc, n = kept[f"kept_indices.{layer}"].shape()
            total += 2 * b * hc * n * self.spec.head_dim * itemsize
        return total

    def ideal_bytes(self, kept: dict) -> int:
        """Bytes of K/V the kept pairs alone would take: what `cache_bytes` holds, less the slots a shorter head
        leaves empty (per-head lengths: KVzip) or a row with a smaller budget leaves empty in a batch."""
        itemsize = 2 if self.manifest["dtype"] == "fp16" else 4
        pairs = sum(int((kept[f"kept_indices.{i}"].numpy() >= 0).sum()) for i in range(self.spec.num_layers))
        return 2 * pairs * self.spec.head_dim * itemsize

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
                                                  max_new_tokens, padding_side="right",
                                                  max_positions=self.spec.max_position_embeddings)
        t0 = time.perf_counter()
        outputs = self.run_prefill(input_ids.numpy(), mask.numpy(), positions.numpy(), max_new_tokens - 1)
        timings = {"prefill": time.perf_counter() - t0}
        return self.decode_from(self.policy, outputs, mask, max_new_tokens, timings, return_logits, return_indices,
                                progress)

    def decode_from(self, policy, outputs: dict, mask: torch.Tensor, max_new_tokens: int, timings: dict,
                    return_logits: bool = False, return_indices: bool = False,
                    progress: ProgressFn | None = None) -> GenerationResult:
        """Greedy decoding from a prefill's outputs ({name: OrtValue}: logits, every layer's present.*,
        kept_indices.*, kv_lengths.*, the method's own) for right-padded prompts (mask [B, q]); `policy` is the one
        that selected them (the engine's own, or a sweep's cell selecting from a shared prefill)."""
        layers = range(self.spec.num_layers)
        kept_raw = {f"kept_indices.{i}": outputs[f"kept_indices.{i}"] for i in layers}
        kv_lengths = [outputs[f"kv_lengths.{i}"].numpy() for i in layers]  # [B] valid slots per layer
        kept = [torch.from_numpy(kept_raw[f"kept_indices.{i}"].numpy()) for i in layers] if return_indices else None
        kv_bytes = (self.cache_bytes(kept_raw), self.ideal_bytes(kept_raw))
        cache = {k: v for k, v in outputs.items() if k.startswith("present.")}
        lengths = mask.sum(-1)
        stage = policy.onnxruntime_stage(self, outputs, cache)
        step = self._stepper(cache, kept_raw, stage, [n.astype(np.int64) for n in kv_lengths])

        first = torch.from_numpy(outputs["logits"].numpy())
        generated, step_logits, timings["decode"] = greedy_loop(
            first, lengths, step, self.eos_ids, self.pad_id, max_new_tokens, progress
        )
        selected = self.selected_per_prompt(lengths.numpy(), kv_lengths, policy)
        return finish_result(self.tokenizer, generated, mask, step_logits, return_logits, kept, selected, timings,
                             kv_bytes)

    def _stepper(self, cache: dict, kept: dict, stage, base: list[np.ndarray]):
        """The greedy loop's step over bound caches: token [B] or [B, S], position alike -> logits [B, V]. The
        caches hold `base` valid slots per row and layer before the first call; a method's stage (PyramidInfer's)
        tracks them itself and compresses (then the caches are bound again)."""
        _, run_step = self.decode_binding(cache, kept)
        fed = 0
        base = np.stack(base)  # [L, B]

        def step(token: torch.Tensor | np.ndarray, pos: torch.Tensor | np.ndarray) -> torch.Tensor:
            nonlocal fed, run_step
            token, pos = (x.numpy() if isinstance(x, torch.Tensor) else x for x in (token, pos))
            positions = pos if pos.ndim == 2 else pos.reshape(-1, 1)
            past = np.stack(stage.lengths) if stage else base + fed
            held = stage.cache_positions() if stage and self.windowed else None
            logits = run_step(token, pos, past, held)
            fed += positions.shape[1]
            if stage:
                stage.record(run_step.outputs, positions)
                if stage.evict_if_due():
                    _, run_step = self.decode_binding(stage.cache, kept)
            return torch.from_numpy(logits)

        return step

    def compress_context(self, context: str | list[int], room: int = 256) -> ContextCache:
        """Prefill and compress a context once (batch 1), with `room` free cache slots behind every layer."""
        input_ids, mask, positions = encode_batch(self.tokenizer, [context], self.pad_id, self.max_input_len,
                                                  room + 1, padding_side="right",
                                                  max_positions=self.spec.max_position_embeddings)
        t0 = time.perf_counter()
        outputs = self.run_prefill(input_ids.numpy(), mask.numpy(), positions.numpy(), room)
        layers = range(self.spec.num_layers)
        kept = {f"kept_indices.{i}": outputs[f"kept_indices.{i}"] for i in layers}
        state = {"cache": {k: v for k, v in outputs.items() if k.startswith("present.")}, "kept": kept,
                 "lengths": [outputs[f"kv_lengths.{i}"].numpy() for i in layers]}
        stage = self.policy.onnxruntime_stage(self, outputs, state["cache"])
        if stage is not None:
            state["stage"] = stage
        return ContextCache(int(mask.sum()), room, self.cache_bytes(kept),
                            [torch.from_numpy(v.numpy()) for v in kept.values()], state,
                            time.perf_counter() - t0)

    def answer(self, context: ContextCache, question: str | list[int], max_new_tokens: int = 32, *,
               return_logits: bool = False) -> GenerationResult:
        """Continue a copy of the compressed context with the question, then generate greedily."""
        import onnxruntime as ort

        ids = question_ids(self.tokenizer, question)
        check_room(context, ids, max_new_tokens)
        state = context.state
        cache = {name: ort.OrtValue.ortvalue_from_numpy(value.numpy().copy(), self.device_type)
                 for name, value in state["cache"].items()}  # the context's buffers stay as they are
        stage = state["stage"].copy(cache) if "stage" in state else None
        step = self._stepper(cache, state["kept"], stage, [n.astype(np.int64) for n in state["lengths"]])
        t0 = time.perf_counter()
        first = step(np.array([ids]), np.arange(context.length, context.length + len(ids))[None]).numpy()
        timings = {"prefill": time.perf_counter() - t0}

        mask = torch.ones(1, context.length + len(ids), dtype=torch.long)
        generated, step_logits, timings["decode"] = greedy_loop(
            torch.from_numpy(first), torch.tensor([context.length + len(ids)]), step, self.eos_ids, self.pad_id,
            max_new_tokens)
        return finish_result(self.tokenizer, generated, mask, step_logits, return_logits, None, None, timings)
