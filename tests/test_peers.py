"""Comparison peers (diffusers' cache hooks, cache-dit): they act, reset between runs, and detach cleanly."""

import importlib.util

import pytest
import torch

from bench.peers import PeerUnavailable, apply_peer, calibrate_magcache

HAS_CACHE_DIT = importlib.util.find_spec("cache_dit") is not None
STEPS, GUIDANCE = 10, 2.0
# MagCache's ratios come from images the checks never generate (seed 0 is theirs)
CALIBRATION = {"labels": [3, 4, 5], "seeds": [100, 101, 102]}


def peer_params(method, pipe):
    if method == "fbcache":
        return {"threshold": 0.5}
    if method == "taylorseer":
        return {"cache_interval": 3, "disable_cache_before_step": 2}
    if method == "pab":
        return {"block_skip_range": 2, "timestep_skip_range": (100, 900)}
    if method == "magcache":
        ratios = calibrate_magcache(pipe, num_inference_steps=STEPS, guidance_scale=GUIDANCE, **CALIBRATION)
        return {"mag_ratios": ratios, "threshold": 0.5, "retention_ratio": 0.2, "num_inference_steps": STEPS}
    if method == "seacache":
        return {"threshold": 0.5, "max_consecutive_cached": 3, "scheduler": pipe.scheduler}
    return {"threshold": 0.5, "max_warmup_steps": 2, "scheduler": pipe.scheduler}  # cachedit


def generate(pipe, steps=STEPS):
    return pipe(
        [1, 2],
        guidance_scale=GUIDANCE,
        num_inference_steps=steps,
        generator=torch.Generator().manual_seed(0),
        output_type="pt",
    ).images


@pytest.mark.parametrize(
    "method",
    [
        "fbcache",
        "magcache",
        "pab",
        "seacache",
        "taylorseer",
        pytest.param("cachedit", marks=pytest.mark.skipif(not HAS_CACHE_DIT, reason="cache-dit is not installed")),
    ],
)
def test_peer_changes_the_output_is_repeatable_and_detaches(tiny_dit, method):
    reference = generate(tiny_dit)
    params = peer_params(method, tiny_dit)
    handle = apply_peer(tiny_dit.transformer, method, **params)
    try:
        first = generate(tiny_dit)
        second = generate(tiny_dit)  # state from the first run must not leak into the second
    finally:
        handle.remove()
    assert not torch.allclose(first, reference), f"{method} did nothing: its hooks never engaged"
    torch.testing.assert_close(first, second)
    assert handle.forwards == 2 * STEPS
    torch.testing.assert_close(generate(tiny_dit), reference)


def test_magcache_calibration_gives_one_ratio_per_step_under_guidance_and_skips_nothing(tiny_dit):
    reference = generate(tiny_dit)
    handle = apply_peer(tiny_dit.transformer, "magcache", calibrate=True)
    try:
        calibrating = generate(tiny_dit)
        generate(tiny_dit, steps=4)
    finally:
        handle.remove()
    torch.testing.assert_close(calibrating, reference)
    # one transformer call per step carries both guidance branches: one ratio per step, per run
    assert [len(run) for run in handle.calibration_runs] == [STEPS, 4]
    assert handle.calibration_runs[0][0] == 1.0
    assert all(0 < r < 10 for r in handle.calibration_runs[0])


def test_magcache_calibration_averages_over_images(tiny_dit):
    one = [
        calibrate_magcache(tiny_dit, num_inference_steps=STEPS, guidance_scale=GUIDANCE, labels=[label], seeds=[seed])
        for label, seed in zip(CALIBRATION["labels"], CALIBRATION["seeds"], strict=True)
    ]
    together = calibrate_magcache(tiny_dit, num_inference_steps=STEPS, guidance_scale=GUIDANCE, **CALIBRATION)
    assert len(together) == STEPS
    torch.testing.assert_close(torch.tensor(together), torch.tensor(one).mean(dim=0), rtol=1e-6, atol=1e-9)


def test_magcache_follows_the_schedulers_step_count(tiny_dit):
    """Ratios calibrated at 10 steps, runs of 20: reading the step count from the scheduler at every run
    must equal configuring 20 steps up front (diffusers then resamples the ratios itself)."""
    ratios = calibrate_magcache(tiny_dit, num_inference_steps=STEPS, guidance_scale=GUIDANCE, **CALIBRATION)
    settings = {"mag_ratios": ratios, "threshold": 0.5, "retention_ratio": 0.2}
    handle = apply_peer(tiny_dit.transformer, "magcache", scheduler=tiny_dit.scheduler, **settings)
    try:
        generate(tiny_dit, steps=4)  # a run of another length first (the benchmark's warm-up)
        following = generate(tiny_dit, steps=2 * STEPS)
    finally:
        handle.remove()
    handle = apply_peer(tiny_dit.transformer, "magcache", num_inference_steps=2 * STEPS, **settings)
    try:
        configured = generate(tiny_dit, steps=2 * STEPS)
    finally:
        handle.remove()
    assert not torch.allclose(following, generate(tiny_dit, steps=2 * STEPS))
    torch.testing.assert_close(following, configured)


def test_seacache_needs_the_scheduler(tiny_dit):
    with pytest.raises(ValueError, match="scheduler"):
        apply_peer(tiny_dit.transformer, "seacache", threshold=0.5)


def test_magcache_needs_ratios_or_calibration(tiny_dit):
    with pytest.raises(ValueError, match="mag_ratios"):
        apply_peer(tiny_dit.transformer, "magcache", num_inference_steps=STEPS)


@pytest.mark.skipif(not HAS_CACHE_DIT, reason="cache-dit is not installed")
def test_cachedit_flops_are_countable_and_remove_restores_the_module(tiny_dit):
    from bench.cache import TransformerFlops

    transformer = tiny_dit.transformer
    keys, forward_before = set(transformer.state_dict()), transformer.__dict__.get("forward")

    def flops():
        # counted as bench.cache counts: from inside the transformer's call
        counter = TransformerFlops(transformer)
        try:
            generate(tiny_dit)
        finally:
            counter.remove()
        return counter.total

    uncached = flops()
    handle = apply_peer(transformer, "cachedit", **peer_params("cachedit", tiny_dit))
    try:
        cached = flops()  # cache-dit's block wrapper must not form a module cycle the counter recurses on
    finally:
        handle.remove()
    assert 0 < cached < uncached
    assert set(transformer.state_dict()) == keys
    assert transformer.__dict__.get("forward") is forward_before


def test_cachedit_without_the_package_is_reported(tiny_dit, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "cache_dit", None)
    with pytest.raises(PeerUnavailable, match="cache-dit is not installed"):
        apply_peer(tiny_dit.transformer, "cachedit")


def test_unknown_peer_is_refused(tiny_dit):
    with pytest.raises(ValueError, match="unknown peer"):
        apply_peer(tiny_dit.transformer, "magic")
