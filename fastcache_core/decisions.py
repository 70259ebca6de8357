"""The reuse rules: FastCache's chi-square test with its error guards, and the peers' thresholds.

FastCache's rule for block ``l`` of sample ``b`` at step ``t``: let ``H`` be the block's input over
the ``n`` tokens it processes (``n * d`` numbers) and ``H_c`` the same block's input at the step
``t_c`` where it was last computed. The relative change is

    delta = ||H - H_c||_F / ||H_c||_F.

Null hypothesis: the change is noise of relative scale ``tau``, i.e. each of the ``n*d`` entries of
``H - H_c`` is N(0, (tau * ||H_c||_F)^2 / (n*d)). Then ``n*d*delta^2/tau^2 ~ chi2(n*d)`` and the block
is reused when the test accepts at significance ``alpha``:

    n*d * delta^2 / tau^2 <= chi2_{1-alpha}(n*d).

For large ``n*d`` the right side is ~``n*d*(1 + z_{1-alpha} sqrt(2/(n*d)))``, so the rule reuses a block
when delta is below ~tau and recomputes when it is above: it discriminates (unlike a bound that
accepts any change below 100%). Guards force a compute when the change accumulated over consecutive
reuses passes ``accumulation_limit * tau`` or when ``max_skip_steps`` consecutive reuses are reached.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from statistics import NormalDist


@lru_cache(maxsize=4096)
def chi_square_quantile(probability: float, dof: int) -> float:
    """Quantile of the chi-square distribution with ``dof`` degrees of freedom (Wilson-Hilferty).

    Relative error is below 1e-3 for ``dof >= 30``; the rule always has ``dof = tokens * width``,
    which is in the thousands.
    """
    if not 0.0 < probability < 1.0:
        raise ValueError("probability must be in (0, 1)")
    if dof < 1:
        raise ValueError("dof must be >= 1")
    z = NormalDist().inv_cdf(probability)
    h = 2.0 / (9.0 * dof)
    return dof * max(1.0 - h + z * math.sqrt(h), 0.0) ** 3


def max_reusable_change(tolerance: float, significance: float, dof: int) -> float:
    """The largest relative change ``delta`` the chi-square test accepts as noise of scale ``tolerance``."""
    if tolerance <= 0.0:
        return -1.0  # nothing is accepted: even delta == 0 recomputes
    return tolerance * math.sqrt(chi_square_quantile(1.0 - significance, dof) / dof)


@dataclass
class BlockReuseState:
    """What the guards know about one block of one sample: reuses since the last real compute."""

    consecutive_reuses: int = 0
    accumulated_change: float = 0.0
    computed_once: bool = False

    def record_compute(self) -> None:
        self.consecutive_reuses = 0
        self.accumulated_change = 0.0
        self.computed_once = True

    def record_reuse(self, delta: float) -> None:
        self.consecutive_reuses += 1
        self.accumulated_change += delta


def fastcache_reuses_block(
    delta: float,
    tolerance: float,
    significance: float,
    dof: int,
    state: BlockReuseState,
    max_skip_steps: int,
    accumulation_limit: float,
) -> bool:
    """FastCache's decision for one block of one sample: ``True`` to reuse (approximate) it.

    ``tolerance`` is the block's effective tau (the request's tolerance times the block's calibrated
    scale). Reuse needs a cached computation, the chi-square test to accept, and both guards to hold.
    """
    if not state.computed_once or tolerance <= 0.0:
        return False
    if state.consecutive_reuses >= max_skip_steps:
        return False
    if state.accumulated_change + delta > accumulation_limit * tolerance:
        return False
    return delta <= max_reusable_change(tolerance, significance, dof)


def teacache_reuses_stack(accumulated: float, threshold: float) -> bool:
    """TeaCache (Liu et al., 2024): reuse the whole stack while the accumulated, polynomially rescaled
    relative L1 change of the timestep-modulated input stays below ``threshold``."""
    return threshold > 0.0 and accumulated < threshold


def fbcache_reuses_tail(first_block_residual_change: float, threshold: float) -> bool:
    """First-Block-Cache: reuse blocks 1..L-1 while the relative L1 change of block 0's residual is
    below ``threshold``."""
    return threshold > 0.0 and first_block_residual_change < threshold
