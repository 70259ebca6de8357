"""``taylorseer``: TaylorSeer (Liu et al., 2025) per sample, on diffusers' fixed schedule.

The same first-order forecast of the whole stack as FastCache (``forecast.py``, unit gain), refreshed
at a fixed interval instead of by a rule: compute the first ``warmup_steps`` steps, then step
``warmup_steps + 1`` and every ``interval``-th step after it (diffusers' ``TaylorSeerCache``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from fastcache_core.methods.base import COMPUTE, FORECAST, CacheMethod, MethodContext, RequestSettings, SampleView
from fastcache_core.methods.registry import register_method

if TYPE_CHECKING:
    from fastcache_core.profile import CacheProfile


@dataclass(frozen=True)
class TaylorSeerParams:
    """TaylorSeer's settings for one sample.

    Args:
        enabled: forecast at all (request ``tolerance > 0``); ``False`` computes every step.
        interval: steps between real computes after the warm-up (request ``max_skip_steps + 1``).
            The warm-up is the cache's ``FastCacheConfig.first_steps``.
    """

    enabled: bool
    interval: int


def taylorseer_computes(step: int, warmup_steps: int, interval: int) -> bool:
    """TaylorSeer's schedule, as diffusers runs it: compute the first ``warmup_steps`` steps, then step
    ``warmup_steps + 1`` and every ``interval``-th step after it."""
    return step < warmup_steps or (step - warmup_steps - 1) % max(1, interval) == 0


class TaylorSeer(CacheMethod):
    """Per-sample TaylorSeer (see the module docstring)."""

    name = "taylorseer"
    request_fields = ("tolerance", "max_skip_steps")
    summary = "TaylorSeer: first-order forecast refreshed every max_skip_steps + 1 steps"

    def params(self, resolved: RequestSettings) -> TaylorSeerParams:
        return TaylorSeerParams(enabled=resolved.tolerance > 0.0, interval=resolved.max_skip_steps + 1)

    def approximator(self, profile: CacheProfile) -> str:
        return "taylor order 1"

    def mode(self, sample: SampleView, context: MethodContext, probe: float | None) -> str:
        p: TaylorSeerParams = sample.method_params
        if not p.enabled or sample.computes == 0:
            return COMPUTE
        return COMPUTE if taylorseer_computes(sample.step, context.first_steps, p.interval) else FORECAST


TAYLORSEER = register_method(TaylorSeer())
