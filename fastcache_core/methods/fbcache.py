"""``fbcache``: First-Block-Cache per sample.

Block 0 runs every step; blocks 1..L-1 are reused (their last residual added to block 0's output)
while the relative L1 change of block 0's residual since the sample's last full compute stays below the
threshold.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from fastcache_core.methods.base import COMPUTE, FIRST_BLOCK, CacheMethod, MethodContext, RequestSettings, SampleView
from fastcache_core.methods.registry import register_method

if TYPE_CHECKING:
    from fastcache_core.profile import CacheProfile


@dataclass(frozen=True)
class FirstBlockCacheParams:
    """First-Block-Cache's settings for one sample.

    Args:
        threshold: block 0's relative residual change below which the tail is reused (request
            ``tolerance``); ``0`` computes every step.
    """

    threshold: float


class FirstBlockCache(CacheMethod):
    """Per-sample First-Block-Cache (see the module docstring)."""

    name = "fbcache"
    request_fields = ("tolerance",)
    summary = "First-Block-Cache: reuse blocks 1.. while block 0's residual changes less than tolerance"

    def params(self, resolved: RequestSettings) -> FirstBlockCacheParams:
        return FirstBlockCacheParams(threshold=resolved.tolerance)

    def approximator(self, profile: CacheProfile) -> str:
        return "residual reuse"

    def mode(self, sample: SampleView, context: MethodContext, probe: float | None) -> str:
        return FIRST_BLOCK if sample.method_params.threshold > 0.0 else COMPUTE

    def reuses_tail(self, sample: SampleView, first_block_change: float) -> bool:
        threshold = sample.method_params.threshold
        return sample.computes > 0 and threshold > 0.0 and first_block_change < threshold


FBCACHE = register_method(FirstBlockCache())
