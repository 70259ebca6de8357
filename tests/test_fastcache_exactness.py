"""With caching off the model is unchanged, and removing the cache restores it exactly."""

import torch

from fastcache_core import CacheParams, FastCacheConfig, apply_fastcache


def generate(pipe, labels=(1, 2), steps=8, seed=0):
    return pipe(
        list(labels),
        guidance_scale=2.0,
        num_inference_steps=steps,
        generator=torch.Generator().manual_seed(seed),
        output_type="pt",
    ).images


def test_zero_tolerance_equals_unpatched_model(tiny_dit):
    reference = generate(tiny_dit)
    cache = apply_fastcache(tiny_dit.transformer, FastCacheConfig(params=CacheParams(tolerance=0.0)))
    try:
        images = generate(tiny_dit)
        stats = cache.stats()
    finally:
        cache.remove()
    torch.testing.assert_close(images, reference, rtol=1e-5, atol=1e-6)
    assert [s.blocks_approximated for s in stats] == [0, 0]
    assert all(s.blocks_computed == 8 * 3 for s in stats)


def test_disabled_cache_equals_unpatched_model(tiny_dit):
    reference = generate(tiny_dit)
    cache = apply_fastcache(tiny_dit.transformer, FastCacheConfig(enabled=False, params=CacheParams(tolerance=1.0)))
    try:
        images = generate(tiny_dit)
    finally:
        cache.remove()
    torch.testing.assert_close(images, reference, rtol=1e-5, atol=1e-6)


def test_method_none_equals_unpatched_model(tiny_dit):
    reference = generate(tiny_dit)
    cache = apply_fastcache(tiny_dit.transformer, FastCacheConfig(params=CacheParams(method="none")))
    try:
        images = generate(tiny_dit)
    finally:
        cache.remove()
    torch.testing.assert_close(images, reference, rtol=1e-5, atol=1e-6)


def test_remove_restores_the_original_forward(tiny_dit):
    transformer = tiny_dit.transformer
    modules = [transformer, *transformer.transformer_blocks]
    keys_before = list(transformer.state_dict())
    reference = generate(tiny_dit)
    cache = apply_fastcache(transformer, FastCacheConfig(params=CacheParams(tolerance=1.0)))
    cached = generate(tiny_dit)
    cache.remove()
    for module in modules:
        assert not module._diffusers_hook.hooks, "a FastCache hook is left in the registry"
        assert module.forward.__func__ is type(module).forward
    assert list(transformer.state_dict()) == keys_before
    assert not torch.equal(cached, reference)  # the cache did change something while attached
    assert torch.equal(generate(tiny_dit), reference)


def test_applying_twice_is_refused(tiny_dit):
    cache = apply_fastcache(tiny_dit.transformer)
    try:
        try:
            apply_fastcache(tiny_dit.transformer)
        except RuntimeError as error:
            assert "already applied" in str(error)
        else:
            raise AssertionError("second apply_fastcache did not raise")
    finally:
        cache.remove()


def test_guidance_pair_decides_together_and_counts_once(tiny_dit):
    cache = apply_fastcache(tiny_dit.transformer, FastCacheConfig(params=CacheParams(tolerance=1.0)))
    try:
        generate(tiny_dit, labels=(3,), steps=10)
        stats = cache.stats()
    finally:
        cache.remove()
    assert len(stats) == 1  # one sample, two guidance rows
    assert stats[0].blocks_computed + stats[0].blocks_approximated == 10 * 3
    assert stats[0].blocks_approximated > 0


def test_uncalibrated_cache_says_it_forecasts_with_plain_first_order(tiny_dit):
    cache = apply_fastcache(tiny_dit.transformer, FastCacheConfig(use_calibration=False))
    try:
        generate(tiny_dit, steps=3)
        assert not cache.calibrated
        assert cache.stats()[0].approximator == "taylor order 1 (uncalibrated)"
    finally:
        cache.remove()
