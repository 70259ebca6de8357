"""``calibrate(pipe, ...)``: fit a model's ``CacheProfile`` on real runs, streaming, in bounded memory.

1. **Record, streaming.** Uncached pipeline runs on calibration prompts. A forward hook on the last
   block sees each step's stack output ``Y`` and keeps only its projection through the model's output
   layer ``P Y`` (the space errors are measured in), for the last ``2 * max_gap + 1`` steps. From that
   window it accumulates, per schedule phase and forecast distance ``h = 1..max_gap``: the squared
   relative error of a first-order forecast, the normal equations of a fitted first-order gain ``g``
   in ``P (Y_t - Y_{t-h}) ~ g P (Y_{t-h} - Y_{t-2h})``, and TeaCache's (input change, output change)
   points. Memory holds one small window per batch row: it does not grow with steps or blocks.
2. **Profile.** The one-step error is the phase's noise floor; the error above it grows like
   ``drift * h^2``; the mean drift sets the horizon a tolerance asks for, and each phase's tolerance
   weight is its drift relative to the mean (the guard's null: how a typical sample drifts there).
3. **Tune end to end.** FastCache runs a sweep of tolerances for each candidate rule setting
   (chi-square guard slack or no guard, fitted or unit gain) on fresh seeds; the setting with the best mean PSNR over
   matched compute budgets is kept, and the default tolerance is the one that computes least while
   its mean PSNR against the uncached images stays at least ``target_psnr`` dB.

The profile is saved as ``fastcache_calibration.safetensors`` next to the transformer, where
``apply_fastcache`` finds it. ``fastcache-calibrate MODEL_DIR`` runs all of it from the shell.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from fastcache_core.adapters import adapter_for
from fastcache_core.calibration_fit import FitStatistics, StreamingRecorder
from fastcache_core.profile import CALIBRATION_FILENAME, CacheProfile

DEFAULT_HORIZONS = (2, 3, 4, 5, 6, 7, 8)
DEFAULT_GUARD_SLACKS: tuple[float | None, ...] = (2.0, None)
"""Guard settings the sweep compares (``None``: no guard)."""
BUDGETS = (0.2, 0.3, 0.4)
"""MAC fractions at which candidate rule settings are compared (interpolated PSNR)."""


@dataclass
class CalibrationReport:
    """What calibration measured and chose."""

    samples: int = 0
    error_floor: list[float] = field(default_factory=list)
    forecast_gain: list[float] = field(default_factory=list)
    gain_errors: dict[str, float] = field(default_factory=dict)
    """Total squared forecast error (output space, all gaps) of the fitted gain and of unit gain."""
    drift: list[float] = field(default_factory=list)
    """Typical forecast drift per squared step in each phase (the tolerance weights, unnormalized)."""
    teacache_coefficients: list[float] = field(default_factory=list)
    rule: dict[str, Any] = field(default_factory=dict)
    """The chosen guard slack and gain mode."""
    default_params: dict[str, Any] = field(default_factory=dict)
    tolerance_sweep: list[dict[str, Any]] = field(default_factory=list)


def pipeline_inputs(pipe: Any, prompts: Sequence[Any]) -> dict[str, Any]:
    """Keyword arguments that ask ``pipe`` for ``prompts`` (class labels for DiT, text otherwise)."""
    if type(pipe).__name__ == "DiTPipeline":
        labels: list[int] = []
        for p in prompts:
            if isinstance(p, int) or (isinstance(p, str) and p.isdigit()):
                labels.append(int(p))
            else:
                labels.extend(pipe.get_label_ids([p]))
        return {"class_labels": labels}
    return {"prompt": list(prompts)}


def default_prompts(pipe: Any, count: int) -> list[Any]:
    """Calibration prompts when none are given: every class label in turn for class-conditional models."""
    if type(pipe).__name__ == "DiTPipeline":
        ids = sorted(set(pipe.labels.values())) or list(range(pipe.transformer.config.num_embeds_ada_norm))
        return [ids[i % len(ids)] for i in range(count)]
    raise ValueError("calibrate() needs prompts for text-conditioned pipelines")


@torch.no_grad()
def calibrate(
    pipe: Any,
    prompts: Sequence[Any] | None = None,
    *,
    num_samples: int = 16,
    batch_size: int = 8,
    num_inference_steps: int = 50,
    guidance_scale: float | None = None,
    num_phases: int = 10,
    max_gap: int = 6,
    seed: int = 0,
    tune_defaults: bool = True,
    target_psnr: float = 40.0,
    horizons: Sequence[int] = DEFAULT_HORIZONS,
    guard_slacks: Sequence[float | None] = DEFAULT_GUARD_SLACKS,
    tune_samples: int = 8,
    max_skip_steps: int = 8,
    save_to: str | Path | bool | None = None,
    progress: bool = True,
) -> tuple[CacheProfile, CalibrationReport]:
    """Fit FastCache's profile on uncached runs of ``pipe`` and save it next to its transformer.

    Args:
        prompts: calibration prompts (class labels or names for DiT); default: every label in turn.
        num_samples: images generated for the streamed fit.
        num_phases: slices of normalized time with their own coefficients.
        max_gap: the longest forecast distance (steps) the fit sees; the window kept per row.
        tune_defaults: sweep the rule settings and tolerances end to end on ``tune_samples`` fresh
            seeds (below) and store the default tolerance; without it only the fit is stored.
        target_psnr: the default tolerance is the one that computes least while the sweep's mean PSNR
            against uncached images stays at least this many dB.
        horizons: the sweep's tolerances, given as the horizons a typical sample settles at
            (``tolerance = drift_scale * h^2``).
        guard_slacks: the chi-square guard settings the sweep compares (``None``: no guard).
        max_skip_steps: the longest run of forecast steps in the default params.
        save_to: file to write; ``None`` (default): ``<transformer dir>/fastcache_calibration.safetensors``
            when the transformer was loaded from a directory; ``False``: not saved.

    Returns the ``CacheProfile`` and a ``CalibrationReport``.
    """
    transformer = pipe.transformer
    prompts = list(prompts) if prompts is not None else default_prompts(pipe, num_samples)
    call_args: dict[str, Any] = {"num_inference_steps": num_inference_steps, "output_type": "pt"}
    if guidance_scale is not None:
        call_args["guidance_scale"] = guidance_scale
    stats = FitStatistics(num_phases, max_gap)
    chunks = [prompts[i : i + batch_size] for i in range(0, min(num_samples, len(prompts)), batch_size)]
    with StreamingRecorder(pipe, stats, max_gap) as recorder:
        for b, chunk in enumerate(tqdm(chunks, desc="calibration runs", disable=not progress)):
            recorder.new_run()
            pipe(**pipeline_inputs(pipe, chunk), generator=torch.Generator().manual_seed(seed + b), **call_args)
    report = CalibrationReport(samples=sum(len(c) for c in chunks))
    floor = torch.tensor(stats.floor(), dtype=torch.float32)
    gains = torch.tensor(stats.gains(), dtype=torch.float32)
    drift = stats.drift_per_step_sq()
    known = drift[~np.isnan(drift)]
    drift_scale = float(known.mean()) if known.size and known.mean() > 0 else None
    if drift_scale is not None:
        # phases without data take the mean; a phase whose drift stays under the floor keeps a tenth of it
        drift = np.where(np.isnan(drift), drift_scale, np.maximum(drift, 0.1 * drift_scale))
        weights = torch.tensor(drift / drift.mean(), dtype=torch.float32)
        drift_scale = float(drift.mean())
    else:
        weights = None
    report.error_floor = floor.tolist()
    report.forecast_gain = gains.tolist()
    report.drift = [] if weights is None else drift.tolist()
    report.gain_errors = {"fitted": float(stats.fitted_error().sum()), "unit": float(stats.unit_error.sum())}
    metadata: dict[str, Any] = {
        "family": adapter_for(transformer).family,
        "num_inference_steps": num_inference_steps,
        "guidance_scale": guidance_scale,
        "samples": report.samples,
        "gain_errors": report.gain_errors,
        "drift_scale": drift_scale,
    }
    if len(stats.teacache_points) > 8:
        x, y = np.array(stats.teacache_points).T
        report.teacache_coefficients = [float(c) for c in np.polyfit(x, y, 4)]
        metadata["teacache_coefficients"] = report.teacache_coefficients
    profile = CacheProfile(
        num_phases, forecast_gain=None, error_floor=floor, tolerance_weight=weights, metadata=metadata
    )
    if tune_defaults and drift_scale is not None:
        tune_prompts = [prompts[i % len(prompts)] for i in range(tune_samples)]
        tolerances = sorted({round(drift_scale * h * h, 6) for h in horizons if drift_scale * h * h <= 1.0})
        profile = _tune(
            pipe,
            profile,
            gains,
            tune_prompts,
            call_args,
            report,
            tolerances,
            guard_slacks,
            target_psnr,
            max_skip_steps,
            seed + 10_000,
            progress,
        )
    profile.metadata["report"] = {
        "error_floor": report.error_floor,
        "forecast_gain": report.forecast_gain,
        "drift": report.drift,
        "rule": report.rule,
    }
    path = (
        None
        if save_to is False
        else (Path(save_to) if isinstance(save_to, (str, Path)) else _default_save_path(transformer))
    )
    if path is not None:
        profile.save(path)
    return profile, report


def _tune(
    pipe: Any,
    base: CacheProfile,
    gains: torch.Tensor,
    prompts: list[Any],
    call_args: dict[str, Any],
    report: CalibrationReport,
    tolerances: Sequence[float],
    guard_slacks: Sequence[float | None],
    target_psnr: float,
    max_skip_steps: int,
    seed: int,
    progress: bool,
) -> CacheProfile:
    """Sweep rule settings x tolerances end to end; keep the best setting and the default tolerance."""
    from fastcache_core.cache import apply_fastcache
    from fastcache_core.config import CacheParams, FastCacheConfig
    from fastcache_core.quality import mean_finite, psnr

    inputs = pipeline_inputs(pipe, prompts)
    reference = pipe(**inputs, generator=torch.Generator().manual_seed(seed), **call_args).images
    gain_modes: dict[str, torch.Tensor | None] = {"unit": None, "fitted": gains}
    candidates = list(itertools.product(guard_slacks, gain_modes))
    sweeps: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    runs = [(c, t) for c in candidates for t in sorted(tolerances)]
    for (slack, gain_mode), tolerance in tqdm(runs, desc="rule sweep", disable=not progress):
        profile = _variant(base, gain_modes[gain_mode], slack)
        params = CacheParams(method="fastcache", tolerance=tolerance, max_skip_steps=max_skip_steps)
        cache = apply_fastcache(pipe.transformer, FastCacheConfig(calibration=profile, params=params))
        try:
            cache.set_run(num_steps=call_args["num_inference_steps"])
            images = pipe(**inputs, generator=torch.Generator().manual_seed(seed), **call_args).images
            stats = cache.stats()
        finally:
            cache.remove()
        sweeps.setdefault((slack, gain_mode), []).append(
            {
                "guard_slack": slack,
                "gain": gain_mode,
                "tolerance": tolerance,
                "psnr_db": mean_finite(psnr(images, reference)),
                "mac_fraction": float(np.mean([s.mac_fraction for s in stats])),
            }
        )
    best = max(sweeps, key=lambda c: _mean_psnr_at_budgets(sweeps[c]))
    slack, gain_mode = best
    rows = sweeps[best]
    good = [r for r in rows if r["psnr_db"] >= target_psnr]
    chosen = (
        min(good, key=lambda r: (round(r["mac_fraction"], 3), -r["psnr_db"]))
        if good
        else max(rows, key=lambda r: r["psnr_db"])
    )
    report.rule = {"guard_slack": slack, "gain": gain_mode}
    report.default_params = {"method": "fastcache", "tolerance": chosen["tolerance"], "max_skip_steps": max_skip_steps}
    report.tolerance_sweep = [r for c in candidates for r in sweeps[c]]
    tuned = _variant(base, gain_modes[gain_mode], slack)
    tuned.metadata.update(
        default_params=report.default_params,
        target_psnr=target_psnr,
        rule=report.rule,
        tolerance_sweep=report.tolerance_sweep,
    )
    return tuned


def _variant(base: CacheProfile, gains: torch.Tensor | None, guard_slack: float | None) -> CacheProfile:
    return CacheProfile(
        base.num_phases,
        forecast_gain=gains,
        error_floor=base.error_floor,
        tolerance_weight=base.tolerance_weight,
        metadata={**base.metadata, "guard_slack": guard_slack},
    )


def _mean_psnr_at_budgets(rows: list[dict[str, Any]]) -> float:
    """Mean PSNR of a sweep interpolated at ``BUDGETS`` (clamped to the sweep's range)."""
    points = sorted((r["mac_fraction"], r["psnr_db"]) for r in rows)
    x = np.array([p[0] for p in points])
    y = np.array([p[1] for p in points])
    return float(np.mean([np.interp(b, x, y) for b in BUDGETS]))


def _default_save_path(transformer: torch.nn.Module) -> Path | None:
    source = getattr(transformer.config, "_name_or_path", None)
    if source and Path(source).is_dir():
        return Path(source) / CALIBRATION_FILENAME
    return None


def main(argv: list[str] | None = None) -> int:
    """``fastcache-calibrate MODEL_DIR``: calibrate a local diffusers pipeline directory."""
    import argparse
    import json

    from diffusers import DiffusionPipeline

    parser = argparse.ArgumentParser(
        prog="fastcache-calibrate",
        description="Fit FastCache's profile for a local diffusers pipeline and save it in its transformer/ folder.",
    )
    parser.add_argument("model", help="pipeline directory (diffusers layout)")
    parser.add_argument("--prompts", nargs="*", help="calibration prompts (labels for DiT); default: every label")
    parser.add_argument("--samples", type=int, default=16, help="images of the streamed fit (16)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--guidance-scale", type=float, default=None)
    parser.add_argument(
        "--target-psnr",
        type=float,
        default=40.0,
        help="the default tolerance keeps at least this PSNR against uncached images (40)",
    )
    parser.add_argument("--tune-samples", type=int, default=8, help="images of the sweep (8)")
    parser.add_argument("--no-tune", action="store_true", help="fit only; no end-to-end sweep")
    parser.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda when available)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument(
        "--out", default=None, help=f"file to write (default: <model>/transformer/{CALIBRATION_FILENAME})"
    )
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if not Path(args.model).is_dir():
        parser.error(f"{args.model} is not a directory")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    overrides: dict[str, Any] = {}
    index = json.loads((Path(args.model) / "model_index.json").read_text())
    if isinstance(index.get("id2label"), dict):  # DiTPipeline wants int keys; JSON keys are strings
        overrides["id2label"] = {int(key): name for key, name in index["id2label"].items()}
    pipe = DiffusionPipeline.from_pretrained(args.model, **overrides).to(device)
    pipe.set_progress_bar_config(disable=True)
    profile, report = calibrate(
        pipe,
        args.prompts,
        num_samples=args.samples,
        batch_size=args.batch_size,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance_scale,
        target_psnr=args.target_psnr,
        tune_samples=args.tune_samples,
        tune_defaults=not args.no_tune,
        save_to=args.out,
    )
    target = args.out or Path(args.model) / "transformer" / CALIBRATION_FILENAME
    print(
        json.dumps(
            {
                "saved": str(target),
                "rule": report.rule,
                "default_params": report.default_params,
                "gain_errors": report.gain_errors,
                "error_floor": report.error_floor,
                "drift": report.drift,
            },
            indent=2,
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
