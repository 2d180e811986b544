"""The test matrix of the methods, derived from the registry: every registered method goes through the parity
tests on every graph target it runs on, with no edit here (a new method is checked against the reference as soon as
it is registered). Variants add the behaviours one method has beyond its defaults."""

from __future__ import annotations

from methods import POLICIES, options_for
from methods.backends import ONNX_TENSORRT, ONNXRUNTIME

# Settings that make every method compress the tiny models' ~150-token prompts (those a method lacks are skipped).
SMALL = {"kv_budget": 32, "window": 4, "min_context": 8}

# Behaviours beyond a method's defaults, one case each (name, options on top of SMALL).
VARIANTS = [
    ("pyramidkv", {"granularity": "query-head", "pooling": "avg", "schedule": "mean"}),
    ("chunkkv", {"chunk_size": 3, "reuse": 2, "budget_schedule": "pyramid"}),
    # the geometric schedule, sinks, and the generation stage (compressing every 3 generated tokens)
    ("pyramidinfer", {"decay": 0.5, "decay_schedule": "geometric", "sinks": 2, "recent_ratio": 0.05,
                      "update_interval": 3, "gen_decay": 0.5}),
]
# A method's case beyond SMALL where its defaults would prove less on a tiny model: ChunkKV's 10-token chunks in a
# 32 budget; KVzip's 2000-token scoring chunks (one chunk: its later chunks' prompt and postfix never run).
DEFAULTS = {"chunkkv": {"chunk_size": 4}, "kvzip": {"score_chunk": 16, "sinks": 2, "postfix": 3},
            "pyramidinfer": {"decay": 0.7}}


def small(name: str, **options) -> dict:
    """SMALL for method `name`, then `options` (which it must have)."""
    return options_for(name, SMALL) | options


def flags(name: str, **options) -> list[str]:
    """`small(name, **options)` as CLI flags."""
    return [f"--{k.replace('_', '-')}={v}" for k, v in small(name, **options).items()]


def targets(name: str) -> list[str]:
    """The ONNX graph targets method `name` runs on."""
    runs_on = POLICIES[name].runs_on
    return [t for t, backend in (("onnxruntime", ONNXRUNTIME), ("tensorrt", ONNX_TENSORRT)) if backend in runs_on]


def cases() -> list[tuple[str, dict]]:
    """(method, options beyond SMALL): every registered method once, then the variants."""
    return [(name, DEFAULTS.get(name, {})) for name in POLICIES] + VARIANTS


def case_id(name: str, options: dict) -> str:
    return "-".join([name, *map(str, options.values())])
