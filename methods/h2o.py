"""H2O (Zhang et al., 2023), KVCache-Factory's prefill variant: SnapKV's selection scored by the attention every
prompt query pays each key (accumulated), without pooling."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from methods import backends
from methods.options import option, positive_odd
from methods.snapkv import SnapKVPolicy
from methods.streamingllm import TRTLLM_HOOK


@dataclass(frozen=True)
class H2OPolicy(SnapKVPolicy):
    """H2O (KVCache-Factory's prefill variant): attention accumulated over every prompt query, no pooling."""

    name: ClassVar[str] = "h2o"
    observe: ClassVar[str] = "all"
    chunked_prefill: ClassVar[bool] = False  # its scores sum every prompt query's attention, not the window's
    runs_on: ClassVar[frozenset[str]] = backends.ALL - {backends.TRTLLM}
    refusals: ClassVar[dict[str, str]] = {backends.TRTLLM: TRTLLM_HOOK}
    kernel: int = option(1, "pooling width along keys (odd)", check=positive_odd)

    def pooling_op(self) -> str:
        return "none"
