"""The refresh rules: at which steps a sample's transformer really runs, and when it is forecast.

**FastCache** (per sample). Between real computes a sample's stack output is forecast from its own
history (``forecast.py``). At every real compute the forecast that *would* have been used is compared
with the real output, in the transformer's output space (what the sampler integrates):

    e = ||P (Y_hat - Y)|| / ||P Y||      (P: the model's output projection)

Part of that error is the model's per-step noise floor ``f`` (calibrated per schedule phase: the error
of a one-step forecast on uncached runs; it comes from timestep-embedding jitter that cancels over
steps instead of accumulating). What accumulates is the drift ``d = sqrt(max(e^2 - f^2, 0))``. Null
hypothesis: the drift is noise of relative scale ``tau`` (the request's tolerance times the phase's
calibrated weight), i.e. each of the ``n`` output numbers of the difference is N(0, (tau ||P Y||)^2 / n),
so ``n d^2 / tau^2 ~ chi2(n)``. The test accepts at significance ``alpha`` when

    n d^2 / tau^2 <= chi2_{1-alpha}(n).

A first-order forecast's drift grows with the square of the horizon, so the next horizon is the
current gap scaled by ``sqrt(limit / d)`` (``limit``: the largest drift the test accepts): it grows
(at most by ``growth``) when the test accepts and shrinks when it rejects, bounded by
``max_skip_steps`` forecast steps in a row. Every decision uses the sample's own numbers only.

**Peers** decided per sample inside the same cache: TaylorSeer (fixed interval), TeaCache
(accumulated rescaled input change), First-Block-Cache (first block's residual change).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from statistics import NormalDist


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


def max_accepted_error(tolerance: float, significance: float, dof: int) -> float:
    """The largest relative error the chi-square test accepts as noise of scale ``tolerance``."""
    if tolerance <= 0.0:
        return -1.0  # nothing is accepted: even an exact forecast recomputes
    return tolerance * math.sqrt(chi_square_quantile(1.0 - significance, dof) / dof)


def drift_above_floor(error: float, floor: float) -> float:
    """The part of a forecast error above the per-step noise floor (they add in quadrature)."""
    return math.sqrt(max(error * error - floor * floor, 0.0))


@dataclass
class RefreshState:
    """One sample's refresh bookkeeping for the forecasting methods (FastCache, TaylorSeer)."""

    next_compute: int = 0
    """Step index of the next real compute."""
    computes: int = 0
    """Real computes so far (a forecast needs at least one, a first-order one two)."""
    last_compute: int = -1
    """Step index of the last real compute."""
    last_error: float | None = None
    """Relative forecast error measured at the last real compute (``None`` before there was one)."""


def fastcache_next_horizon(
    error: float,
    floor: float,
    tolerance: float,
    significance: float,
    dof: int,
    gap: int,
    max_skip_steps: int,
    growth: float,
    min_horizon: int = 1,
) -> int:
    """FastCache's rule: steps until the next real compute, from the error measured at this one.

    ``error`` is the relative forecast error at this compute, ``floor`` the calibrated per-step noise
    floor, ``tolerance`` the effective tau (request tolerance times phase weight), ``gap`` the steps
    since the previous compute. ``min_horizon`` (calibrated) keeps a rejection from asking for
    back-to-back computes when the measurement is dominated by the noise floor. Returns a horizon
    in ``[min(min_horizon, max_skip_steps + 1), max_skip_steps + 1]``.
    """
    longest = max_skip_steps + 1
    shortest = min(max(1, min_horizon), longest)
    limit = max_accepted_error(tolerance, significance, dof)
    if limit <= 0.0:
        return 1
    drift = drift_above_floor(error, floor)
    ratio = math.sqrt(limit / drift) if drift > 0.0 else math.inf
    if drift <= limit:  # accepted: the forecast may reach further
        horizon = max(gap, math.floor(gap * min(growth, ratio)))
    else:  # rejected: compute sooner
        horizon = math.floor(gap * ratio)
    return max(shortest, min(longest, horizon))


def taylorseer_computes(step: int, warmup_steps: int, interval: int) -> bool:
    """TaylorSeer (Liu et al., 2025), as diffusers schedules it: compute the first ``warmup_steps``
    steps, then step ``warmup_steps + 1`` and every ``interval``-th step after it."""
    return step < warmup_steps or (step - warmup_steps - 1) % max(1, interval) == 0


def teacache_reuses_stack(accumulated: float, threshold: float) -> bool:
    """TeaCache (Liu et al., 2024): reuse the whole stack while the accumulated, polynomially rescaled
    relative L1 change of the timestep-modulated input stays below ``threshold``."""
    return threshold > 0.0 and accumulated < threshold


def fbcache_reuses_tail(first_block_residual_change: float, threshold: float) -> bool:
    """First-Block-Cache: reuse blocks 1..L-1 while the relative L1 change of block 0's residual is
    below ``threshold``."""
    return threshold > 0.0 and first_block_residual_change < threshold
