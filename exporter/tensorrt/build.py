"""`build --backend tensorrt`: prefill.plan + decode.plan + tokenizer/ + pkv-engine.json, on a GPU host.

The ONNX graphs of the tensorrt target (standard ops, `Attention`, `TensorScatter`, selection nodes naming the
`pkv` plugins) are built first, in a temporary directory, then parsed by TensorRT with the plugins registered and
built into plans with one optimization profile each: batch 1..`max_batch`, prompts 1..`max_input_len`, and for
decode every layer's own cache capacity (its largest kept length over every prompt length plus `max_new_tokens`,
recorded in the manifest's `tensorrt.capacities`). The plans embed the weights; the ONNX graphs are not kept. Same
engine directory rules as every build (staged, renamed at the end, manifest last, `--force` only over an engine).
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

from exporter.checkpoint import LoadedModel
from exporter.engine_dir import tool_versions, write_manifest
from exporter.outputs import check_output, staging_dir
from exporter.slot_plan import largest_kept
from exporter.tensorrt.graphs import parser_input
from methods import KVPolicy
from methods.backends import TENSORRT
from pkv_core.errors import JobError, UserInputError


def require_tensorrt():
    """TensorRT with its Python plugin API and a CUDA GPU, or one UserInputError saying what is missing."""
    from trt_plugins.trt_plugin import MissingTensorRT, require_tensorrt

    try:
        trt = require_tensorrt()
    except MissingTensorRT as e:
        raise UserInputError(f"--backend tensorrt: {e}") from None
    import torch

    if not torch.cuda.is_available():
        raise UserInputError("--backend tensorrt needs a CUDA GPU (torch sees none)")
    return trt


def layer_kept(policy: KVPolicy, num_layers: int, max_input_len: int) -> list[int]:
    """Per layer, the longest kept prompt the prefill can hand to decode for any batch of prompts of
    1..max_input_len tokens: a whole prompt too short to compress (`largest_kept`: over every length, not the value
    at max_input_len, which PyramidKV's deep layers undercut), and never less than the selection plugins' static
    output width, the layer's largest budget over every length plus the window (`KVPolicy.largest_selected`,
    what `GraphConfig.max_selected` gives the plugins)."""
    kept = largest_kept(policy, num_layers, max_input_len)
    widest = policy.largest_selected(num_layers, max_input_len)
    if widest is None:
        return kept
    return [max(k, s + min(policy.window, max_input_len)) for k, s in zip(kept, widest, strict=True)]


def layer_capacities(policy: KVPolicy, num_layers: int, max_input_len: int, max_new_tokens: int) -> list[int]:
    """Largest cache a layer holds during generation: its longest kept prompt (`layer_kept`) plus every generated
    token. The decode plan's profile and the manifest's `tensorrt.capacities`."""
    return [k + max_new_tokens for k in layer_kept(policy, num_layers, max_input_len)]


def profile_shapes(name: str, shape: tuple, max_batch: int, max_input_len: int, capacities: list[int],
                   kept: list[int]) -> tuple[tuple, tuple, tuple] | None:
    """(min, opt, max) for a dynamic input of either graph, by its I/O name (None: a static input)."""
    if -1 not in shape:
        return None
    if name in ("input_ids", "attention_mask", "position_ids"):
        length = shape[1] if shape[1] != -1 else max_input_len
        opt = min(length, 2048) if shape[1] == -1 else length
        return (1, 1 if shape[1] == -1 else length), (1, opt), (max_batch, length)
    layer = int(name.split(".")[1])
    if name.startswith("past_lengths."):
        return (1,), (1,), (max_batch,)
    hc, d = shape[1], shape[-1]
    if name.startswith("past_key_values."):
        return (1, hc, 1, d), (1, hc, capacities[layer], d), (max_batch, hc, capacities[layer], d)
    if name.startswith("cache_positions."):
        return (1, hc, 1), (1, hc, kept[layer]), (max_batch, hc, kept[layer])
    raise JobError(f"no optimization profile rule for input {name} {shape}")


def build_plan(trt, onnx_path: Path, plan_path: Path, shapes, shape_inputs: dict, workspace_gib: int = 8) -> None:
    """Parse one graph (plugins registered) and build its plan with one optimization profile."""
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = (1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)) | \
        (1 << int(trt.NetworkDefinitionCreationFlag.PREFER_AOT_PYTHON_PLUGINS))
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(parser_input(onnx_path))):  # Attention decomposable where no kernel fits
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise JobError(f"TensorRT cannot parse {onnx_path.name}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_gib << 30)
    profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        if tensor.is_shape_tensor:
            profile.set_shape_input(tensor.name, *shape_inputs[tensor.name])
            continue
        ranges = shapes(tensor.name, tuple(tensor.shape))
        if ranges is not None:
            profile.set_shape(tensor.name, *ranges)
    config.add_optimization_profile(profile)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise JobError(f"TensorRT could not build {plan_path.name} (see its log above)")
    plan_path.write_bytes(bytes(plan))


def build_tensorrt_engine(loaded: LoadedModel, policy: KVPolicy, out: Path, *, dtype: str = "fp16",
                          max_input_len: int | None = None, max_batch: int = 8, max_new_tokens: int = 512,
                          force: bool = False, progress=None) -> dict[str, Any]:
    from exporter.engine_dir import read_manifest
    from exporter.onnx.export import build_onnx_engine

    trt = require_tensorrt()
    from trt_plugins.trt_plugin import plugin_names, register_plugins

    if max_batch < 1 or max_new_tokens < 1:
        raise UserInputError("--max-batch and --max-new-tokens must be at least 1")
    policy.check_backend(TENSORRT)
    check_output(Path(out), "engine", force, [loaded.input_path])
    register_plugins()
    with tempfile.TemporaryDirectory(prefix=".pkv-onnx-", dir=Path(out).resolve().parent) as tmp_onnx:
        onnx_dir = Path(tmp_onnx) / "onnx"
        build_onnx_engine(loaded, policy, onnx_dir, dtype=dtype, max_input_len=max_input_len, target="tensorrt",
                          progress=progress)
        source = read_manifest(onnx_dir)
        max_len = int(source["max_input_len"])
        capacities = layer_capacities(policy, loaded.spec.num_layers, max_len, max_new_tokens)
        kept = [c - max_new_tokens for c in capacities]

        def shapes(name, shape):
            return profile_shapes(name, shape, max_batch, max_len, capacities, kept)

        reserve = {"reserve_tokens": ((0,), (min(64, max_new_tokens),), (max_new_tokens,))}
        with staging_dir(Path(out), "engine", force, [loaded.input_path]) as tmp:
            build_plan(trt, onnx_dir / "prefill.onnx", tmp / "prefill.plan", shapes, reserve)
            build_plan(trt, onnx_dir / "decode.onnx", tmp / "decode.plan", shapes, {})
            shutil.copytree(onnx_dir / source["tokenizer"], tmp / "tokenizer")
            keep = {k: source[k] for k in ("model", "policy", "budgets", "dtype", "max_input_len", "cache_heads",
                                           "notes")}
            return write_manifest(tmp, {
                "backend": "tensorrt", **keep, "tokenizer": "tokenizer",
                "tensorrt": {"version": trt.__version__, "plans": ["prefill.plan", "decode.plan"],
                             "max_batch": max_batch, "max_new_tokens": max_new_tokens,
                             "capacities": capacities, "plugins": plugin_names(),
                             "onnx": source["onnx"]},
                "tools": {**tool_versions(), "tensorrt": trt.__version__},
            })
