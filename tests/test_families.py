"""Every supported transformer family runs end to end through its own diffusers pipeline with FastCache on."""

import pytest
import torch

from fastcache_core import CacheParams, FastCacheConfig, apply_fastcache
from tests.tiny_pipelines import BUILDERS


def pipeline_kwargs(family):
    kwargs = dict(num_inference_steps=8, output_type="pt", generator=torch.Generator().manual_seed(0))
    if family == "dit":
        return dict(class_labels=[1, 2], guidance_scale=2.0, **kwargs)
    kwargs.update(prompt=["a red cat", "the blue dog"], height=32, width=32)
    if family == "pixart":
        kwargs.update(guidance_scale=2.0, max_sequence_length=16, use_resolution_binning=False)
    elif family == "sd3":
        kwargs.update(guidance_scale=2.0, max_sequence_length=16)
    elif family == "flux":
        kwargs.update(max_sequence_length=16)
    return kwargs


@pytest.fixture(scope="module", params=sorted(BUILDERS))
def family_pipe(request):
    return request.param, BUILDERS[request.param]()


def run(pipe, family, params):
    cache = apply_fastcache(pipe.transformer, FastCacheConfig(params=params))
    try:
        images = pipe(**pipeline_kwargs(family)).images
        return images, cache.stats()
    finally:
        cache.remove()


def test_zero_tolerance_matches_uncached(family_pipe):
    family, pipe = family_pipe
    reference = pipe(**pipeline_kwargs(family)).images
    images, _ = run(pipe, family, CacheParams(tolerance=0.0))
    torch.testing.assert_close(images, reference, rtol=1e-5, atol=1e-5)


def test_nonzero_tolerance_computes_strictly_fewer_block_macs(family_pipe):
    family, pipe = family_pipe
    images, stats = run(pipe, family, CacheParams(tolerance=1.0))
    assert images.shape[0] == 2 and torch.isfinite(images).all()
    assert len(stats) == 2
    for s in stats:
        assert s.steps == 8
        assert s.blocks_approximated > 0
        assert 0 < s.macs_computed < s.macs_full


def test_token_selection_and_merging_run_and_report_fewer_tokens(family_pipe):
    family, pipe = family_pipe
    images, stats = run(pipe, family, CacheParams(tolerance=0.0, motion_fraction=0.5, merge_ratio=0.25))
    assert torch.isfinite(images).all()
    for s in stats:
        assert s.tokens_computed_fraction < 1.0
        assert s.macs_computed < s.macs_full


def denoise_with_runner(pipe, family, settings, steps=6):
    """Final latents of one sample per (cache params, seed), denoised together in the service's batched loop."""
    from service.engine.families import GenerationSpec, runner_for

    runner = runner_for(pipe, torch.device("cpu"), pipe.transformer.dtype)
    cache = apply_fastcache(pipe.transformer, FastCacheConfig())
    prompt = "3" if family == "dit" else "a red cat"
    samples = []
    try:
        for i, (params, seed) in enumerate(settings):
            spec = GenerationSpec(prompt, None, steps, 2.0, seed, 32, 32, params)
            cache.add_sample(i, params, steps)
            samples.append(runner.prepare(i, spec))
        while not all(s.done for s in samples):
            active = [s for s in samples if not s.done]
            for sample, output in zip(active, runner.forward(active, cache), strict=True):
                runner.step(sample, output)
        return [s.latents for s in samples]
    finally:
        cache.remove()


def test_first_block_cache_sharing_block_calls_with_uncached_samples_equals_its_solo_run(family_pipe):
    family, pipe = family_pipe
    uncached, fbcache = (CacheParams(method="none"), 1), (CacheParams(method="fbcache", tolerance=0.5), 2)
    batched = denoise_with_runner(pipe, family, [uncached, fbcache, (CacheParams(method="none"), 3)])
    (solo_fb,) = denoise_with_runner(pipe, family, [fbcache])
    (solo_uncached,) = denoise_with_runner(pipe, family, [uncached])
    torch.testing.assert_close(batched[1], solo_fb, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(batched[0], solo_uncached, rtol=1e-4, atol=1e-5)


def test_token_refresh_of_every_token_equals_uncached_where_keys_and_values_are_kept(family_pipe):
    family, pipe = family_pipe
    images, stats = run(pipe, family, CacheParams(tolerance=1.0, refresh_fraction=1.0))
    if family in ("dit", "pixart"):  # the attention processor keeps the other tokens' keys and values
        reference = pipe(**pipeline_kwargs(family)).images
        assert all(s.blocks_approximated > 0 for s in stats)
    else:  # SD3 and Flux (joint attention) have no such processor yet: the refresh steps forecast
        reference, _ = run(pipe, family, CacheParams(tolerance=1.0))
    torch.testing.assert_close(images, reference, rtol=1e-4, atol=1e-5)
