"""``fastcache``: FastCache's refresh rule, per sample.

Between real computes a sample's stack output is forecast from its own history (``forecast.py``); a
first-order forecast drifts from the truth like ``c h^2`` over a horizon of ``h`` steps. Calibration
measures the typical drift of every schedule phase (``CacheProfile``), so the request's tolerance
``tau`` sets the horizon a typical sample keeps:

    H = floor(sqrt(tau / drift_scale))

Measured on the bundled model, *when* to refresh matters more than anything else: gaps of equal length
from the second step on, with a short first window (the output can only be reused until the second
compute gives a slope), beat every density profile tried.

At every real compute the forecast that *would* have been used is compared with the real output in the
transformer's output space (what the sampler integrates): ``e = ||P (Y_hat - Y)|| / ||P Y||``. Part of
``e`` is the model's per-step noise floor ``f``; the drift is ``d = sqrt(max(e^2 - f^2, 0))``. The
chi-square test then guards each sample. Null hypothesis: the drift is noise of the relative scale a
typical sample shows at this phase and gap, ``s = slack * tau * w_phase * (gap / H)^2``; each of the
``n`` output numbers of the difference is N(0, (s ||P Y||)^2 / n), so ``n d^2 / s^2 ~ chi2(n)`` and the
test accepts at significance ``alpha`` when

    n d^2 / s^2 <= chi2_{1-alpha}(n).

A sample whose drift fails the test refreshes sooner, by the first-order law ``h = H sqrt(limit / d)``
(``limit``: the largest drift the test accepts). Every decision uses the sample's own numbers only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING

from fastcache_core.methods.base import (
    COMPUTE,
    FORECAST,
    CacheMethod,
    MethodContext,
    RequestSettings,
    SampleView,
    TokenPlan,
)
from fastcache_core.methods.registry import register_method

if TYPE_CHECKING:
    from fastcache_core.profile import CacheProfile

FIRST_WINDOW = 3
"""The longest forecast window after a sample's first compute (a zero-order reuse window; measured
best on the bundled model for every settled horizon from 3 to 6)."""


@dataclass(frozen=True)
class FastCacheParams:
    """FastCache's settings for one sample (the request's ``cache`` fields, as FastCache reads them).

    Args:
        tolerance: tau, the relative forecast drift (in the transformer's output space, beyond the
            model's per-step noise floor) accepted; sets the horizon. ``0`` computes every step.
        significance: alpha of the chi-square test on each sample's measured drift.
        max_skip_steps: the most consecutive forecast steps between two real computes.
        tokens: token selection and merging of real computes, or ``None`` (every token computes).
    """

    tolerance: float
    significance: float
    max_skip_steps: int
    tokens: TokenPlan | None


@dataclass
class FastCacheState:
    """One sample's refresh bookkeeping."""

    next_compute: int = 0
    """Step index of the next real compute."""
    last_error: float | None = None
    """Relative forecast error measured at the last real compute (``None`` before there was one)."""
    rejections: int = 0
    """How often the chi-square test shortened this sample's horizon."""


@lru_cache(maxsize=4096)
def chi_square_quantile(probability: float, dof: int) -> float:
    """Quantile of the chi-square distribution with ``dof`` degrees of freedom (scipy, exact)."""
    if not 0.0 < probability < 1.0:
        raise ValueError("probability must be in (0, 1)")
    if dof < 1:
        raise ValueError("dof must be >= 1")
    from scipy.stats import chi2  # imported here: the API reads this module and loads no scipy

    return float(chi2.ppf(probability, dof))


def max_accepted_error(scale: float, significance: float, dof: int) -> float:
    """The largest relative error the chi-square test accepts as noise of relative scale ``scale``."""
    if scale <= 0.0:
        return -1.0  # nothing is accepted: even an exact forecast is rejected
    return scale * math.sqrt(chi_square_quantile(1.0 - significance, dof) / dof)


def drift_above_floor(error: float, floor: float) -> float:
    """The part of a forecast error above the per-step noise floor (they add in quadrature)."""
    return math.sqrt(max(error * error - floor * floor, 0.0))


def settled_horizon(tolerance: float, drift_scale: float | None, max_skip_steps: int) -> int:
    """``H``: the longest whole number of steps at which a typical sample's drift ``drift_scale * H^2``
    stays within ``tolerance``; 1 for tolerance 0, 2 without a calibrated drift scale; at most
    ``max_skip_steps + 1``. Whole numbers because mixing gap lengths to reach fractional averages
    measured worse than the shorter whole gap alone on the bundled model."""
    if tolerance <= 0.0:
        return 1
    # a small allowance so that tolerances written as drift_scale * h^2, rounded, still reach h
    horizon = math.floor(math.sqrt(tolerance / drift_scale) + 1e-3) if drift_scale else 2
    return max(1, min(max_skip_steps + 1, horizon))


def fastcache_gap(
    state: FastCacheState,
    computes: int,
    horizon: int,
    error: float | None,
    floor: float,
    allowance: float,
    significance: float,
    dof: int,
    gap: int,
) -> int:
    """FastCache's rule: steps from this real compute to the next one.

    ``computes`` counts this compute already. ``horizon`` is the settled ``H``; ``error`` the relative
    forecast error measured at this compute (``None`` before two earlier computes existed), ``floor``
    the phase's noise floor, ``allowance`` the typical drift scale at horizon ``H`` for this phase
    (``slack * tau * w_phase``; ``<= 0`` switches the test off) and ``gap`` the steps since the
    previous compute.
    """
    if computes <= 1:  # the next window can only reuse the output: keep it short
        return max(1, min(FIRST_WINDOW, horizon - 1))
    if error is None or allowance <= 0.0:
        return horizon
    limit = max_accepted_error(allowance * (gap / horizon) ** 2, significance, dof)
    drift = drift_above_floor(error, floor)
    if drift <= limit:
        return horizon
    state.rejections += 1
    return max(1, min(horizon, math.floor(horizon * math.sqrt(limit / drift))))


class FastCache(CacheMethod):
    """FastCache per sample (see the module docstring)."""

    name = "fastcache"
    request_fields = (
        "tolerance",
        "significance",
        "motion_threshold",
        "motion_fraction",
        "merge_ratio",
        "max_skip_steps",
    )
    summary = "FastCache: per-sample forecast, refreshed by the calibrated rule and its chi-square test"

    def params(self, resolved: RequestSettings) -> FastCacheParams:
        r = resolved
        spatial = r.motion_threshold > 0.0 or r.motion_fraction < 1.0 or r.merge_ratio > 0.0
        tokens = TokenPlan(r.motion_threshold, r.motion_fraction, r.merge_ratio, r.max_skip_steps) if spatial else None
        return FastCacheParams(r.tolerance, r.significance, r.max_skip_steps, tokens)

    def new_state(self, params: FastCacheParams) -> FastCacheState:
        return FastCacheState()

    def approximator(self, profile: CacheProfile) -> str:
        return "fitted forecast" if profile.fitted else "taylor order 1 (uncalibrated)"

    def mode(self, sample: SampleView, context: MethodContext, probe: float | None) -> str:
        if sample.method_params.tolerance <= 0.0 or sample.computes == 0:
            return COMPUTE
        return COMPUTE if sample.step >= sample.method_state.next_compute else FORECAST

    def forecast_gain(self, sample: SampleView, context: MethodContext) -> float:
        return context.profile.gain(sample.phase)

    def token_plan(self, sample: SampleView) -> TokenPlan | None:
        params: FastCacheParams = sample.method_params
        return params.tokens

    def keeps_inputs(self, sample: SampleView) -> bool:
        return sample.method_params.tokens is not None  # token saliency compares with the last input

    def measures_forecast_error(self, sample: SampleView, context: MethodContext) -> bool:
        return context.profile.guard_slack is not None and sample.method_params.tolerance > 0.0 and sample.computes >= 2

    def after_compute(
        self, sample: SampleView, context: MethodContext, forecast_error: float | None, dof: int, gap: int
    ) -> None:
        p: FastCacheParams = sample.method_params
        state: FastCacheState = sample.method_state
        profile = context.profile
        if forecast_error is not None:
            state.last_error = forecast_error
        horizon = settled_horizon(p.tolerance, profile.drift_scale, p.max_skip_steps)
        slack = profile.guard_slack
        allowance = 0.0 if slack is None else slack * p.tolerance * profile.weight(sample.phase)
        gap_to_next = fastcache_gap(
            state,
            sample.computes,
            horizon,
            forecast_error,
            profile.floor(sample.phase),
            allowance,
            p.significance,
            dof,
            gap,
        )
        state.next_compute = sample.step + gap_to_next


FASTCACHE = register_method(FastCache())
