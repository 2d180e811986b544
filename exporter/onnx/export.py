"""`build --backend onnx`: prefill.onnx + decode.onnx + weights.bin + tokenizer/ + pkv-engine.json (+ the chunked
prefill's chunk.onnx / select.onnx for in-flight engines, exporter.onnx.chunk; + a method's own graphs)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from exporter.checkpoint import LoadedModel, save_tokenizer
from exporter.engine_dir import tool_versions, write_manifest
from exporter.onnx.chunk import BUILDERS as CHUNK_BUILDERS
from exporter.onnx.chunk import chunk_graph_names
from exporter.onnx.decode import build_decode
from exporter.onnx.layers import GraphConfig
from exporter.onnx.model import make_model
from exporter.onnx.prefill import build_prefill
from exporter.onnx.targets import ROTARY_CACHES, TARGETS
from exporter.onnx.weights import ExternalWeights, planned_weight_bytes, write_model_weights
from exporter.outputs import check_output, staging_dir
from exporter.plan import human_bytes
from exporter.quantize import WeightQuant
from methods import KVPolicy
from methods.backends import build_backend
from pkv_core.errors import UserInputError

ONNX_DTYPES = {"fp32": np.float32, "fp16": np.float16}
TRT_TOPK_MAX = 3840  # TensorRT's TopK limit on K


def rotary_parameters(loaded: LoadedModel) -> tuple[np.ndarray, float]:
    """inv_freq [d/2] and the cos/sin scaling, from transformers' own rotary embedding for this config."""
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    rotary = LlamaRotaryEmbedding(loaded.spec.to_hf_config())
    return rotary.inv_freq.float().numpy(), float(rotary.attention_scaling)


def rotary_caches(spec, inv_freq: np.ndarray, scaling: float, np_dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    """cos / sin [max positions, d/2] for GroupQueryAttention's do_rotary, computed as transformers computes them
    (float32 products of position and inv_freq, cos/sin in float32, times the attention scaling)."""
    import torch

    freqs = torch.arange(spec.max_position_embeddings, dtype=torch.float32)[:, None] * torch.from_numpy(inv_freq)[None]
    return tuple((f(freqs) * scaling).numpy().astype(np_dtype) for f in (torch.cos, torch.sin))


def _method_graph(build):
    """A method's own graph as a builder like build_prefill's: build(cfg) -> (name, GraphBuilder, inputs, outputs);
    its weights are inputs (no initializers)."""

    def builder(cfg: GraphConfig, initializers: list) -> onnx.ModelProto:
        name, g, inputs, outputs = build(cfg)
        return make_model(g, cfg, name, inputs, outputs, [])

    return builder


def check_disk(where: Path, needed: int) -> None:
    free = shutil.disk_usage(where).free
    if needed * 1.05 > free:
        raise UserInputError(f"not enough disk space under {where.parent}: the engine needs about "
                             f"{human_bytes(needed)}, {human_bytes(free)} free")


def build_onnx_engine(loaded: LoadedModel, policy: KVPolicy, out: Path, *, dtype: str = "fp32",
                      max_input_len: int | None = None, force: bool = False, progress=None,
                      target: str = "onnxruntime", weights: WeightQuant | None = None,
                      shared_prefill: KVPolicy | None = None) -> dict[str, Any]:
    """`shared_prefill` (a capture policy, `KVPolicy.shared_capture`): add the capture graph of a shared prefill
    (exporter.onnx.shared_prefill; a sweep's one prefill per sample for a group of cells), recorded in the
    manifest with the group it serves."""
    spec = loaded.spec
    if target not in TARGETS:
        raise UserInputError(f"unknown target '{target}' (choose from {', '.join(TARGETS)})")
    if dtype not in ONNX_DTYPES:
        raise UserInputError(f"unknown dtype '{dtype}' for the onnx backend (choose from {', '.join(ONNX_DTYPES)})")
    if max_input_len is None:  # 0 is a user's mistake to report, not a request for the default
        max_input_len = spec.max_position_embeddings
    if not 1 <= max_input_len <= spec.max_position_embeddings:
        raise UserInputError(f"--max-input-len must be in [1, {spec.max_position_embeddings}] (got {max_input_len})")
    np_dtype = np.dtype(ONNX_DTYPES[dtype])
    policy.check_backend(build_backend("onnx", target))
    check_output(Path(out), "engine", force, [loaded.input_path])
    selected = policy.layer_selected(spec.num_layers, max_input_len) if policy.compresses else None
    inv_freq, scaling = rotary_parameters(loaded)
    cfg = GraphConfig(spec, policy, np_dtype, inv_freq, scaling, target, max_input_len, loaded.tokenizer, weights)
    largest = cfg.largest_selected  # per layer over every prompt length: the plugins' widths less the window
    notes = []
    if largest and max(largest) + policy.window > TRT_TOPK_MAX:
        notes.append(f"layer budget {max(largest)} + window {policy.window} exceeds TensorRT's TopK limit "
                     f"{TRT_TOPK_MAX}: "
                     "this engine runs on onnxruntime but cannot be converted to TensorRT as is")
    with staging_dir(Path(out), "engine", force, [loaded.input_path]) as tmp:
        check_disk(tmp, planned_weight_bytes(spec, np_dtype.itemsize, cfg.weights))
        weights = ExternalWeights(tmp, np_dtype)
        try:
            write_model_weights(spec, loaded.weights, weights, progress, cfg.weights, TARGETS[target].weight_layout)
            if TARGETS[target].rotary_in_attention:
                for name, table in zip(ROTARY_CACHES, rotary_caches(spec, inv_freq, scaling, np_dtype), strict=True):
                    weights.add(name, table)
        finally:
            weights.close()
        initializers = list(weights.tensors.values())
        graphs = [("prefill.onnx", build_prefill), ("decode.onnx", build_decode)]
        graphs += [(name, CHUNK_BUILDERS[name]) for name in chunk_graph_names(policy, target)]
        for name, method_graph in policy.extra_graphs().items():  # the method's own (PyramidInfer: evict.onnx)
            graphs.append((name, _method_graph(method_graph)))
        extra = {}
        if shared_prefill is not None:
            from exporter.onnx.shared_prefill import SHARED_PREFILL_GRAPH, capture_builder

            graphs.append((SHARED_PREFILL_GRAPH, capture_builder(shared_prefill)))
            extra["shared_prefill"] = {"graph": SHARED_PREFILL_GRAPH, "group": shared_prefill.prefill_group,
                                       "scores": [list(k) for k in getattr(shared_prefill, "kinds", ())]}
        for name, builder in graphs:
            model = builder(cfg, initializers)
            onnx.save_model(model, str(tmp / name))
            onnx.checker.check_model(str(tmp / name))
            versions = {o.domain: o.version for o in model.opset_import}
        save_tokenizer(loaded, tmp / "tokenizer")
        manifest = write_manifest(tmp, {
            "backend": "onnx",
            "model": {**spec.to_dict(), "source": loaded.source, "random_weights": loaded.random_weights,
                      "weights_seed": getattr(loaded.weights, "seed", None),
                      "checkpoint_dir": str(loaded.input_path.resolve()) if loaded.input_path else None},
            "tokenizer": "tokenizer",
            "policy": {"name": policy.name, **policy.hyperparameters()},
            "budgets": {"rule": "methods.budgets, evaluated in-graph from the prompt length",
                        "selected_at_max_input_len": selected, "largest_selected": largest},
            "dtype": dtype,
            "weights": cfg.weights.record() if cfg.weights else {"format": "fp"},
            "max_input_len": max_input_len,
            "onnx": {"target": target, "opset": versions[""], "ir_version": model.ir_version,
                     "graphs": [name for name, _ in graphs], "weights": weights.path.name},
            "cache_heads": cfg.cache_heads,
            "notes": notes,
            "tools": tool_versions(),
            **extra,
        })
    return manifest
