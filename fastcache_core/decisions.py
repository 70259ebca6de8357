"""The refresh rules: at which steps a sample's transformer really runs, and when it is forecast.

**FastCache** (per sample). Between real computes a sample's stack output is forecast from its own
history (``forecast.py``); a first-order forecast drifts from the truth like ``c h^2`` over a horizon
of ``h`` steps. Calibration measures the typical drift of every schedule phase (``CacheProfile``), so
the request's tolerance ``tau`` sets the horizon a typical sample keeps:

    H = floor(sqrt(tau / drift_scale))

Measured on the bundled model, *when* to refresh matters more than anything else: gaps of equal length
from the second step on, with a short first window (the output can only be reused until the second
compute gives a slope), beat every density profile tried (denser early, denser late, input-change
gates, error-equalizing controllers).

At every real compute the forecast that *would* have been used is compared with the real output in the
transformer's output space (what the sampler integrates): ``e = ||P (Y_hat - Y)|| / ||P Y||``. Part of
``e`` is the model's per-step noise floor ``f`` (a one-step forecast's error on uncached runs: timestep-
embedding jitter that cancels over steps instead of accumulating); the drift is ``d = sqrt(max(e^2 -
f^2, 0))``. FastCache's chi-square test then guards each sample. Null hypothesis: the drift is noise of
the relative scale a typical sample shows at this phase and gap, ``s = slack * tau * w_phase *
(gap / H)^2``; each of the ``n`` output numbers of the difference is N(0, (s ||P Y||)^2 / n), so
``n d^2 / s^2 ~ chi2(n)`` and the test accepts at significance ``alpha`` when

    n d^2 / s^2 <= chi2_{1-alpha}(n).

A sample whose drift fails the test refreshes sooner, by the first-order law ``h = H sqrt(limit / d)``
(``limit``: the largest drift the test accepts). Every decision uses the sample's own numbers only.

**Peers** decided per sample inside the same cache: TaylorSeer (fixed interval), TeaCache
(accumulated rescaled input change), First-Block-Cache (first block's residual change).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from statistics import NormalDist

FIRST_WINDOW = 3
"""The longest forecast window after a sample's first compute (a zero-order reuse window; measured
best on the bundled model for every settled horizon from 3 to 6)."""


@lru_cache(maxsize=4096)
def chi_square_quantile(probability: float, dof: int) -> float:
    """Quantile of the chi-square distribution with ``dof`` degrees of freedom (Wilson-Hilferty).

    Relative error is below 1e-3 for ``dof >= 30``; the rule's ``dof`` is the number of output numbers
    of a sample, which is in the thousands.
    """
    if not 0.0 < probability < 1.0:
        raise ValueError("probability must be in (0, 1)")
    if dof < 1:
        raise ValueError("dof must be >= 1")
    z = NormalDist().inv_cdf(probability)
    h = 2.0 / (9.0 * dof)
    return dof * max(1.0 - h + z * math.sqrt(h), 0.0) ** 3


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


@dataclass
class RefreshState:
    """One sample's refresh bookkeeping for the forecasting methods (FastCache, TaylorSeer)."""

    next_compute: int = 0
    """Step index of the next real compute."""
    computes: int = 0
    """Real computes so far (a forecast needs one; a first-order forecast two)."""
    last_compute: int = -1
    """Step index of the last real compute."""
    last_error: float | None = None
    """Relative forecast error measured at the last real compute (``None`` before there was one)."""
    rejections: int = 0
    """How often the chi-square guard shortened this sample's horizon."""


def fastcache_gap(
    state: RefreshState,
    horizon: int,
    error: float | None,
    floor: float,
    allowance: float,
    significance: float,
    dof: int,
    gap: int,
) -> int:
    """FastCache's rule: steps from this real compute to the next one.

    ``state.computes`` counts this compute already. ``horizon`` is the settled ``H``; ``error`` the
    relative forecast error measured at this compute (``None`` before two earlier computes existed),
    ``floor`` the phase's noise floor, ``allowance`` the typical drift scale at horizon ``H`` for this
    phase (``slack * tau * w_phase``; ``<= 0`` switches the guard off) and ``gap`` the steps since the
    previous compute.
    """
    if state.computes <= 1:  # the next window can only reuse the output: keep it short
        return max(1, min(FIRST_WINDOW, horizon - 1))
    if error is None or allowance <= 0.0:
        return horizon
    limit = max_accepted_error(allowance * (gap / horizon) ** 2, significance, dof)
    drift = drift_above_floor(error, floor)
    if drift <= limit:
        return horizon
    state.rejections += 1
    return max(1, min(horizon, math.floor(horizon * math.sqrt(limit / drift))))


def taylorseer_computes(step: int, warmup_steps: int, interval: int) -> bool:
    """TaylorSeer (Liu et al., 2025), as diffusers schedules it: compute the first ``warmup_steps``
    steps, then step ``warmup_steps + 1`` and every ``interval``-th step after it."""
    return step < warmup_steps or (step - warmup_steps - 1) % max(1, interval) == 0


def teacache_rescaled_change(coefficients: Sequence[float], relative_change: float) -> float:
    """TeaCache's rescaling of a relative input change into an estimated output change: the calibrated
    polynomial (highest power first, numpy.polyfit order), floored at 0."""
    value = 0.0
    for c in coefficients:
        value = value * relative_change + c
    return max(0.0, value)


def teacache_reuses_stack(accumulated: float, threshold: float) -> bool:
    """TeaCache (Liu et al., 2024): reuse the whole stack while the accumulated, polynomially rescaled
    relative L1 change of the timestep-modulated input stays below ``threshold``."""
    return threshold > 0.0 and accumulated < threshold


def fbcache_reuses_tail(first_block_residual_change: float, threshold: float) -> bool:
    """First-Block-Cache: reuse blocks 1..L-1 while the relative L1 change of block 0's residual is
    below ``threshold``."""
    return threshold > 0.0 and first_block_residual_change < threshold
