"""Calibration streams uncached runs into a small profile that FastCache loads beside the model."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from diffusers import DiTPipeline

from fastcache_core import CacheParams, FastCacheConfig, apply_fastcache
from fastcache_core.calibration import FIT_SEED, calibrate
from fastcache_core.calibration_fit import FitStatistics
from fastcache_core.profile import CALIBRATION_FILENAME, CacheProfile

SETTINGS = dict(
    num_samples=8, batch_size=4, num_inference_steps=10, guidance_scale=2.0, num_phases=4, max_gap=3, progress=False
)


@pytest.fixture(scope="module")
def calibrated(tiny_dit):
    return calibrate(tiny_dit, tune_defaults=False, save_to=False, **SETTINGS)


def recorded_outputs(pipe, labels, seed):
    """Every step's stack output of one uncached run, projected through the output layer, in memory."""
    outputs, times = [], []
    last = pipe.transformer.transformer_blocks[-1]
    weight = pipe.transformer.proj_out_2.weight.detach().double()
    hooks = [
        last.register_forward_hook(lambda m, a, o: outputs.append(o.detach().double() @ weight.T)),
        pipe.transformer.register_forward_pre_hook(
            lambda m, a, k: times.append(float(k["timestep"].reshape(-1)[0]) / 1000.0), with_kwargs=True
        ),
    ]
    try:
        pipe(
            labels,
            guidance_scale=2.0,
            num_inference_steps=10,
            generator=torch.Generator().manual_seed(seed),
            output_type="pt",
        )
    finally:
        for hook in hooks:
            hook.remove()
    return outputs, times


def test_the_streamed_fit_equals_a_fit_from_every_step_in_memory(tiny_dit):
    """The window-based statistics are exactly those of the whole recording (issue: bounded memory)."""
    from fastcache_core.profile import phase_of

    _, report = calibrate(tiny_dit, tune_defaults=False, save_to=False, **SETTINGS)
    stats = FitStatistics(4, 3)
    for b, chunk in enumerate([[0, 1, 2, 3], [4, 5, 6, 7]]):
        outputs, times = recorded_outputs(tiny_dit, chunk, FIT_SEED + b)
        for t in range(len(outputs)):
            phase = phase_of(times[t], 4)
            y = outputs[t]
            norm = y.pow(2).flatten(1).sum(1)[:4] + y.pow(2).flatten(1).sum(1)[4:]
            for gap in range(1, 4):
                if t - 2 * gap < 0:
                    break
                target, slope = y - outputs[t - gap], outputs[t - gap] - outputs[t - 2 * gap]
                err = (target - slope).pow(2).flatten(1).sum(1)
                stats.error_sq_sum[phase, gap - 1] += float(((err[:4] + err[4:]) / norm).sum())
                stats.error_count[phase, gap - 1] += 4
                stats.gain_cross[phase] += float((slope * target).sum())
                stats.gain_gram[phase] += float((slope * slope).sum())
    np.testing.assert_allclose(report.error_floor, stats.floor(), rtol=1e-5)
    np.testing.assert_allclose(report.forecast_gain, stats.gains(), rtol=1e-5)


def test_the_profile_has_a_floor_a_drift_weight_and_a_gain_per_phase(calibrated):
    profile, report = calibrated
    assert profile.fitted and profile.num_phases == 4
    assert profile.error_floor.shape == (4,) and (profile.error_floor >= 0).all()
    assert profile.tolerance_weight.shape == (4,) and profile.tolerance_weight.mean() == pytest.approx(1.0)
    assert profile.drift_scale > 0
    assert set(report.gain_errors) == {"fitted", "unit"}
    assert report.gain_errors["fitted"] <= report.gain_errors["unit"]  # least squares beats the unit gain it includes


def test_save_and_load_round_trip(calibrated, tmp_path):
    profile, _ = calibrated
    profile.save(tmp_path / "c.safetensors")
    loaded = CacheProfile.load(tmp_path / "c.safetensors")
    assert loaded.num_phases == profile.num_phases and loaded.metadata == profile.metadata
    torch.testing.assert_close(loaded.error_floor, profile.error_floor)
    torch.testing.assert_close(loaded.tolerance_weight, profile.tolerance_weight)


def test_a_calibration_file_of_another_format_is_refused_with_a_clear_error(tmp_path):
    from safetensors.torch import save_file

    save_file({"block0.image.u": torch.zeros(1, 2, 2)}, str(tmp_path / "old.safetensors"))
    with pytest.raises(ValueError, match="recalibrate"):
        CacheProfile.load(tmp_path / "old.safetensors")


def test_calibration_is_saved_beside_the_model_and_its_default_is_loaded(tiny_dit, tmp_path):
    tiny_dit.save_pretrained(tmp_path)
    pipe = DiTPipeline.from_pretrained(tmp_path)
    pipe.set_progress_bar_config(disable=True)
    _, report = calibrate(
        pipe,
        tune_samples=2,
        windows=(0.2, 0.3),
        warmups=(0.0, 0.5),
        grid_steps=(6, 10),
        target_psnr=10.0,
        floor_psnr=5.0,
        **SETTINGS,
    )
    assert (tmp_path / "transformer" / CALIBRATION_FILENAME).is_file()
    variants = {row["variant"] for row in report.grid_sweep}
    plain = {"test on, unit gain", "test on, fitted gain", "test off, unit gain", "test off, fitted gain"}
    assert variants == plain | {f"{name}, warm-up 0.5" for name in plain}, "each warm-up is swept"
    chosen_warmup = 0.5 if report.rule["variant"].endswith("warm-up 0.5") else 0.0
    assert report.rule["constants"]["warmup"] == chosen_warmup, "the chosen warm-up is the profile's"
    cells = {(row["steps"], row["guidance"]) for row in report.grid_sweep}
    assert cells == {(6, 2.0), (10, 2.0), (6, 4.0), (10, 4.0)}, "the tuning grid spans step counts and guidance"
    assert report.rule["measured_reuse_velocity"] > 0
    reloaded = DiTPipeline.from_pretrained(tmp_path)
    reloaded.set_progress_bar_config(disable=True)
    cache = apply_fastcache(reloaded.transformer, FastCacheConfig())
    try:
        assert cache.calibrated
        assert cache.default_params.tolerance == report.default_params["tolerance"]
        reloaded([1], guidance_scale=2.0, num_inference_steps=4, generator=torch.Generator().manual_seed(0))
        assert cache.stats()[0].approximator == "fitted forecast"
    finally:
        cache.remove()


def test_request_params_override_calibrated_defaults(calibrated, tiny_dit):
    profile, _ = calibrated
    profile = CacheProfile(
        profile.num_phases,
        profile.forecast_gain,
        profile.error_floor,
        profile.tolerance_weight,
        {**profile.metadata, "default_params": {"tolerance": 0.3}},
    )
    cache = apply_fastcache(tiny_dit.transformer, FastCacheConfig(calibration=profile))
    try:
        cache.add_sample("a", CacheParams(significance=0.1))
        cache.add_sample("b", CacheParams(tolerance=0.05))
        assert cache.sample_stats("a").params["tolerance"] == 0.3
        assert cache.sample_stats("a").params["significance"] == 0.1
        assert cache.sample_stats("b").params["tolerance"] == 0.05
    finally:
        cache.remove()


def test_fastcache_calibrate_writes_the_profile_and_reports_it(tiny_dit_dir, tmp_path):
    out = tmp_path / "profile.safetensors"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "fastcache_core.calibration",
            str(tiny_dit_dir),
            "--samples",
            "4",
            "--batch-size",
            "4",
            "--steps",
            "6",
            "--guidance-scale",
            "2.0",
            "--no-tune",
            "--threads",
            "1",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["saved"] == str(out) and out.is_file()
    assert len(report["error_floor"]) == CacheProfile.load(out).num_phases
    assert "calibration runs" in result.stderr  # the progress bar


def test_fastcache_calibrate_refuses_a_missing_directory(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "fastcache_core.calibration", str(tmp_path / "nope")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2 and "is not a directory" in result.stderr


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("--warmups", "0,0.4,abc", "--warmups: '0,0.4,abc' is not a comma list of float values"),
        ("--warmups", "0,1.5", "--warmups: every warm-up is a share of the run in [0, 1)"),
        ("--grid-steps", "20,fifty", "--grid-steps: '20,fifty' is not a comma list of int values"),
    ],
)
def test_fastcache_calibrate_names_the_option_it_cannot_read(tiny_dit_dir, capsys, flag, value, message):
    from fastcache_core.calibration import main

    with pytest.raises(SystemExit) as exit_info:
        main([str(tiny_dit_dir), flag, value])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
