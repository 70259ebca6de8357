"""FastCache's refresh rule: tolerance sets the horizon, the chi-square guard shortens it per sample."""

import math

import pytest
import torch
from scipy.stats import chi2

from fastcache_core.methods.fastcache import (
    FIRST_WINDOW,
    FastCacheState,
    chi_square_quantile,
    drift_above_floor,
    fastcache_gap,
    max_accepted_error,
    settled_horizon,
)
from fastcache_core.methods.taylorseer import taylorseer_computes

DOF = 64 * 16
DRIFT = 0.004  # typical drift per squared step


def gap_after(error, horizon=4, computes=3, floor=0.0, allowance=0.064, gap=4, significance=0.05):
    state = FastCacheState()
    return fastcache_gap(state, computes, horizon, error, floor, allowance, significance, DOF, gap), state


@pytest.mark.parametrize("dof", [50, 2048, 100_000])
@pytest.mark.parametrize("p", [0.9, 0.95, 0.99])
def test_quantile_matches_scipy(dof, p):
    assert chi_square_quantile(p, dof) == pytest.approx(chi2.ppf(p, dof), rel=1e-9)


def test_accepted_error_is_tight_around_the_scale_not_vacuous():
    limit = max_accepted_error(0.01, 0.05, DOF)
    assert 0.01 < limit < 0.0108


def test_the_tolerance_sets_the_horizon_at_which_a_typical_drift_meets_it():
    assert settled_horizon(DRIFT * 16, DRIFT, max_skip_steps=8) == 4
    assert settled_horizon(DRIFT * 15.9, DRIFT, max_skip_steps=8) == 3
    assert settled_horizon(1.0, DRIFT, max_skip_steps=5) == 6  # bounded by max_skip_steps + 1
    assert settled_horizon(0.0, DRIFT, max_skip_steps=8) == 1  # tolerance 0 computes every step
    assert settled_horizon(0.5, None, max_skip_steps=8) == 2  # uncalibrated


def test_the_window_after_the_first_compute_is_short():
    assert fastcache_gap(FastCacheState(), 1, 6, None, 0.0, 0.1, 0.05, DOF, 1) == FIRST_WINDOW
    assert fastcache_gap(FastCacheState(), 1, 3, None, 0.0, 0.1, 0.05, DOF, 1) == 2


def test_a_typical_sample_keeps_the_settled_horizon():
    gap, state = gap_after(error=0.03)
    assert gap == 4 and state.rejections == 0


def test_a_sample_drifting_far_more_than_typical_refreshes_sooner():
    gap, state = gap_after(error=0.4)
    assert gap == 1 and state.rejections == 1
    gap, _ = gap_after(error=0.13)  # about twice the accepted drift: h * sqrt(1/2)
    assert gap == 2


def test_no_guard_means_the_settled_horizon_whatever_the_error():
    gap, state = gap_after(error=10.0, allowance=0.0)
    assert gap == 4 and state.rejections == 0


def test_the_noise_floor_is_subtracted_in_quadrature_before_testing():
    assert drift_above_floor(0.05, 0.03) == pytest.approx(0.04)
    assert drift_above_floor(0.02, 0.03) == 0.0
    assert gap_after(error=0.1, floor=0.09)[0] == 4  # mostly floor: accepted
    assert gap_after(error=0.1, floor=0.0)[0] < 4


def test_a_shorter_gap_is_held_to_a_proportionally_smaller_drift():
    # drift grows like gap^2: at half the horizon a typical sample drifts a quarter as much
    assert gap_after(error=0.03, gap=2)[0] == 2
    assert gap_after(error=0.012, gap=2)[0] == 4


def test_drift_exactly_at_the_scale_is_accepted_about_one_minus_alpha_of_the_time():
    scale, alpha, accepted = 0.064, 0.2, 0
    for seed in range(200):
        noise = torch.randn(DOF, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        error = scale * float(noise.norm()) / math.sqrt(DOF)
        accepted += gap_after(error=error, allowance=scale, significance=alpha)[0] == 4
    assert 0.65 <= accepted / 200 <= 0.95


def test_taylorseer_schedule_is_diffusers_schedule():
    # diffusers: compute while step < warmup, then when (step - warmup - 1) % interval == 0
    computed = [s for s in range(14) if taylorseer_computes(s, 3, 3)]
    assert computed == [0, 1, 2, 4, 7, 10, 13]
