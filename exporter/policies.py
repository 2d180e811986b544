"""KV-cache compression policies: one small dataclass per method, hyperparameters as fields, one registry.

A policy answers two questions for every backend: how many prefix tokens each layer keeps (`layer_selected`),
and which ones (`select`, in the op's reference semantics). Subclasses override only what differs:
PyramidKV is SnapKV with a pyramid budget rule; H2O is SnapKV scoring with every prompt query and no pooling.

How to add a method: subclass `KVPolicy` (or the closest method), set `name`, add its hyperparameters as fields
with defaults, override `layer_selected` and/or `select`, decorate with `@register`, and add it to the test
matrix (tests/exporter/test_policies.py runs every registered policy).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from exporter.budgets import SCHEDULES, pyramid_selected, uniform_selected
from pkv_core.errors import UserInputError
from trt_plugins.chunkkv_select import chunkkv_from_scores, chunkkv_select
from trt_plugins.pyramidinfer_select import SCHEDULES as INFER_SCHEDULES
from trt_plugins.pyramidinfer_select import context_counts, recent_length
from trt_plugins.pyramidkv_select import GRANULARITIES, pyramidkv_select
from trt_plugins.streaming_select import streaming_select

POLICIES: dict[str, type[KVPolicy]] = {}


def register(cls: type[KVPolicy]) -> type[KVPolicy]:
    POLICIES[cls.name] = cls
    return cls


@register
@dataclass(frozen=True)
class KVPolicy:
    """FullKV: no compression; the whole prompt stays in the cache."""

    name: ClassVar[str] = "full"

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):  # a manifest or a caller may hand over a wrong type: say which
            value, want = getattr(self, f.name), type(f.default)
            if isinstance(value, bool) != (want is bool) or not isinstance(value, want):
                raise UserInputError(f"--{f.name.replace('_', '-')} must be {want.__name__} (got {value!r})")
        self.validate()

    def validate(self) -> None:
        pass

    @property
    def compresses(self) -> bool:
        return False

    @property
    def cache_heads_are_query_heads(self) -> bool:
        return False

    # True when the selection is one decision over every layer after the prefill (KVzip), not per layer inside it.
    global_selection: ClassVar[bool] = False
    # True when later layers of the prefill see only the tokens earlier layers kept (PyramidInfer).
    drops_tokens: ClassVar[bool] = False
    # True when `plan`'s bytes are an upper bound the data may undercut (ChunkKV: a partial last chunk).
    plan_is_upper_bound: ClassVar[bool] = False

    def layer_selected(self, num_layers: int, prompt_len: int) -> list[int] | None:
        """Prefix tokens kept per layer for a prompt of `prompt_len` tokens; None = keep everything."""
        return None

    def kept_prefix(self, selected: int) -> int:
        """Prefix tokens a layer holds for a budget of `selected` (what `plan` counts)."""
        return selected

    def batch_selected(self, num_layers: int, lengths: list[int]) -> torch.Tensor | None:
        """[L, B] int64: every prompt's own budget per layer (its real length decides its regime), so a prompt
        keeps the same tokens batched as alone. None when nothing is compressed: FullKV, or every prompt of the
        batch shorter than the budget."""
        if not self.compresses or max(lengths) < self.kv_budget:
            return None
        rows = []
        for n in lengths:
            sel = self.layer_selected(num_layers, n)
            rows.append(sel if sel is not None else [max(n - self.window, 0)] * num_layers)
        return torch.tensor(rows, dtype=torch.long).T.contiguous()

    def select(
        self, queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, lengths: torch.Tensor,
        selected: int | torch.Tensor, layer: int = 0, shared: dict | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Right-padded queries [B, q, H, d], keys/values [B, Hkv, q, d], lengths [B] -> indices, K, V in the op's
        semantics (trt_plugins.pyramidkv_select: compact rows, -1 for unused slots). `shared` carries what one
        layer leaves for later layers of the same prefill (ChunkKV's index reuse)."""
        raise NotImplementedError(f"policy '{self.name}' does not select")

    def hyperparameters(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def describe(self) -> str:
        hp = ", ".join(f"{k}={v}" for k, v in self.hyperparameters().items())
        return f"{self.name}({hp})"


@dataclass(frozen=True)
class _BudgetedPolicy(KVPolicy):
    kv_budget: int = 128
    window: int = 8

    def validate(self) -> None:
        _positive(self, "kv_budget", "window")
        if self.kv_budget <= self.window:
            raise UserInputError(
                f"--kv-budget ({self.kv_budget}) must exceed --window ({self.window}): the budget includes the window"
            )

    @property
    def compresses(self) -> bool:
        return True

    def layer_selected(self, num_layers: int, prompt_len: int) -> list[int] | None:
        return uniform_selected(num_layers, self.kv_budget, self.window, prompt_len)


@register
@dataclass(frozen=True)
class StreamingLLMPolicy(_BudgetedPolicy):
    """StreamingLLM: `sinks` first tokens + the most recent tokens, C per layer."""

    name: ClassVar[str] = "streamingllm"
    sinks: int = 4

    def validate(self) -> None:
        super().validate()
        if self.sinks < 0 or self.sinks > self.kv_budget - self.window:
            raise UserInputError(f"--sinks must be in [0, kv_budget - window] (got {self.sinks})")

    def select(self, queries, keys, values, lengths, selected, layer=0, shared=None):
        return streaming_select(keys, values, lengths, selected, self.window, self.sinks)


@register
@dataclass(frozen=True)
class SnapKVPolicy(_BudgetedPolicy):
    """SnapKV: keys the last `window` queries attend to most, pooled along keys, C per layer."""

    name: ClassVar[str] = "snapkv"
    kernel: int = 7
    pooling: str = "max"
    granularity: str = "kv-head"

    def validate(self) -> None:
        super().validate()
        if self.kernel < 1 or self.kernel % 2 == 0:
            raise UserInputError(f"--kernel must be a positive odd number (got {self.kernel})")
        if self.pooling not in ("max", "avg"):
            raise UserInputError(f"unknown pooling '{self.pooling}' (choose from max, avg)")
        if self.granularity not in GRANULARITIES:
            raise UserInputError(f"unknown granularity '{self.granularity}' (choose from {', '.join(GRANULARITIES)})")

    @property
    def cache_heads_are_query_heads(self) -> bool:
        return self.granularity == "query-head"

    observe: ClassVar[str] = "window"  # which prompt queries score the keys (trt_plugins.pyramidkv_select)

    def select(self, queries, keys, values, lengths, selected, layer=0, shared=None):
        return pyramidkv_select(queries, keys, values, lengths, selected, self.window, self.kernel,
                                self.pooling_op(), self.granularity, self.observe)

    def pooling_op(self) -> str:
        return self.pooling


@register
@dataclass(frozen=True)
class H2OPolicy(SnapKVPolicy):
    """H2O (KVCache-Factory's prefill variant): attention accumulated over every prompt query, no pooling."""

    name: ClassVar[str] = "h2o"
    observe: ClassVar[str] = "all"
    kernel: int = 1

    def pooling_op(self) -> str:
        return "none"


@register
@dataclass(frozen=True)
class PyramidKVPolicy(SnapKVPolicy):
    """PyramidKV: SnapKV selection with per-layer budgets decreasing linearly with depth (mean about C)."""

    name: ClassVar[str] = "pyramidkv"
    beta: int = 20
    schedule: str = "paper"

    def validate(self) -> None:
        super().validate()
        _positive(self, "beta")
        if self.schedule not in SCHEDULES:
            raise UserInputError(f"unknown schedule '{self.schedule}' (choose from {', '.join(SCHEDULES)})")

    def layer_selected(self, num_layers: int, prompt_len: int) -> list[int] | None:
        return pyramid_selected(num_layers, self.kv_budget, self.window, prompt_len, self.beta, self.schedule)


BUDGET_SCHEDULES = ("uniform", "pyramid")


@register
@dataclass(frozen=True)
class ChunkKVPolicy(_BudgetedPolicy):
    """ChunkKV: the prompt cut into chunks of `chunk_size` tokens from position 0 (kvpress's grid), scored by the
    observation window (optionally pooled: `kernel`, `pooling`) and kept whole, the window's chunks always; layers
    in groups of `reuse` rank chunks once, at the group's first layer (index reuse); budgets uniform (the paper)
    or PyramidKV's pyramid (`budget_schedule`)."""

    name: ClassVar[str] = "chunkkv"
    plan_is_upper_bound: ClassVar[bool] = True
    chunk_size: int = 10
    kernel: int = 1  # no pooling: the paper's Algorithm 1 (kvpress's SnapKVPress scorer: avg pooling, width 5)
    pooling: str = "avg"
    reuse: int = 1
    budget_schedule: str = "uniform"
    beta: int = 20
    schedule: str = "paper"

    def validate(self) -> None:
        super().validate()
        _positive(self, "chunk_size", "reuse", "beta")
        if self.kernel < 1 or self.kernel % 2 == 0:
            raise UserInputError(f"--kernel must be a positive odd number (got {self.kernel})")
        if self.pooling not in ("max", "avg"):
            raise UserInputError(f"unknown pooling '{self.pooling}' (choose from max, avg)")
        if self.budget_schedule not in BUDGET_SCHEDULES:
            raise UserInputError(f"unknown budget schedule '{self.budget_schedule}' (choose from "
                                 f"{', '.join(BUDGET_SCHEDULES)})")
        if self.schedule not in SCHEDULES:
            raise UserInputError(f"unknown schedule '{self.schedule}' (choose from {', '.join(SCHEDULES)})")

    def layer_selected(self, num_layers: int, prompt_len: int) -> list[int] | None:
        if self.budget_schedule == "pyramid":
            return pyramid_selected(num_layers, self.kv_budget, self.window, prompt_len, self.beta, self.schedule)
        return super().layer_selected(num_layers, prompt_len)

    def kept_prefix(self, selected: int) -> int:
        """At most `selected` besides the window: whole chunks, the window's chunks included (fewer when the
        chunks do not fill the budget exactly)."""
        return selected

    def scores_from(self, layer: int) -> int:
        """The layer whose chunk ranking `layer` uses: the first of its reuse group."""
        return layer - layer % self.reuse

    def select(self, queries, keys, values, lengths, selected, layer=0, shared=None):
        source = self.scores_from(layer)
        if shared is not None and source != layer:
            return chunkkv_from_scores(shared[("chunkkv", source)], keys, values, lengths, selected, self.window,
                                       self.chunk_size)
        idx, k, v, scores = chunkkv_select(queries, keys, values, lengths, selected, self.window, self.chunk_size,
                                           self.kernel, self.pooling)
        if shared is not None:
            shared[("chunkkv", layer)] = scores
        return idx, k, v


@register
@dataclass(frozen=True)
class KVzipPolicy(KVPolicy):
    """KVzip: query-agnostic. After the prefill the model reconstructs the context (teacher-forced, in chunks of
    `score_chunk` tokens); each cached pair scores the most attention it receives; the top pairs over every layer
    and head are kept at once (per-head lengths), C per head on average, the first `sinks` tokens always. No
    observation window: nothing about the question is known (trt_plugins.kvzip_select)."""

    name: ClassVar[str] = "kvzip"
    global_selection: ClassVar[bool] = True
    window: ClassVar[int] = 0  # nothing is kept for being recent: the budget C is all scored pairs
    kv_budget: int = 128
    sinks: int = 4
    score_chunk: int = 2000  # the official self_task chunk_size
    postfix: int = 8

    def validate(self) -> None:
        _positive(self, "kv_budget", "score_chunk")
        if self.sinks < 0 or self.sinks > self.kv_budget:
            raise UserInputError(f"--sinks must be in [0, kv_budget] (got {self.sinks})")
        if self.postfix < 0:
            raise UserInputError(f"--postfix must be a non-negative integer (got {self.postfix})")

    @property
    def compresses(self) -> bool:
        return True

    def layer_selected(self, num_layers: int, prompt_len: int) -> list[int] | None:
        """The mean per layer (C); the engine spreads the same total unevenly over layers and heads."""
        return uniform_selected(num_layers, self.kv_budget, 0, prompt_len)

    def batch_selected(self, num_layers: int, lengths: list[int]) -> torch.Tensor | None:
        return None  # the prefill keeps everything; the selection comes after it, over every layer at once


@register
@dataclass(frozen=True)
class PyramidInferPolicy(KVPolicy):
    """PyramidInfer: compression inside the prefill. After each layer the recent window's attention (mean over
    heads, rows weighted by recency) picks the pivotal context that goes on to the next layer, a fraction of it per
    layer on the official configs' cosine ramp from 1 to `decay` (or `decay` at every layer: `geometric`), at least
    `min_context`; the recent window (last `recent_ratio` of the prompt) and the first
    `sinks` tokens always stay. While generating, every `update_interval` tokens that leave the recent window are
    compressed the same way, `gen_decay` on the paper code's cosine ramp (trt_plugins.pyramidinfer_select).
    Prefill budgets follow from the prompt length alone."""

    name: ClassVar[str] = "pyramidinfer"
    drops_tokens: ClassVar[bool] = True
    window: ClassVar[int] = 0  # the recent window is part of what each layer reports as selected
    recent_ratio: float = 0.2
    decay: float = 0.9
    decay_schedule: str = "cosine"  # the official configs' prefill_decay_strategy
    min_context: int = 64
    sinks: int = 4
    distance_weight: float = 1.2
    update_interval: int = 16
    gen_decay: float = 0.1

    def validate(self) -> None:
        _positive(self, "min_context", "update_interval")
        if not 0.0 < self.gen_decay <= 1.0:
            raise UserInputError(f"--gen-decay must be in (0, 1] (got {self.gen_decay})")
        if not 0.0 <= self.recent_ratio < 1.0:
            raise UserInputError(f"--recent-ratio must be in [0, 1) (got {self.recent_ratio})")
        if not 0.0 < self.decay <= 1.0:
            raise UserInputError(f"--decay must be in (0, 1] (got {self.decay})")
        if self.decay_schedule not in INFER_SCHEDULES:
            raise UserInputError(f"unknown decay schedule '{self.decay_schedule}' (choose from "
                                 f"{', '.join(INFER_SCHEDULES)})")
        if self.sinks < 0:
            raise UserInputError(f"--sinks must be a non-negative integer (got {self.sinks})")
        if self.distance_weight <= 0:
            raise UserInputError(f"--distance-weight must be positive (got {self.distance_weight})")

    @property
    def compresses(self) -> bool:
        return True

    def cached_counts(self, num_layers: int, prompt_len: int) -> list[int]:
        """Tokens each layer caches for a prompt of `prompt_len`: its alive context and the recent window."""
        recent = recent_length(prompt_len, self.recent_ratio) + 1
        return [c + min(recent, prompt_len) for c in context_counts(
            prompt_len, num_layers, self.recent_ratio, self.decay, self.decay_schedule, self.min_context)]

    def layer_selected(self, num_layers: int, prompt_len: int) -> list[int] | None:
        counts = self.cached_counts(num_layers, prompt_len)
        return None if counts[-1] == prompt_len else counts

    def batch_selected(self, num_layers: int, lengths: list[int]) -> torch.Tensor | None:
        return None  # the prefill itself drops tokens layer by layer (engines.compressed_cache)


def _positive(policy: KVPolicy, *fields: str) -> None:
    for f in fields:
        value = getattr(policy, f)
        if not isinstance(value, int) or value <= 0:
            raise UserInputError(f"--{f.replace('_', '-')} must be a positive integer (got {value})")


def check_policy_record(record: dict[str, Any]) -> KVPolicy:
    """A recorded policy (a manifest's `policy` block: name + every hyperparameter) rebuilt and validated."""
    name = record.get("name")
    if not isinstance(name, str) or name not in POLICIES:
        raise UserInputError(f"unknown policy {name!r} (choose from {', '.join(POLICIES)})")
    fields = {f.name for f in dataclasses.fields(POLICIES[name])}
    given = set(record) - {"name"}
    if given != fields:
        raise UserInputError(f"policy '{name}' has hyperparameters {sorted(fields)}, the record has {sorted(given)}")
    return make_policy(name, **{k: v for k, v in record.items() if k != "name"})


def make_policy(name: str, **hyperparameters: Any) -> KVPolicy:
    """Build a registered policy; options it does not have (or left as None) are ignored."""
    try:
        cls = POLICIES[name]
    except KeyError:
        raise UserInputError(f"unknown policy '{name}' (choose from {', '.join(POLICIES)})") from None
    fields = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in hyperparameters.items() if k in fields and v is not None})
