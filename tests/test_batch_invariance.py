"""A sample's image does not depend on which other samples share its batch, or when it joined."""

import pytest
import torch

from fastcache_core import CacheParams, FastCacheConfig, apply_fastcache
from tests.dit_loop import DiTSample, denoise

STEPS = 12
MIXED = [
    DiTSample(label=1, seed=11, params=CacheParams(tolerance=0.0)),
    DiTSample(label=4, seed=12, params=CacheParams(tolerance=0.6)),
    DiTSample(label=7, seed=13, params=CacheParams(tolerance=1.0, significance=0.2), guidance=3.0),
    DiTSample(label=9, seed=14, params=CacheParams(tolerance=0.8, motion_fraction=0.5, merge_ratio=0.2)),
    DiTSample(label=2, seed=15, params=CacheParams(method="taylorseer", tolerance=1.0, max_skip_steps=2)),
    DiTSample(label=3, seed=16, params=CacheParams(method="teacache", tolerance=0.5)),
    DiTSample(label=5, seed=17, params=CacheParams(method="fbcache", tolerance=0.5)),
    DiTSample(label=6, seed=18, params=CacheParams(tolerance=0.8, refresh_fraction=0.25), guidance=3.0),
    DiTSample(label=8, seed=19, params=CacheParams(tolerance=0.5, refresh_fraction=0.5)),
]
"""Every per-sample method, with and without token selection and token refresh, in one batch."""


def test_each_sample_in_a_mixed_batch_equals_its_solo_run(tiny_dit):
    cache = apply_fastcache(tiny_dit.transformer, FastCacheConfig())
    try:
        batched, batched_stats = denoise(tiny_dit, cache, MIXED, STEPS)
        for sample, image, stats in zip(MIXED, batched, batched_stats, strict=True):
            (solo,), (solo_stats,) = denoise(tiny_dit, cache, [sample], STEPS)
            torch.testing.assert_close(image, solo, rtol=1e-4, atol=1e-5)
            assert stats.blocks_approximated == solo_stats.blocks_approximated
            assert stats.tokens_computed == solo_stats.tokens_computed
    finally:
        cache.remove()
    # the settings really differ in effect: the batch was not trivially uncached
    approximated = [s.blocks_approximated for s in batched_stats]
    assert approximated[0] == 0 and max(approximated) > 0 and len(set(approximated)) > 1


def test_batch_invariance_holds_with_a_calibrated_profile_and_the_per_sample_test_on(tiny_dit):
    from fastcache_core.calibration import calibrate

    profile, _ = calibrate(
        tiny_dit,
        num_samples=8,
        batch_size=4,
        num_inference_steps=STEPS,
        guidance_scale=2.0,
        num_phases=4,
        max_gap=3,
        tune_defaults=False,
        save_to=False,
        progress=False,
    )
    # a small typical velocity: the test measures every FastCache sample and shortens windows per sample
    profile.metadata["fastcache_rule"] = {**profile.rule_constants, "reuse_velocity": 0.05}
    cache = apply_fastcache(tiny_dit.transformer, FastCacheConfig(calibration=profile))
    try:
        batched, stats = denoise(tiny_dit, cache, MIXED, STEPS)
        for sample, image, batched_stats in zip(MIXED, batched, stats, strict=True):
            (solo,), (solo_stats,) = denoise(tiny_dit, cache, [sample], STEPS)
            torch.testing.assert_close(image, solo, rtol=1e-4, atol=1e-5)
            assert batched_stats.details == pytest.approx(solo_stats.details, rel=1e-5)
    finally:
        cache.remove()
    measured = [s.details for s in stats if s.method == "fastcache" and "drift_ratio" in s.details]
    assert len(measured) >= 2 and len({d["window"] for d in measured}) > 1, measured
    assert stats[1].approximator == "fitted forecast" and max(s.blocks_approximated for s in stats) > 0


def test_a_sample_joining_mid_run_equals_its_solo_run(tiny_dit):
    late = DiTSample(label=5, seed=21, params=CacheParams(tolerance=0.8), start=5)
    early = DiTSample(label=2, seed=22, params=CacheParams(tolerance=0.5))
    cache = apply_fastcache(tiny_dit.transformer, FastCacheConfig())
    try:
        (early_image, late_image), _ = denoise(tiny_dit, cache, [early, late], STEPS)
        (late_solo,), _ = denoise(tiny_dit, cache, [DiTSample(5, 21, CacheParams(tolerance=0.8))], STEPS)
        (early_solo,), _ = denoise(tiny_dit, cache, [early], STEPS)
    finally:
        cache.remove()
    torch.testing.assert_close(late_image, late_solo, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(early_image, early_solo, rtol=1e-4, atol=1e-5)


def test_a_leaving_sample_frees_its_cache_slots(tiny_dit):
    cache = apply_fastcache(tiny_dit.transformer, FastCacheConfig())
    try:
        denoise(tiny_dit, cache, MIXED, 3)
        assert cache._rows == {} and cache._samples == {}
    finally:
        cache.remove()
