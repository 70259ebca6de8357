"""``teacache``: TeaCache (Liu et al., 2024) per sample.

Reuse the whole stack's last residual while the accumulated, polynomially rescaled relative L1 change
of the first block's timestep-modulated input stays below the threshold; compute (and reset the
accumulator) once it does not. The rescaling polynomial is calibrated per model
(``CacheProfile.metadata["teacache_coefficients"]``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from fastcache_core.methods.base import (
    COMPUTE,
    INPUT_CHANGE,
    REUSE,
    CacheMethod,
    MethodContext,
    RequestSettings,
    SampleView,
)
from fastcache_core.methods.registry import register_method

if TYPE_CHECKING:
    from fastcache_core.profile import CacheProfile


@dataclass(frozen=True)
class TeaCacheParams:
    """TeaCache's settings for one sample.

    Args:
        threshold: the accumulated rescaled input change below which the stack is reused (request
            ``tolerance``); ``0`` computes every step.
    """

    threshold: float


@dataclass
class TeaCacheState:
    """The rescaled input change accumulated since the sample's last real compute."""

    accumulated: float = 0.0


def teacache_rescaled_change(coefficients: Sequence[float], relative_change: float) -> float:
    """TeaCache's rescaling of a relative input change into an estimated output change: the calibrated
    polynomial (highest power first, numpy.polyfit order), floored at 0."""
    value = 0.0
    for c in coefficients:
        value = value * relative_change + c
    return max(0.0, value)


class TeaCache(CacheMethod):
    """Per-sample TeaCache (see the module docstring)."""

    name = "teacache"
    request_fields = ("tolerance",)
    summary = "TeaCache: reuse the stack residual while the accumulated input change stays below tolerance"

    def params(self, resolved: RequestSettings) -> TeaCacheParams:
        return TeaCacheParams(threshold=resolved.tolerance)

    def new_state(self, params: TeaCacheParams) -> TeaCacheState:
        return TeaCacheState()

    def approximator(self, profile: CacheProfile) -> str:
        return "residual reuse"

    def keeps_inputs(self, sample: SampleView) -> bool:
        return True

    def probe(self, sample: SampleView, context: MethodContext) -> str | None:
        return INPUT_CHANGE if sample.method_params.threshold > 0.0 else None

    def mode(self, sample: SampleView, context: MethodContext, probe: float | None) -> str:
        state: TeaCacheState = sample.method_state
        threshold = sample.method_params.threshold
        if probe is None or threshold <= 0.0:
            return COMPUTE
        if sample.computes == 0:
            state.accumulated = 0.0
            return COMPUTE
        coefficients = context.profile.metadata.get("teacache_coefficients", [1.0, 0.0])
        state.accumulated += teacache_rescaled_change(coefficients, probe)
        if state.accumulated < threshold:
            return REUSE
        state.accumulated = 0.0
        return COMPUTE


TEACACHE = register_method(TeaCache())
