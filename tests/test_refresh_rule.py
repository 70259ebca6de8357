"""FastCache's refresh rule: windows in the sampler's normalized time, one chi-square test per sample."""

import math

import pytest
import torch
from scipy.stats import chi2

from fastcache_core.methods.fastcache import (
    FastCacheRule,
    accepts_typical_drift,
    chi_square_quantile,
    due,
    window_factor,
)
from fastcache_core.methods.taylorseer import taylorseer_computes
from fastcache_core.profile import CacheProfile

DOF = 64 * 32


@pytest.mark.parametrize("dof", [50, 2048, 100_000])
@pytest.mark.parametrize("p", [0.9, 0.95, 0.99])
def test_quantile_is_scipys(dof, p):
    assert chi_square_quantile(p, dof) == pytest.approx(chi2.ppf(p, dof), rel=1e-9)


def test_the_tolerance_sets_a_window_in_normalized_time():
    rule = FastCacheRule(window_scale=10.0)
    assert rule.window(0.1) == pytest.approx(0.1)
    assert rule.window(0.4) == pytest.approx(0.2)  # four times the drift: twice the window
    assert rule.window(0.0) == 0.0


def test_an_old_profile_derives_its_window_scale_from_its_drift_per_step():
    profile = CacheProfile(metadata={"drift_scale": 0.004, "num_inference_steps": 50})
    assert FastCacheRule.of(profile).window_scale == pytest.approx(0.004 * 50**2)
    assert FastCacheRule.of(profile).reuse_velocity is None  # no measured velocity: no test


def test_the_step_nearest_the_end_of_the_window_computes():
    # uniform spacing 0.02: a window ending at 0.15 is nearest to 0.14 (not 0.16)
    assert not due(0.12, 0.10, 0.15, nearest=True)
    assert due(0.14, 0.12, 0.15, nearest=True)
    # a tie goes to the later step: a window ending at 0.13 computes at 0.14, not 0.12
    assert not due(0.12, 0.10, 0.13, nearest=True)


def test_the_first_window_ends_at_the_last_step_before_it():
    assert not due(0.04, 0.02, 0.08, nearest=False)
    assert not due(0.06, 0.04, 0.09, nearest=False)  # 0.08 is still inside the window
    assert due(0.08, 0.06, 0.09, nearest=False)  # 0.10 would overshoot
    assert due(0.08, 0.06, 0.08, nearest=False)


def test_a_sample_drifting_like_a_typical_one_is_accepted_about_one_minus_alpha_of_the_time():
    alpha, accepted = 0.2, 0
    for seed in range(200):
        noise = torch.randn(DOF, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        ratio = float(noise.norm()) / math.sqrt(DOF)  # measured drift / typical drift
        accepted += accepts_typical_drift(ratio, alpha, DOF)
    assert 0.65 <= accepted / 200 <= 0.95


def test_the_test_is_tight_around_the_typical_drift_not_vacuous():
    assert accepts_typical_drift(1.0, 0.05, DOF)
    assert not accepts_typical_drift(1.1, 0.05, DOF)


def test_a_sample_drifting_more_keeps_a_shorter_window_within_bounds():
    rule = FastCacheRule(guidance_exponent=0.5, min_factor=0.25)
    assert window_factor(4.0, rule) == pytest.approx(0.5)
    assert window_factor(1000.0, rule) == 0.25
    assert window_factor(0.5, rule) == 1.0  # never longer than a typical sample's


def test_taylorseer_schedule_is_diffusers_schedule():
    # diffusers: compute while step < warmup, then when (step - warmup - 1) % interval == 0
    computed = [s for s in range(14) if taylorseer_computes(s, 3, 3)]
    assert computed == [0, 1, 2, 4, 7, 10, 13]
