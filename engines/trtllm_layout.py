"""Read a TensorRT-LLM checkpoint back and run a plain PyTorch forward over its layout, the way the runtime
splits the work: each tensor-parallel rank computes with its own shards (its query heads and KV heads, its
rows of the column-parallel projections), row-parallel outputs are summed across ranks (the all-reduce),
column-parallel logits are concatenated (the padding rows dropped), and pipeline ranks run their layers in
order. Equal logits to Hugging Face's model prove the checkpoint's layout (tests/exporter/trtllm).
A weight-only checkpoint (quant_algo W8A16 / W4A16) has its linear layers read back through
`WeightOnly.dequantize`, which finds each logical weight where TensorRT-LLM's preprocessed layout puts it.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from exporter.specs import ModelSpec
from exporter.trtllm.checkpoint import kv_heads_per_rank, pp_layers
from exporter.trtllm.weight_only import WeightOnly
from pkv_core.errors import UserInputError


def read_checkpoint(directory: Path) -> tuple[dict, list[dict[str, torch.Tensor]]]:
    """(config.json, one {name: tensor} per rank) of a TensorRT-LLM checkpoint directory."""
    directory = Path(directory)
    try:
        config = json.loads((directory / "config.json").read_text())
        world = config["mapping"]["world_size"]
    except (OSError, ValueError, KeyError) as e:
        raise UserInputError(f"{directory}: not a TensorRT-LLM checkpoint ({e})") from None
    ranks = []
    for r in range(world):
        with safe_open(str(directory / f"rank{r}.safetensors"), framework="pt") as f:
            ranks.append({k: f.get_tensor(k) for k in f.keys()})  # noqa: SIM118 - safe_open has no __iter__
    return config, ranks


def _rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    return weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


@torch.inference_mode()
def layout_forward(directory: Path, input_ids: torch.Tensor) -> torch.Tensor:
    """input_ids [B, q] (no padding) -> logits [B, q, V] float32, computed rank by rank from the rank files."""
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    config, ranks = read_checkpoint(directory)
    algo = (config.get("quantization") or {}).get("quant_algo")
    if algo not in (None, "W8A16", "W4A16"):
        raise UserInputError(f"{directory}: quant_algo {algo} is not read here")
    quant = WeightOnly(8 if algo == "W8A16" else 4) if algo else None

    def linear(w: dict, name: str) -> torch.Tensor:
        """[out, in] float32 of a linear layer of a rank: stored as is, or weight-only quantized."""
        if quant is None:
            return w[name + ".weight"].float()
        return quant.dequantize(w[name + ".weight"], w[name + ".per_channel_scale"])

    spec = ModelSpec.from_dict(config["pkv"]["model"])
    tp, pp = config["mapping"]["tp_size"], config["mapping"]["pp_size"]
    d, eps = config["head_size"], config["norm_epsilon"]
    q_heads, kv_heads = config["num_attention_heads"] // tp, kv_heads_per_rank(spec, tp)
    b, q = input_ids.shape
    positions = torch.arange(q).expand(b, q)
    x = ranks[0]["transformer.vocab_embedding.weight"][input_ids].float()
    cos, sin = LlamaRotaryEmbedding(spec.to_hf_config())(x, positions)
    cos, sin = cos[:, None], sin[:, None]  # [B, 1, q, d]
    rows, cols = torch.arange(q)[:, None], torch.arange(q)[None, :]
    visible = cols <= rows
    if spec.sliding_window:
        visible &= (rows - cols) < spec.sliding_window
    for pp_rank in range(pp):
        for local, _ in enumerate(pp_layers(spec.num_layers, pp, pp_rank)):
            p = f"transformer.layers.{local}."
            shards = [ranks[pp_rank * tp + t] for t in range(tp)]
            h = _rms(x, shards[0][p + "input_layernorm.weight"].float(), eps)
            attn = torch.zeros_like(x)
            for w in shards:  # each rank: its heads, then its slice of the output projection; summed (all-reduce)
                qkv = h @ linear(w, p + "attention.qkv").T
                qr, kr, vr = qkv.split([q_heads * d, kv_heads * d, kv_heads * d], dim=-1)
                qr = _rotate(qr.view(b, q, q_heads, d).transpose(1, 2), cos, sin)
                kr = _rotate(kr.view(b, q, kv_heads, d).transpose(1, 2), cos, sin)
                vr = vr.view(b, q, kv_heads, d).transpose(1, 2)
                group = q_heads // kv_heads
                kr, vr = kr.repeat_interleave(group, 1), vr.repeat_interleave(group, 1)
                scores = (qr @ kr.transpose(-1, -2)) * d**-0.5
                probs = torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1)
                out = (probs @ vr).transpose(1, 2).reshape(b, q, q_heads * d)
                attn = attn + out @ linear(w, p + "attention.dense").T
            x = x + attn
            h = _rms(x, shards[0][p + "post_layernorm.weight"].float(), eps)
            mlp = torch.zeros_like(x)
            for w in shards:  # gated MLP: proj(SiLU(fc(h)) * gate(h)), row-parallel proj summed
                act = torch.nn.functional.silu(h @ linear(w, p + "mlp.fc").T) * (h @ linear(w, p + "mlp.gate").T)
                mlp = mlp + act @ linear(w, p + "mlp.proj").T
            x = x + mlp
    last = [ranks[(pp - 1) * tp + t] for t in range(tp)]
    h = _rms(x, last[0]["transformer.ln_f.weight"].float(), eps)
    logits = torch.cat([h @ w["lm_head.weight"].float().T for w in last], dim=-1)  # column parallel: gathered
    return logits[..., : config["vocab_size"]]
