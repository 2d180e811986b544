"""`plan`: per-layer budgets and KV-cache memory, full versus compressed, from the spec alone (no weights)."""

from __future__ import annotations

from typing import Any

from exporter.quantize import WeightQuant, weight_bytes
from exporter.specs import ModelSpec
from methods import KVPolicy
from pkv_core.errors import UserInputError

DTYPE_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2, "fp8": 1}


def make_plan(spec: ModelSpec, policy: KVPolicy, context: int, batch: int = 1, dtype: str = "fp16",
              weights: WeightQuant | None = None, memory: int | None = None) -> dict[str, Any]:
    """KV cache held after the prefill of `batch` prompts of `context` tokens, and the weights beside it.

    `cached` per layer = selected prefix tokens + the window (or the whole prompt when nothing is compressed).
    Weights: every tensor in `dtype`, or the decoder's linear layers quantized by `weights` (`--weights`).
    `memory`: bytes available; the plan then says whether weights + KV fit, full and compressed (activations and
    the runtime's own buffers are not counted).
    """
    if context < 1 or batch < 1:
        raise UserInputError(f"--context and --batch must be positive (got {context}, {batch})")
    if dtype not in DTYPE_BYTES:
        raise UserInputError(f"unknown dtype '{dtype}' (choose from {', '.join(DTYPE_BYTES)})")
    nbytes = DTYPE_BYTES[dtype]
    selected = policy.layer_selected(spec.num_layers, context)
    window = policy.window
    if selected is None:
        layers = [{"layer": i, "selected": None, "cached": context} for i in range(spec.num_layers)]
    else:
        layers = [{"layer": i, "selected": s, "cached": policy.kept_prefix(s) + window} for i, s in enumerate(selected)]
    heads = spec.num_heads if policy.cache_heads_are_query_heads else spec.num_kv_heads
    full = batch * spec.num_layers * context * spec.kv_bytes_per_token(nbytes)
    compressed = batch * sum(row["cached"] for row in layers) * spec.kv_bytes_per_token(nbytes, heads)
    mean_cached = sum(row["cached"] for row in layers) / spec.num_layers
    wbytes = weight_bytes(spec, nbytes, weights)
    fits = None if memory is None else {"memory": memory, "full": wbytes + full <= memory,
                                        "compressed": wbytes + compressed <= memory}
    return {
        "model": spec.name,
        "policy": policy.name,
        "hyperparameters": policy.hyperparameters(),
        "num_layers": spec.num_layers,
        "num_kv_heads": spec.num_kv_heads,
        "cache_heads": heads,
        "head_dim": spec.head_dim,
        "window": window,
        "kv_budget": getattr(policy, "kv_budget", None),
        "context": context,
        "max_position_embeddings": spec.max_position_embeddings,
        "beyond_positions": context > spec.max_position_embeddings,  # the model cannot attend that far
        "batch": batch,
        "dtype": dtype,
        "regime": policy.regime(selected),
        "layers": layers,
        "mean_cached": mean_cached,
        "kv_bytes_full": full,
        "kv_bytes_compressed": compressed,
        "ratio": compressed / full,
        "weights": weights.name if weights else "fp",
        "weight_bytes": wbytes,
        "total_bytes_full": wbytes + full,
        "total_bytes_compressed": wbytes + compressed,
        "fits": fits,
    }


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"
