"""FastCache adapts per sample: windows in the sampler's normalized time, shorter for a sample whose
measured drift exceeds a typical one's (higher guidance), decided from its own numbers only."""

import pytest

from fastcache_core import DEFAULT_PARAMS, CacheParams, FastCacheConfig, apply_fastcache
from fastcache_core.profile import CacheProfile
from tests.dit_loop import DiTSample, denoise


def computes_of(stats, blocks: int) -> int:
    return stats.blocks_computed // blocks


def test_the_same_tolerance_refreshes_at_the_same_sampler_times_at_any_step_count(tiny_dit):
    blocks = len(tiny_dit.transformer.transformer_blocks)
    profile = CacheProfile(metadata={"fastcache_rule": {"window_scale": 10.0, "first_window": 0.1}})
    cache = apply_fastcache(tiny_dit.transformer, FastCacheConfig(calibration=profile))
    params = CacheParams(tolerance=0.4, max_skip_steps=100)  # a window of 0.2 of the run
    try:
        (_,), (ten,) = denoise(tiny_dit, cache, [DiTSample(1, 5, params)], 10)
        (_,), (forty,) = denoise(tiny_dit, cache, [DiTSample(1, 5, params)], 40)
    finally:
        cache.remove()
    assert computes_of(ten, blocks) == computes_of(forty, blocks) == 6  # 0, 0.1, then every 0.2 to the end
    assert forty.mac_fraction == pytest.approx(ten.mac_fraction / 4, rel=0.05)


def test_a_sample_at_higher_guidance_measures_more_drift_and_keeps_a_shorter_window(tiny_dit):
    probe = CacheProfile(metadata={"fastcache_rule": {"window_scale": 10.0, "reuse_velocity": 1.0}})
    params = CacheParams(tolerance=0.4, max_skip_steps=100)
    samples = [DiTSample(3, 7, params, guidance=2.0), DiTSample(3, 7, params, guidance=6.0)]
    cache = apply_fastcache(tiny_dit.transformer, FastCacheConfig(calibration=probe))
    try:
        _, (low, high) = denoise(tiny_dit, cache, samples, 20)
    finally:
        cache.remove()
    assert high.details["drift_ratio"] > low.details["drift_ratio"]
    # a typical velocity at guidance 2: that sample is typical, the guidance-6 one is not
    typical = low.details["drift_ratio"] * 1.0
    profile = CacheProfile(metadata={"fastcache_rule": {"window_scale": 10.0, "reuse_velocity": typical}})
    cache = apply_fastcache(tiny_dit.transformer, FastCacheConfig(calibration=profile))
    try:
        _, (low, high) = denoise(tiny_dit, cache, samples, 20)
    finally:
        cache.remove()
    assert low.details["window"] == pytest.approx(0.2)
    assert high.details["window"] < 0.2 and high.blocks_computed > low.blocks_computed


def test_without_a_measured_velocity_there_is_no_test_and_no_measurement(tiny_dit):
    profile = CacheProfile(metadata={"fastcache_rule": {"window_scale": 10.0}})
    cache = apply_fastcache(tiny_dit.transformer, FastCacheConfig(calibration=profile))
    try:
        _, (stats,) = denoise(tiny_dit, cache, [DiTSample(3, 7, CacheParams(tolerance=0.4), guidance=6.0)], 12)
    finally:
        cache.remove()
    assert "drift_ratio" not in stats.details and stats.details["window"] == pytest.approx(0.2)


def test_the_models_calibrated_defaults_apply_only_to_its_default_method(tiny_dit):
    profile = CacheProfile(metadata={"default_params": {"method": "fastcache", "tolerance": 0.3}})
    cache = apply_fastcache(tiny_dit.transformer, FastCacheConfig(calibration=profile))
    try:
        cache.add_sample("fast", CacheParams())
        cache.add_sample("tea", CacheParams(method="teacache"))
        assert cache.sample_stats("fast").params["tolerance"] == 0.3
        assert cache.sample_stats("tea").params["tolerance"] == DEFAULT_PARAMS.tolerance
    finally:
        cache.remove()
