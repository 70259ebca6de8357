"""FastCache's refresh rule: the chi-square test on forecast drift sets each sample's next horizon."""

import math

import pytest
from scipy.stats import chi2

from fastcache_core.decisions import (
    chi_square_quantile,
    drift_above_floor,
    fastcache_next_horizon,
    max_accepted_error,
    taylorseer_computes,
)

DOF = 64 * 16


def horizon(error, tolerance=0.01, floor=0.0, gap=2, max_skip=8, growth=2.0, min_horizon=1, significance=0.05):
    return fastcache_next_horizon(error, floor, tolerance, significance, DOF, gap, max_skip, growth, min_horizon)


@pytest.mark.parametrize("dof", [50, 2048, 100_000])
@pytest.mark.parametrize("p", [0.9, 0.95, 0.99])
def test_quantile_matches_scipy(dof, p):
    assert chi_square_quantile(p, dof) == pytest.approx(chi2.ppf(p, dof), rel=2e-3)


def test_accepted_error_is_tight_around_the_tolerance_not_vacuous():
    limit = max_accepted_error(0.01, 0.05, DOF)
    assert 0.01 < limit < 0.0108


def test_a_small_drift_lets_the_horizon_grow_by_at_most_the_growth_limit():
    assert horizon(0.001, gap=2) == 4
    assert horizon(0.001, gap=2, growth=1.5) == 3


def test_a_drift_above_the_tolerance_shortens_the_horizon():
    assert horizon(0.04, gap=4) == 2  # drift 4x the limit: gap * sqrt(1/4)


def test_the_horizon_is_bounded_by_max_skip_steps():
    assert horizon(0.0, gap=8, max_skip=3) == 4


def test_the_noise_floor_is_subtracted_in_quadrature_before_testing():
    assert drift_above_floor(0.05, 0.03) == pytest.approx(0.04)
    assert drift_above_floor(0.02, 0.03) == 0.0
    # an error at the floor is pure per-step noise: accepted even with a tiny tolerance
    assert horizon(0.03, tolerance=0.001, floor=0.03, gap=2) == 4
    assert horizon(0.03, tolerance=0.001, floor=0.0, gap=2) == 1


def test_zero_tolerance_always_computes_the_next_step():
    assert horizon(0.0, tolerance=0.0, gap=4) == 1


def test_a_rejection_never_asks_for_less_than_the_shortest_horizon():
    assert horizon(1.0, gap=4, min_horizon=2) == 2
    assert horizon(1.0, gap=4, min_horizon=1) == 1


def test_noise_exactly_at_tolerance_is_accepted_about_one_minus_alpha_of_the_time():
    import torch

    tolerance, alpha, accepted = 0.01, 0.2, 0
    for seed in range(200):
        noise = torch.randn(DOF, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        error = tolerance * float(noise.norm()) / math.sqrt(DOF)  # relative error of noise of scale tau
        accepted += horizon(error, tolerance=tolerance, gap=2, significance=alpha) >= 2
    assert 0.65 <= accepted / 200 <= 0.95


def test_taylorseer_schedule_is_diffusers_schedule():
    # diffusers: compute while step < warmup, then when (step - warmup - 1) % interval == 0
    computed = [s for s in range(14) if taylorseer_computes(s, 3, 3)]
    assert computed == [0, 1, 2, 4, 7, 10, 13]
