"""FastCache's reuse rule: the chi-square test discriminates around the tolerance; guards force computes."""

import math

import pytest
import torch
from scipy.stats import chi2

from fastcache_core.decisions import (
    BlockReuseState,
    chi_square_quantile,
    fastcache_reuses_block,
    max_reusable_change,
)

TOKENS, WIDTH = 64, 32
DOF = TOKENS * WIDTH


def relative_change_of_noisy_copy(relative_scale: float, seed: int = 0) -> float:
    """A synthetic step: H = H_c + noise with known relative scale; returns the measured delta."""
    gen = torch.Generator().manual_seed(seed)
    cached = torch.randn(TOKENS, WIDTH, generator=gen, dtype=torch.float64)
    noise = torch.randn(TOKENS, WIDTH, generator=gen, dtype=torch.float64)
    current = cached + noise * relative_scale * cached.norm() / math.sqrt(cached.numel())
    return float((current - cached).norm() / cached.norm())


def computed_state() -> BlockReuseState:
    state = BlockReuseState()
    state.record_compute()
    return state


@pytest.mark.parametrize("dof", [50, 2048, 100_000])
@pytest.mark.parametrize("p", [0.9, 0.95, 0.99])
def test_quantile_matches_scipy(dof, p):
    assert chi_square_quantile(p, dof) == pytest.approx(chi2.ppf(p, dof), rel=2e-3)


def test_reuses_when_true_change_is_below_tolerance():
    tolerance = 0.1
    for seed in range(5):
        delta = relative_change_of_noisy_copy(0.5 * tolerance, seed)
        assert fastcache_reuses_block(delta, tolerance, 0.05, DOF, computed_state(), 4, 3.0)


def test_computes_when_true_change_is_above_tolerance():
    tolerance = 0.1
    for seed in range(5):
        delta = relative_change_of_noisy_copy(1.5 * tolerance, seed)
        assert not fastcache_reuses_block(delta, tolerance, 0.05, DOF, computed_state(), 4, 3.0)


def test_noise_exactly_at_tolerance_is_accepted_about_one_minus_alpha_of_the_time():
    tolerance, alpha = 0.1, 0.2
    accepted = sum(
        fastcache_reuses_block(relative_change_of_noisy_copy(tolerance, seed), tolerance, alpha, DOF,
                               computed_state(), 4, 100.0)
        for seed in range(200)
    )
    assert 0.65 <= accepted / 200 <= 0.95


def test_bound_is_tight_not_vacuous():
    # the accepted change is within a few percent of tau for realistic dof, far below 100%
    bound = max_reusable_change(0.1, 0.05, DOF)
    assert 0.1 < bound < 0.11


def test_zero_tolerance_never_reuses():
    assert not fastcache_reuses_block(0.0, 0.0, 0.05, DOF, computed_state(), 4, 3.0)


def test_never_reuses_before_a_first_compute():
    assert not fastcache_reuses_block(0.0, 0.1, 0.05, DOF, BlockReuseState(), 4, 3.0)


def test_max_consecutive_reuses_forces_a_compute():
    state = computed_state()
    decisions = []
    for _ in range(6):
        reuse = fastcache_reuses_block(0.001, 0.1, 0.05, DOF, state, 3, 100.0)
        decisions.append(reuse)
        state.record_reuse(0.001) if reuse else state.record_compute()
    assert decisions == [True, True, True, False, True, True]


def test_accumulated_change_forces_a_compute():
    # each step's change passes the test alone, but three of them pass the accumulation bound
    state = computed_state()
    decisions = []
    for _ in range(4):
        reuse = fastcache_reuses_block(0.09, 0.1, 0.05, DOF, state, 10, 2.0)
        decisions.append(reuse)
        state.record_reuse(0.09) if reuse else state.record_compute()
    assert decisions == [True, True, False, True]
