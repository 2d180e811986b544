"""PyramidKV (Cai et al., 2024): SnapKV's selection with per-layer budgets decreasing linearly with depth
(methods.budgets.pyramid_selected, the paper's rule: the mean is about C)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from methods.budgets import SCHEDULES, pyramid_selected
from methods.options import option, positive
from methods.snapkv import SnapKVPolicy


def beta_option() -> int:
    """The pyramid's `beta` option (a fresh field for every method that has a pyramid: PyramidKV, ChunkKV)."""
    return option(20, "smallest layer budget = (C - w) // beta", check=positive)


def schedule_option() -> str:
    return option("paper", "layer budgets: the paper's integer rule, or mean-preserving (mean exactly C - w)",
                  choices=SCHEDULES)


@dataclass(frozen=True)
class PyramidKVPolicy(SnapKVPolicy):
    """PyramidKV: SnapKV selection with per-layer budgets decreasing linearly with depth (mean about C)."""

    name: ClassVar[str] = "pyramidkv"
    beta: int = beta_option()
    schedule: str = schedule_option()

    def layer_selected(self, num_layers: int, prompt_len: int) -> list[int] | None:
        return pyramid_selected(num_layers, self.kv_budget, self.window, prompt_len, self.beta, self.schedule)
