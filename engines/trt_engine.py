"""The TensorRT engine: runs an engine directory built by `build --backend tensorrt`, on a CUDA GPU.

Same generation as the onnxruntime runner (right-padded prompts, greedy loop, per-layer caches sized once), on
torch CUDA tensors bound with `set_tensor_address`. The prefill's outputs whose shapes depend on the data (the
`If` around the selection) are allocated through an output allocator; the decode plan's caches are the prefill's
`present.*` buffers, bound as both the past input and the present output of every layer (TensorRT's KV-cache
update writes in place: `get_aliased_input_tensor` names the pairs). Imported only when such an engine is opened;
without TensorRT or a GPU it says what is missing.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from engines.base import GenerationResult, ProgressFn, encode_batch, finish_result
from engines.built import BuiltEngine
from engines.greedy import greedy_loop
from pkv_core.errors import JobError, UserInputError

TORCH_DTYPES = {"FLOAT": torch.float32, "HALF": torch.float16, "BF16": torch.bfloat16, "INT64": torch.int64,
                "INT32": torch.int32, "BOOL": torch.bool}


def _torch_dtype(trt_dtype) -> torch.dtype:
    return TORCH_DTYPES[trt_dtype.name]


def enqueue_after(stream, producer, execute) -> bool:
    """Run `execute(stream handle)` (TensorRT's `execute_async_v3`) on `stream` only after everything already
    queued on `producer`, the stream the inputs were copied and the outputs allocated on: without the wait,
    TensorRT on its own non-blocking stream can read an input before its copy lands."""
    stream.wait_stream(producer)
    return execute(stream.cuda_stream)


class _Allocator:  # pragma: no cover - GPU only
    """TensorRT output allocator backed by torch: for outputs whose shape is known only after the run."""

    def __new__(cls, trt):
        class Allocator(trt.IOutputAllocator):
            def __init__(self):
                trt.IOutputAllocator.__init__(self)
                self.buffers: dict[str, torch.Tensor] = {}
                self.shapes: dict[str, tuple] = {}

            def reallocate_output(self, name, memory, size, alignment):
                buffer = self.buffers.get(name)
                if buffer is None or buffer.numel() < size:
                    self.buffers[name] = buffer = torch.empty(max(size, 1), dtype=torch.uint8, device="cuda")
                return buffer.data_ptr()

            def notify_shape(self, name, shape):
                self.shapes[name] = tuple(shape)

        return Allocator()


class TensorRTEngine(BuiltEngine):  # pragma: no cover - needs TensorRT and a GPU (scripts/gpu_acceptance.py)
    name = "tensorrt"
    backend = "tensorrt"

    def __init__(self, engine_dir: Path, device: str = "cuda", manifest: dict | None = None):
        from exporter.tensorrt.build import require_tensorrt
        from trt_plugins.trt_plugin import register_plugins

        super().__init__(engine_dir, manifest)
        if device == "cpu":
            raise UserInputError(f"{self.dir}: a TensorRT engine runs on a GPU only (--device cuda)")
        self.trt = trt = require_tensorrt()
        register_plugins()  # plans that fell back to the JIT implementation need it in this process
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engines, self.contexts = {}, {}
        for graph in ("prefill", "decode"):
            plan = (self.dir / f"{graph}.plan").read_bytes()
            engine = runtime.deserialize_cuda_engine(plan)
            if engine is None:
                raise UserInputError(f"{self.dir}: TensorRT {trt.__version__} cannot load {graph}.plan (built with "
                                     f"{self.manifest['tensorrt']['version']} on another GPU?)")
            self.engines[graph], self.contexts[graph] = engine, engine.create_execution_context()
        self.stream = torch.cuda.Stream()
        limits = self.manifest["tensorrt"]
        self.max_batch, self.max_new_tokens = limits["max_batch"], limits["max_new_tokens"]

    def _names(self, graph: str, mode) -> list[str]:
        engine = self.engines[graph]
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        return [n for n in names if engine.get_tensor_mode(n) == mode]

    def _run(self, graph: str, inputs: dict[str, torch.Tensor], bound: dict[str, torch.Tensor]) -> dict:
        """Run one plan; `bound` outputs use the given buffers (in place), the others are allocated."""
        trt, engine, context = self.trt, self.engines[graph], self.contexts[graph]
        for name, tensor in inputs.items():
            if engine.is_shape_inference_io(name):  # shape tensors live in host memory
                context.set_tensor_address(name, tensor.cpu().data_ptr())
            else:
                context.set_input_shape(name, tuple(tensor.shape))
                context.set_tensor_address(name, tensor.data_ptr())
        outputs, allocator = {}, _Allocator(trt)
        for name in self._names(graph, trt.TensorIOMode.OUTPUT):
            if name in bound:
                outputs[name] = bound[name]
                context.set_tensor_address(name, bound[name].data_ptr())
                continue
            shape = tuple(context.get_tensor_shape(name))
            if -1 in shape:
                context.set_output_allocator(name, allocator)
                continue
            outputs[name] = torch.empty(shape, dtype=_torch_dtype(engine.get_tensor_dtype(name)), device="cuda")
            context.set_tensor_address(name, outputs[name].data_ptr())
        if not enqueue_after(self.stream, torch.cuda.current_stream(), context.execute_async_v3):
            raise JobError(f"TensorRT failed to run {graph}.plan")
        self.stream.synchronize()
        for name, shape in allocator.shapes.items():
            dtype = _torch_dtype(engine.get_tensor_dtype(name))
            count = int(np.prod(shape))
            outputs[name] = allocator.buffers[name].view(dtype)[:count].view(shape).clone()
        return outputs

    def generate(self, prompts: list[str] | list[list[int]], max_new_tokens: int = 32, *, return_logits: bool = False,
                 return_indices: bool = False, progress: ProgressFn | None = None) -> GenerationResult:
        if max_new_tokens > self.max_new_tokens:
            raise UserInputError(f"max_new_tokens {max_new_tokens} exceeds the {self.max_new_tokens} this engine "
                                 "was built for (build --max-new-tokens)")
        input_ids, mask, positions = encode_batch(self.tokenizer, prompts, self.pad_id, self.max_input_len,
                                                  max_new_tokens, padding_side="right",
                                                  max_positions=self.spec.max_position_embeddings)
        if input_ids.shape[0] > self.max_batch:
            raise UserInputError(f"{input_ids.shape[0]} prompts exceed the batch of {self.max_batch} this engine "
                                 "was built for (build --max-batch)")
        layers = range(self.spec.num_layers)
        t0 = time.perf_counter()
        out = self._run("prefill", {"input_ids": input_ids.cuda(), "attention_mask": mask.cuda(),
                                    "position_ids": positions.cuda(),
                                    "reserve_tokens": torch.tensor([max_new_tokens - 1])}, {})
        timings = {"prefill": time.perf_counter() - t0}
        kv_lengths = [out[f"kv_lengths.{i}"].cpu().numpy() for i in layers]
        kept = [out[f"kept_indices.{i}"].cpu() for i in layers] if return_indices else None
        item = out["present.0.key"].element_size()
        kv_bytes = (sum(2 * out[f"kept_indices.{i}"].numel() * self.spec.head_dim * item for i in layers),
                    sum(2 * int((out[f"kept_indices.{i}"] >= 0).sum()) * self.spec.head_dim * item for i in layers))
        cache = {f"present.{i}.{p}": out[f"present.{i}.{p}"] for i in layers for p in ("key", "value")}
        steps = 0

        def step(token: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
            nonlocal steps
            inputs = {"input_ids": token.view(-1, 1).cuda(), "position_ids": pos.view(-1, 1).cuda()}
            for i in layers:
                inputs[f"past_lengths.{i}"] = torch.from_numpy(kv_lengths[i] + steps).cuda()
                inputs[f"past_key_values.{i}.key"] = cache[f"present.{i}.key"]
                inputs[f"past_key_values.{i}.value"] = cache[f"present.{i}.value"]
                if self.windowed:
                    inputs[f"cache_positions.{i}"] = out[f"kept_indices.{i}"]
            result = self._run("decode", inputs, cache)  # the caches are written in place
            steps += 1
            return result["logits"].float().cpu()

        first = out["logits"].float().cpu()
        lengths = mask.sum(-1)
        generated, step_logits, timings["decode"] = greedy_loop(first, lengths, step, self.eos_ids, self.pad_id,
                                                                max_new_tokens, progress)
        selected = self.selected_per_prompt(lengths.numpy(), kv_lengths)
        return finish_result(self.tokenizer, generated, mask, step_logits, return_logits, kept, selected, timings,
                             kv_bytes)
