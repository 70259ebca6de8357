"""FastCache attaches through diffusers' HookRegistry and composes with diffusers' other hooks."""

import pytest
import torch
from diffusers.hooks import HookRegistry, apply_layerwise_casting

from bench.peers import apply_peer
from fastcache_core import CacheParams, FastCacheConfig, apply_fastcache
from fastcache_core.hooks import BLOCK_HOOK, STACK_HOOK, STEP_HOOK
from tests.tiny_pipelines import tiny_dit_pipeline


def generate(pipe, steps=10):
    return pipe(
        [1, 2],
        guidance_scale=2.0,
        num_inference_steps=steps,
        generator=torch.Generator().manual_seed(0),
        output_type="pt",
    ).images


@pytest.fixture()
def pipe():
    return tiny_dit_pipeline(num_layers=3)


def test_hooks_are_registered_by_name_in_the_registries(pipe):
    cache = apply_fastcache(pipe.transformer)
    try:
        blocks = pipe.transformer.transformer_blocks
        assert HookRegistry.check_if_exists_or_initialize(pipe.transformer).get_hook(STEP_HOOK) is not None
        assert HookRegistry.check_if_exists_or_initialize(blocks[0]).get_hook(STACK_HOOK) is not None
        assert all(HookRegistry.check_if_exists_or_initialize(b).get_hook(BLOCK_HOOK) is not None for b in blocks[1:])
    finally:
        cache.remove()


def test_layerwise_casting_composes_with_fastcache_and_survives_its_removal(pipe):
    apply_layerwise_casting(pipe.transformer, storage_dtype=torch.bfloat16, compute_dtype=torch.float32)
    reference = generate(pipe)
    uncached = apply_fastcache(pipe.transformer, FastCacheConfig(params=CacheParams(method="none")))
    try:
        assert torch.equal(generate(pipe), reference)  # the casting hooks still run under the cache
    finally:
        uncached.remove()
    cache = apply_fastcache(pipe.transformer, FastCacheConfig(params=CacheParams(tolerance=0.5)))
    try:
        cached = generate(pipe)
        stats = cache.stats()
    finally:
        cache.remove()
    assert torch.isfinite(cached).all() and not torch.equal(cached, reference)
    assert all(s.blocks_approximated > 0 for s in stats)
    assert torch.equal(generate(pipe), reference)  # the casting hooks are still there after remove()
    weight = pipe.transformer.transformer_blocks[0].ff.net[2].weight
    assert weight.dtype == torch.bfloat16  # stored in bf16 by the casting hook


@pytest.mark.parametrize("interval", [2, 3])
def test_per_sample_taylorseer_equals_diffusers_taylorseer_hook(pipe, interval):
    """Forecasting the stack output per sample is what diffusers' hook does block by block."""
    steps = 12
    peer = apply_peer(
        pipe.transformer,
        "taylorseer",
        cache_interval=interval,
        disable_cache_before_step=3,
        max_order=1,
        taylor_factors_dtype=torch.float32,
    )
    try:
        theirs = generate(pipe, steps)
    finally:
        peer.remove()
    config = FastCacheConfig(
        first_steps=3, last_steps=0, params=CacheParams(method="taylorseer", tolerance=1.0, max_skip_steps=interval - 1)
    )
    cache = apply_fastcache(pipe.transformer, config)
    try:
        ours = generate(pipe, steps)
        stats = cache.stats()
    finally:
        cache.remove()
    assert not torch.equal(ours, generate(pipe, steps))
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)
    computed_steps = 3 + len(range(4, steps, interval))
    assert all(s.blocks_computed == 3 * computed_steps for s in stats)
