"""``fastcache``: FastCache's refresh rule, per sample, in the sampler's own time.

Between real computes a sample's stack output is forecast from its own history (``forecast.py``,
first order in normalized time). *When* it refreshes decides almost everything, so windows are
counted in **normalized time** ``p = 1 - t`` (0 at pure noise, 1 at the data), not in steps: measured on
the bundled models, image quality is then nearly a function of the window alone at 20, 50 and 100
steps, where a window in steps gives 13 dB at 10 steps and too little saving at 100.

Per sample (its own times, guidance scale and measurement; nothing from its batch mates):

1. **Step 0 computes**, then a zero-order (reuse) window of ``first_window`` (0.06 of the run; the
   last step at or before it): the second compute gives the first slope. A model whose composition
   is decided early computes every step of its calibrated ``warmup`` share of the run first.
2. **The test, at the second compute.** The error of what the sampler integrates, had the first
   output been reused: with guidance ``g`` and conditional/unconditional rows,
   ``e0 = || P (g (Yhat_c - Y_c) + (1 - g) (Yhat_u - Y_u)) || / || P Y_c ||`` (``P``: the model's output
   projection; one row without guidance). A typical sample of the calibration drifts at the reuse
   velocity ``v``, so ``r = e0 / (v D)`` over the window ``D``. Null hypothesis: the sample drifts like a
   typical one, its ``n`` output numbers N(0, (v D ||P Y_c||)^2 / n), so ``n r^2 ~ chi2(n)``; it is
   accepted at significance ``alpha`` when ``n r^2 <= chi2_{1-alpha}(n)``.
3. **The window.** A typical sample at tolerance ``tau`` keeps ``h_tau = sqrt(tau / window_scale)``
   (``window_scale``: the calibrated first-order drift per squared unit of normalized time, so ``tau`` is
   the relative drift of a typical sample's forecast at the end of its window). A sample the test
   rejects (high guidance, a hard prompt) keeps ``h = h_tau * max(r^-beta, min_factor)``; the window is
   then fixed for the rest of the run (measured: every later change of window costs 3-8 dB at equal
   MACs, because the first-order slope is a secant over the previous window).
4. **Refresh every ``h``**: the next compute is the step nearest to ``p_last + h`` (spacing of the next
   step estimated from the last one; exact for uniform schedules), at most ``max_skip_steps + 1``
   steps later.

The calibrated constants live in the model's profile (``CacheProfile.fastcache_rule``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING

from fastcache_core.methods.base import (
    COMPUTE,
    FORECAST,
    REFRESH,
    CacheMethod,
    MethodContext,
    RequestSettings,
    SampleView,
    TokenPlan,
)
from fastcache_core.methods.registry import register_method

if TYPE_CHECKING:
    from fastcache_core.profile import CacheProfile

_EPS = 1e-6  # times arrive as float32


@dataclass(frozen=True)
class FastCacheRule:
    """The model-level constants of FastCache's rule (calibrated; see the module docstring).

    Args:
        first_window: the reuse window after the first compute, in normalized time. Default ``0.06``.
        window_scale: typical first-order forecast drift per squared unit of normalized time; sets
            ``h_tau = sqrt(tau / window_scale)``. Default ``9.7`` (the digits model's).
        reuse_velocity: ``v``, a typical sample's relative reuse error per unit of normalized time at the
            calibration guidance; ``None`` switches the per-sample test off. Default ``None``.
        guidance_exponent: ``beta`` of the window factor ``r^-beta`` of a rejected sample. Default ``0.37``.
        min_factor: the shortest window factor. Default ``0.1``.
        warmup: the share of the run (normalized time from pure noise) in which every step computes,
            for a model whose composition is decided early (measured: the canvas model's, 0.4).
            Default ``0``.
    """

    first_window: float = 0.06
    window_scale: float = 9.7
    reuse_velocity: float | None = None
    guidance_exponent: float = 0.37
    min_factor: float = 0.1
    warmup: float = 0.0

    @classmethod
    def of(cls, profile: CacheProfile) -> FastCacheRule:
        """The rule a model's profile calibrated (library defaults for what it lacks)."""
        known = {name: value for name, value in profile.rule_constants.items() if name in cls.__dataclass_fields__}
        return cls(**known)

    def window(self, tolerance: float) -> float:
        """``h_tau``: a typical sample's window at ``tolerance`` (normalized time)."""
        return math.sqrt(max(tolerance, 0.0) / self.window_scale)


@dataclass(frozen=True)
class FastCacheParams:
    """FastCache's settings for one sample (the request's ``cache`` fields, as FastCache reads them).

    Args:
        tolerance: tau, the relative drift of a typical sample's forecast at the end of its window;
            sets the window. ``0`` computes every step.
        significance: alpha of the per-sample chi-square test.
        max_skip_steps: the most consecutive forecast steps between two real computes.
        tokens: token selection and merging of real computes, or ``None`` (every token computes).
        refresh_fraction: share of the image tokens refreshed at each forecast step (``0``: none; not
            combined with token selection or merging, which then win).
    """

    tolerance: float
    significance: float
    max_skip_steps: int
    tokens: TokenPlan | None
    refresh_fraction: float = 0.0


@dataclass
class FastCacheState:
    """One sample's refresh bookkeeping (progress = 1 - normalized time)."""

    target: float = 0.0
    """Progress at which the next real compute is due."""
    nearest: bool = False
    """Whether the next compute is the step nearest to ``target`` (else the last one at or before it)."""
    first_progress: float = 0.0
    """Progress at the first real compute."""
    warmup: float = 0.0
    """Progress below which every step computes (the rule's warm-up)."""
    seen_progress: float | None = None
    """Progress of the latest step seen (the next step's spacing is estimated from it)."""
    window: float | None = None
    """The sample's window once the test decided it (normalized time)."""
    drift_ratio: float | None = None
    """``r``: the sample's measured reuse drift relative to a typical sample's."""


@lru_cache(maxsize=4096)
def chi_square_quantile(probability: float, dof: int) -> float:
    """Quantile of the chi-square distribution with ``dof`` degrees of freedom (scipy, exact)."""
    if not 0.0 < probability < 1.0:
        raise ValueError("probability must be in (0, 1)")
    if dof < 1:
        raise ValueError("dof must be >= 1")
    from scipy.stats import chi2  # imported here: the API reads this module and loads no scipy

    return float(chi2.ppf(probability, dof))


def accepts_typical_drift(drift_ratio: float, significance: float, dof: int) -> bool:
    """The chi-square test: is a measured drift ``r`` times the typical one still noise of the typical
    scale? (``n r^2 <= chi2_{1-alpha}(n)`` over ``n = dof`` output numbers)."""
    return dof * drift_ratio * drift_ratio <= chi_square_quantile(1.0 - significance, dof)


def window_factor(drift_ratio: float, rule: FastCacheRule) -> float:
    """How much shorter a rejected sample's window is: ``r^-beta``, within ``[min_factor, 1]``."""
    if drift_ratio <= 0.0:
        return 1.0
    factor: float = drift_ratio ** (-rule.guidance_exponent)
    return max(rule.min_factor, min(1.0, factor))


def due(progress: float, previous: float | None, target: float, nearest: bool) -> bool:
    """Whether the step at ``progress`` is the one to compute for a window ending at ``target``: the
    step nearest to it (ties go to the later step), or the last step at or before it; the next step's
    progress is estimated from the spacing since ``previous``."""
    if progress >= target - _EPS:
        return True
    if previous is None or progress <= previous:
        return False
    upcoming = progress + (progress - previous)
    if nearest:
        return upcoming >= target and target - progress < upcoming - target
    return upcoming > target + _EPS


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
        "refresh_fraction",
    )
    summary = "FastCache: per-sample forecast, windows in sampler time, a chi-square test per sample"

    def params(self, resolved: RequestSettings) -> FastCacheParams:
        r = resolved
        spatial = r.motion_threshold > 0.0 or r.motion_fraction < 1.0 or r.merge_ratio > 0.0
        tokens = TokenPlan(r.motion_threshold, r.motion_fraction, r.merge_ratio, r.max_skip_steps) if spatial else None
        refresh = 0.0 if tokens is not None else r.refresh_fraction
        return FastCacheParams(r.tolerance, r.significance, r.max_skip_steps, tokens, refresh)

    def new_state(self, params: FastCacheParams) -> FastCacheState:
        return FastCacheState()

    def approximator(self, profile: CacheProfile) -> str:
        return "fitted forecast" if profile.fitted else "taylor order 1 (uncalibrated)"

    def mode(self, sample: SampleView, context: MethodContext, probe: float | None) -> str:
        state: FastCacheState = sample.method_state
        params: FastCacheParams = sample.method_params
        progress = 1.0 - sample.time
        previous, state.seen_progress = state.seen_progress, progress
        if params.tolerance <= 0.0 or sample.computes == 0:
            return COMPUTE
        if progress < state.warmup - _EPS or sample.step - sample.last_compute > params.max_skip_steps:
            return COMPUTE
        if due(progress, previous, state.target, state.nearest):
            return COMPUTE
        return REFRESH if params.refresh_fraction > 0.0 else FORECAST

    def refresh_fraction(self, sample: SampleView) -> float:
        params: FastCacheParams = sample.method_params
        return params.refresh_fraction

    def forecast_gain(self, sample: SampleView, context: MethodContext) -> float:
        return context.profile.gain(sample.phase)

    def token_plan(self, sample: SampleView) -> TokenPlan | None:
        params: FastCacheParams = sample.method_params
        return params.tokens

    def keeps_inputs(self, sample: SampleView) -> bool:
        return sample.method_params.tokens is not None  # token saliency compares with the last input

    def measures_forecast_error(self, sample: SampleView, context: MethodContext) -> bool:
        # the test runs once, at the second compute (``computes`` does not count this one yet)
        velocity = context.profile.rule_constants.get("reuse_velocity")
        return velocity is not None and sample.method_params.tolerance > 0.0 and sample.computes == 1

    def after_compute(
        self, sample: SampleView, context: MethodContext, forecast_error: float | None, dof: int, gap: int
    ) -> None:
        params: FastCacheParams = sample.method_params
        state: FastCacheState = sample.method_state
        rule = FastCacheRule.of(context.profile)
        progress = 1.0 - sample.time
        state.seen_progress = progress
        typical = rule.window(params.tolerance)
        if sample.computes == 1:
            state.first_progress, state.warmup = progress, rule.warmup
            state.target, state.nearest = progress + min(rule.first_window, typical), False
            return
        if state.window is None:
            state.window = typical
            elapsed = progress - state.first_progress
            if forecast_error is not None and rule.reuse_velocity and elapsed > 0.0:
                state.drift_ratio = forecast_error / (rule.reuse_velocity * elapsed)
                if not accepts_typical_drift(state.drift_ratio, params.significance, dof):
                    state.window = typical * window_factor(state.drift_ratio, rule)
                sample.stats.details["drift_ratio"] = state.drift_ratio
            sample.stats.details["window"] = state.window
        state.target, state.nearest = progress + state.window, True


FASTCACHE = register_method(FastCache())
