"""`build --backend trtllm --tp N --pp M`: a TensorRT-LLM 1.2 checkpoint (config.json + rank{r}.safetensors).

Layout (TensorRT-LLM's LLaMA converter, `tensorrt_llm/models/llama/convert.py`; names of its
`tensorrt_llm/models/llama/config.py` LLaMAConfig and `tensorrt_llm/models/modeling_utils.py` PretrainedConfig):
* rank r is tp_rank = r % tp, pp_rank = r // tp; pp_rank owns the layers `torch.tensor_split(arange(L), pp)`
  gives it (the first ranks one more when L % pp != 0), named by their rank-local index;
* `attention.qkv` = this rank's [q_r; k_r; v_r] (rows); KV heads are first duplicated in place when there are
  fewer than tp (tp % Hkv == 0: rank r holds KV head r // (tp / Hkv)); `attention.dense` and `mlp.proj` split
  on dim 1 (row parallel); `mlp.fc` = HF gate_proj, `mlp.gate` = HF up_proj, split on dim 0 (column parallel);
* the first pp rank holds `transformer.vocab_embedding` (whole), the last `transformer.ln_f` and `lm_head`,
  zero-padded to a multiple of tp rows and split on dim 0; config.json keeps the unpadded vocab size.
Written tensor by tensor into preplanned rank files (`StreamingSafetensors`): every checkpoint tensor is read
once, its shards go straight to their ranks' files, so peak memory is a few tensors, never a rank.
The KV policy and its per-layer budgets ride along in a `pkv` block of config.json (unknown keys are accepted).
`weights`: TensorRT-LLM weight-only quantization (W8A16 / W4A16) of the decoder linear layers, each rank's shard
quantized on its own, in the layout exporter/trtllm/weight_only.py describes (why that layout: its docstring).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

from exporter.checkpoint import LoadedModel, save_tokenizer
from exporter.engine_dir import tool_versions, write_manifest
from exporter.outputs import check_output, staging_dir
from exporter.specs import SUPPORTED_ARCHS, ModelSpec
from exporter.trtllm.safetensors_stream import StreamingSafetensors
from exporter.trtllm.weight_only import WeightOnly
from methods import KVPolicy
from methods.backends import TRTLLM
from pkv_core.errors import UserInputError

DTYPES = {"fp32": (torch.float32, "float32"), "fp16": (torch.float16, "float16"), "bf16": (torch.bfloat16, "bfloat16")}


def check_parallelism(spec: ModelSpec, tp: int, pp: int) -> None:
    if tp < 1 or pp < 1:
        raise UserInputError(f"--tp and --pp must be at least 1 (got {tp}, {pp})")
    if spec.num_heads % tp:
        raise UserInputError(f"--tp {tp} does not divide the {spec.num_heads} attention heads")
    if spec.num_kv_heads % tp and tp % spec.num_kv_heads:
        raise UserInputError(f"--tp {tp} neither divides the {spec.num_kv_heads} KV heads nor is a multiple of "
                             "them (KV heads are duplicated only when tp is a multiple)")
    if spec.intermediate_size % tp:
        raise UserInputError(f"--tp {tp} does not divide the MLP size {spec.intermediate_size}")
    if pp > spec.num_layers:
        raise UserInputError(f"--pp {pp} exceeds the {spec.num_layers} layers")


def pp_layers(num_layers: int, pp: int, pp_rank: int) -> list[int]:
    return torch.tensor_split(torch.arange(num_layers), pp)[pp_rank].tolist()


def padded_vocab(vocab: int, tp: int) -> int:
    return math.ceil(vocab / tp) * tp


def kv_heads_per_rank(spec: ModelSpec, tp: int) -> int:
    return max(spec.num_kv_heads // tp, 1)


def rank_layout(spec: ModelSpec, tp: int, pp: int, rank: int, dtype: torch.dtype,
                quant: WeightOnly | None = None) -> dict:
    """name -> (shape, dtype) of one rank file, in write order. With `quant`, each decoder linear layer is its
    stored int8 weight [K, N * bits / 8] then its per_channel_scale [N] (exporter/trtllm/weight_only.py)."""
    pp_rank = rank // tp
    h, d, i = spec.hidden_size, spec.head_dim, spec.intermediate_size
    q_rows, kv_rows = spec.num_heads // tp * d, kv_heads_per_rank(spec, tp) * d
    layout: dict = {}

    def linear(name: str, out_features: int, in_features: int) -> None:
        if quant is None:
            layout[name + ".weight"] = ((out_features, in_features), dtype)
            return
        quant.check_shape(name, out_features, in_features)
        layout[name + ".weight"] = (quant.packed_shape(out_features, in_features), torch.int8)
        layout[name + ".per_channel_scale"] = ((out_features,), dtype)

    if pp_rank == 0:
        layout["transformer.vocab_embedding.weight"] = ((spec.vocab_size, h), dtype)
    for local in range(len(pp_layers(spec.num_layers, pp, pp_rank))):
        p = f"transformer.layers.{local}."
        layout[p + "input_layernorm.weight"] = ((h,), dtype)
        linear(p + "attention.qkv", q_rows + 2 * kv_rows, h)
        linear(p + "attention.dense", h, spec.num_heads * d // tp)
        layout[p + "post_layernorm.weight"] = ((h,), dtype)
        linear(p + "mlp.fc", i // tp, h)
        linear(p + "mlp.gate", i // tp, h)
        linear(p + "mlp.proj", h, i // tp)
    if pp_rank == pp - 1:
        layout["transformer.ln_f.weight"] = ((h,), dtype)
        layout["lm_head.weight"] = ((padded_vocab(spec.vocab_size, tp) // tp, h), dtype)
    return layout


def dup_kv(weight: torch.Tensor, num_kv_heads: int, tp: int) -> torch.Tensor:
    """[Hkv * d, h] -> [tp * d, h]: each KV head repeated tp / Hkv times next to itself."""
    reps = tp // num_kv_heads
    d = weight.shape[0] // num_kv_heads
    return weight.reshape(num_kv_heads, 1, d, -1).expand(-1, reps, -1, -1).reshape(num_kv_heads * reps * d, -1)


def trtllm_config(spec: ModelSpec, policy: KVPolicy, tp: int, pp: int, dtype: str, max_input_len: int,
                  quant: WeightOnly | None = None) -> dict:
    """config.json: TensorRT-LLM 1.2 PretrainedConfig / LLaMAConfig keys, plus the `pkv` block."""
    scaling = None
    if spec.rope_scaling:
        scaling = {k: v for k, v in spec.rope_scaling.items() if k != "rope_type"} | {"type": spec.rope_scaling[
            "rope_type"], "rope_type": spec.rope_scaling["rope_type"]}
    selected = policy.layer_selected(spec.num_layers, max_input_len) if policy.compresses else None
    return {
        "architecture": SUPPORTED_ARCHS[spec.arch],
        "dtype": DTYPES[dtype][1],
        "logits_dtype": "float32",
        "vocab_size": spec.vocab_size,
        "hidden_size": spec.hidden_size,
        "num_hidden_layers": spec.num_layers,
        "num_attention_heads": spec.num_heads,
        "num_key_value_heads": spec.num_kv_heads,
        "head_size": spec.head_dim,
        "intermediate_size": spec.intermediate_size,
        "hidden_act": "silu",
        "norm_epsilon": spec.rms_norm_eps,
        "position_embedding_type": "rope_gpt_neox",
        "max_position_embeddings": spec.max_position_embeddings,
        "rotary_base": spec.rope_theta,
        "rotary_scaling": scaling,
        "use_parallel_embedding": False,
        "embedding_sharding_dim": 0,
        "tie_word_embeddings": spec.tie_word_embeddings,
        "mapping": {"world_size": tp * pp, "tp_size": tp, "pp_size": pp, "gpus_per_node": 8},
        "quantization": quant.quant_config() if quant else {"quant_algo": None, "kv_cache_quant_algo": None},
        "mlp_bias": False,
        "attn_bias": False,
        "residual_mlp": False,
        "pkv": {
            "policy": {"name": policy.name, **policy.hyperparameters()},
            "selected_at_max_input_len": selected,
            "max_input_len": max_input_len,
            # TensorRT-LLM's checkpoint has no sliding-window key: the runtime takes it (max_attention_window).
            "sliding_window": spec.sliding_window,
            "model": spec.to_dict(),
            "weights": quant.record() if quant else {"format": "fp"},
        },
    }


def write_trtllm_checkpoint(loaded: LoadedModel, policy: KVPolicy, out: Path, *, tp: int = 1, pp: int = 1,
                            dtype: str = "fp16", max_input_len: int | None = None, force: bool = False,
                            progress=None, weights: WeightOnly | None = None) -> dict[str, Any]:
    spec = loaded.spec
    if dtype not in DTYPES:
        raise UserInputError(f"unknown dtype '{dtype}' for --backend trtllm (choose from {', '.join(DTYPES)})")
    check_parallelism(spec, tp, pp)
    policy.check_backend(TRTLLM)
    max_input_len = max_input_len or spec.max_position_embeddings
    if not 1 <= max_input_len <= spec.max_position_embeddings:
        raise UserInputError(f"--max-input-len must be in [1, {spec.max_position_embeddings}] (got {max_input_len})")
    check_output(Path(out), "engine", force, [loaded.input_path])
    torch_dtype = DTYPES[dtype][0]
    world = tp * pp
    layouts = [rank_layout(spec, tp, pp, r, torch_dtype, weights) for r in range(world)]  # shapes refused first
    with staging_dir(Path(out), "engine", force, [loaded.input_path]) as tmp:
        files = [StreamingSafetensors(tmp / f"rank{r}.safetensors", layouts[r]) for r in range(world)]
        try:
            _write_shards(spec, loaded.weights, files, tp, pp, torch_dtype, progress, weights)
        finally:
            for f in files:
                f.close(check=False)
        for f in files:
            f.close()
        config = trtllm_config(spec, policy, tp, pp, dtype, max_input_len, weights)
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        save_tokenizer(loaded, tmp / "tokenizer")
        return write_manifest(tmp, {
            "backend": "trtllm",
            "model": {**spec.to_dict(), "source": loaded.source, "random_weights": loaded.random_weights,
                      "weights_seed": getattr(loaded.weights, "seed", None),
                      "checkpoint_dir": str(loaded.input_path.resolve()) if loaded.input_path else None},
            "tokenizer": "tokenizer",
            "policy": config["pkv"]["policy"],
            "budgets": {"rule": "methods.budgets", "selected_at_max_input_len": config["pkv"][
                "selected_at_max_input_len"]},
            "dtype": dtype,
            "weights": config["pkv"]["weights"],
            "max_input_len": max_input_len,
            "cache_heads": spec.num_heads if policy.cache_heads_are_query_heads else spec.num_kv_heads,
            "trtllm": {"version": "1.2", "tp": tp, "pp": pp, "world_size": world,
                       "ranks": [f"rank{r}.safetensors" for r in range(world)], "config": "config.json"},
            "notes": [],
            "tools": tool_versions(),
        })


def _write_shards(spec: ModelSpec, source, files, tp: int, pp: int, dtype: torch.dtype, progress,
                  quant: WeightOnly | None = None) -> None:
    """Read every checkpoint tensor once and write each rank's share of it (a linear layer's shard quantized on
    its own with `quant`: scales per output channel of the shard)."""
    owner = {layer: (pp_rank, local) for pp_rank in range(pp)
             for local, layer in enumerate(pp_layers(spec.num_layers, pp, pp_rank))}
    total = spec.num_layers + 2
    done = 0

    def tick():
        nonlocal done
        done += 1
        if progress:
            progress(done, total)

    def get(name: str) -> torch.Tensor:
        return source.get(name).to(dtype)

    def linear(f, name: str, shard: torch.Tensor) -> None:
        if quant is None:
            f.write(name + ".weight", shard)
            return
        stored, scale = quant.quantize(shard)
        f.write(name + ".weight", stored)
        f.write(name + ".per_channel_scale", scale)

    embed = get("model.embed_tokens.weight")
    for t in range(tp):
        files[t].write("transformer.vocab_embedding.weight", embed)
    tick()
    for layer in range(spec.num_layers):
        pp_rank, local = owner[layer]
        hf, p = f"model.layers.{layer}.", f"transformer.layers.{local}."
        q, k, v = (get(hf + f"self_attn.{x}_proj.weight") for x in "qkv")
        if spec.num_kv_heads < tp:
            k, v = dup_kv(k, spec.num_kv_heads, tp), dup_kv(v, spec.num_kv_heads, tp)
        parts = [torch.chunk(x, tp, dim=0) for x in (q, k, v)]
        norms = (get(hf + "input_layernorm.weight"), get(hf + "post_attention_layernorm.weight"))
        dense = torch.chunk(get(hf + "self_attn.o_proj.weight"), tp, dim=1)
        fc = torch.chunk(get(hf + "mlp.gate_proj.weight"), tp, dim=0)
        gate = torch.chunk(get(hf + "mlp.up_proj.weight"), tp, dim=0)
        proj = torch.chunk(get(hf + "mlp.down_proj.weight"), tp, dim=1)
        for t in range(tp):
            f = files[pp_rank * tp + t]
            f.write(p + "input_layernorm.weight", norms[0])
            linear(f, p + "attention.qkv", torch.cat([parts[0][t], parts[1][t], parts[2][t]], dim=0))
            linear(f, p + "attention.dense", dense[t])
            f.write(p + "post_layernorm.weight", norms[1])
            linear(f, p + "mlp.fc", fc[t])
            linear(f, p + "mlp.gate", gate[t])
            linear(f, p + "mlp.proj", proj[t])
        tick()
    head = embed if spec.tie_word_embeddings else get("lm_head.weight")
    del embed
    padded = torch.zeros(padded_vocab(spec.vocab_size, tp), spec.hidden_size, dtype=dtype)
    padded[: spec.vocab_size] = head
    last = (pp - 1) * tp
    norm = get("model.norm.weight")
    for t, shard in enumerate(torch.chunk(padded, tp, dim=0)):
        files[last + t].write("transformer.ln_f.weight", norm)
        files[last + t].write("lm_head.weight", shard)
    tick()
