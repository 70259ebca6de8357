"""Calibration fits linear maps on real runs; fitted maps beat both reuse rules on held-out pairs."""

import pytest
import torch
from diffusers import DiTPipeline

from fastcache_core import CacheParams, FastCacheConfig, apply_fastcache
from fastcache_core.approx import CALIBRATION_FILENAME, ApproximatorSet
from fastcache_core.calibration import calibrate

SETTINGS = dict(num_samples=16, batch_size=4, num_inference_steps=10, guidance_scale=2.0, progress=False)


@pytest.fixture(scope="module")
def calibrated(tiny_dit):
    return calibrate(tiny_dit, tune_defaults=False, save_to=False, **SETTINGS)


def test_fitted_maps_beat_residual_reuse_and_output_reuse_on_heldout_pairs(calibrated):
    _, report = calibrated
    assert report.velocity_gain == "fitted"  # without the end-to-end sweep the least-squares fit is kept
    assert report.errors, "no held-out pairs were measured"
    for name, errors in report.errors.items():
        assert errors["fitted"] < errors["identity"], name
        assert errors["fitted"] < errors["output_reuse"], name


def test_every_block_and_the_static_token_path_get_a_fitted_map(calibrated, tiny_dit):
    approximators, _ = calibrated
    names = set(approximators.maps)
    assert names == {f"block{i}.image" for i in range(3)} | {"stack.image"}
    assert approximators.fitted
    assert approximators.block_scales.shape == (3, approximators.num_phases)


def test_block_maps_fit_a_residual_velocity_gain(calibrated):
    approximators, _ = calibrated
    for name, m in approximators.maps.items():
        if name.startswith("block"):
            assert m.velocity_gain is not None and m.velocity_gain.shape == (approximators.num_phases,)
            assert m.velocity_gain.abs().sum() > 0
        else:  # the static-token stack path has no velocity term
            assert m.velocity_gain is None


def test_low_rank_fit_stores_factors_and_still_beats_residual_reuse(tiny_dit):
    approximators, report = calibrate(tiny_dit, tune_defaults=False, save_to=False, rank=4, **SETTINGS)
    m = approximators.maps["block0.image"]
    assert m.correction is None and m.u.shape[-1] == 4 and m.v.shape[-2] == 4
    summary = report.summary()
    assert summary["fitted"] < summary["identity"]


def test_calibration_is_saved_beside_the_model_and_loaded_automatically(tiny_dit, tmp_path):
    tiny_dit.save_pretrained(tmp_path)
    pipe = DiTPipeline.from_pretrained(tmp_path)
    pipe.set_progress_bar_config(disable=True)
    _, report = calibrate(pipe, tune_defaults=True, tune_samples=4, tolerances=(0.05, 0.5), max_skip_steps=(4,),
                          target_psnr=20.0, **SETTINGS)
    assert report.velocity_gain in ("fitted", "unit")
    assert {row["velocity_gain"] for row in report.tolerance_sweep} == {"fitted", "unit"}
    path = tmp_path / "transformer" / CALIBRATION_FILENAME
    assert path.is_file()
    assert report.default_params["tolerance"] in (0.05, 0.5)
    reloaded = DiTPipeline.from_pretrained(tmp_path)
    reloaded.set_progress_bar_config(disable=True)
    cache = apply_fastcache(reloaded.transformer, FastCacheConfig())
    try:
        assert cache.calibrated
        assert cache.default_params.tolerance == report.default_params["tolerance"]
        reloaded([1], guidance_scale=2.0, num_inference_steps=4, generator=torch.Generator().manual_seed(0))
        assert cache.stats()[0].approximator == "fitted"
    finally:
        cache.remove()


def test_save_and_load_round_trip(calibrated, tmp_path):
    approximators, _ = calibrated
    approximators.save(tmp_path / "c.safetensors")
    loaded = ApproximatorSet.load(tmp_path / "c.safetensors")
    assert loaded.num_phases == approximators.num_phases
    for name, m in approximators.maps.items():
        for part in ("correction", "u", "v", "bias", "velocity_gain"):
            if getattr(m, part) is None:
                assert getattr(loaded.maps[name], part) is None
            else:
                torch.testing.assert_close(getattr(loaded.maps[name], part), getattr(m, part))


def test_request_params_override_calibrated_defaults(calibrated, tiny_dit):
    approximators, _ = calibrated
    approximators.metadata["default_params"] = {"tolerance": 0.3}
    cache = apply_fastcache(tiny_dit.transformer, FastCacheConfig(calibration=approximators))
    try:
        cache.add_sample("a", CacheParams(significance=0.1))
        cache.add_sample("b", CacheParams(tolerance=0.05))
        assert cache.sample_stats("a").params["tolerance"] == 0.3
        assert cache.sample_stats("a").params["significance"] == 0.1
        assert cache.sample_stats("b").params["tolerance"] == 0.05
    finally:
        cache.remove()
