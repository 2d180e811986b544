"""FullKV: no compression, the control every method is compared with (all of it is `methods.base`'s defaults)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from methods.base import KVPolicy


@dataclass(frozen=True)
class FullKVPolicy(KVPolicy):
    """FullKV: no compression; the whole prompt stays in the cache."""

    name: ClassVar[str] = "full"
