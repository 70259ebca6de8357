"""``calibrate(pipe, ...)``: fit a model's ``CacheProfile`` on real runs, streaming, in bounded memory.

1. **Record, streaming.** Uncached pipeline runs on calibration prompts. A forward hook on the last
   block sees each step's stack output ``Y`` and keeps only its projection through the model's output
   layer ``P Y`` (the space errors are measured in), for the last ``2 * max_gap + 1`` steps. From that
   window it accumulates, per schedule phase and forecast distance ``h = 1..max_gap``: the squared
   relative error of a first-order forecast, the normal equations of a fitted first-order gain ``g``
   in ``P (Y_t - Y_{t-h}) ~ g P (Y_{t-h} - Y_{t-2h})``, and TeaCache's (input change, output change)
   points. Memory holds one small window per batch row: it does not grow with steps or blocks.
2. **Profile.** The one-step error is the phase's noise floor; the error above it grows like
   ``drift * h^2``; each phase's tolerance weight is its drift relative to the mean; the mean drift
   per squared step times the step count squared is the window scale of FastCache's rule in
   normalized time (the window a tolerance asks for).
3. **Tune end to end, on a grid** (``calibration_tune.py``): measure the reuse velocity of FastCache's
   per-sample test, then sweep rule variants (warm-up, test on/off, unit/fitted gain) x tolerances
   over a grid of step counts and guidance scales on tuning seeds; keep the variant and default
   tolerance that compute least while every cell keeps ``target_psnr`` (mean) and ``floor_psnr``
   (worst image).

Seeds: the fit uses ``FIT_SEED`` (10,000) and up, the tuning ``FIT_SEED + TUNE_SEED_OFFSET`` (20,000)
and up; benchmarks use seeds from 0, so no benchmark image was seen by calibration.

The profile is saved as ``fastcache_calibration.safetensors`` next to the transformer, where
``apply_fastcache`` finds it. ``fastcache-calibrate MODEL_DIR`` runs all of it from the shell.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from fastcache_core.adapters import adapter_for
from fastcache_core.calibration_fit import FitStatistics, StreamingRecorder
from fastcache_core.calibration_tune import (
    DEFAULT_WARMUPS,
    DEFAULT_WINDOWS,
    UNCAPPED_SKIP_STEPS,
    format_grid,
    reuse_velocity,
    rule_variants,
    sweep_grid,
)
from fastcache_core.profile import CALIBRATION_FILENAME, CacheProfile

FIT_SEED = 10_000
"""The streamed fit's first generator seed by default (batch ``b``: ``FIT_SEED + b``)."""
TUNE_SEED_OFFSET = 10_000
"""The tuning images' seeds start this far above the fit's (image ``i``: ``FIT_SEED + 10_000 + i``)."""


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
    """The chosen rule: variant (test on/off, gain), its constants and its grid summary."""
    default_params: dict[str, Any] = field(default_factory=dict)
    grid_sweep: list[dict[str, Any]] = field(default_factory=list)
    """Every variant x tolerance x grid cell the tuning ran."""


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
    seed: int = FIT_SEED,
    tune_defaults: bool = True,
    target_psnr: float = 40.0,
    floor_psnr: float = 31.0,
    windows: Sequence[float] = DEFAULT_WINDOWS,
    warmups: Sequence[float] = DEFAULT_WARMUPS,
    gain_modes: Sequence[str] = ("unit", "fitted"),
    grid_steps: Sequence[int] = (20, 50, 100),
    grid_guidance: Sequence[float] | None = None,
    tune_samples: int = 8,
    save_to: str | Path | bool | None = None,
    progress: bool = True,
) -> tuple[CacheProfile, CalibrationReport]:
    """Fit FastCache's profile on uncached runs of ``pipe`` and save it next to its transformer.

    Args:
        prompts: calibration prompts (class labels or names for DiT); default: every label in turn.
        num_samples: images generated for the streamed fit.
        num_phases: slices of normalized time with their own coefficients.
        max_gap: the longest forecast distance (steps) the fit sees; the window kept per row.
        seed: the fit's first seed (batch ``b`` uses ``seed + b``); the tuning images use
            ``seed + TUNE_SEED_OFFSET + i``.
        tune_defaults: measure the test's reuse velocity and sweep rule variants x tolerances over
            the grid on ``tune_samples`` tuning images, and store the default; without it only the fit.
        target_psnr: every grid cell's mean PSNR against uncached images the default must keep.
        floor_psnr: every grid cell's worst image the default must keep.
        windows: the sweep's tolerances, as the windows (normalized time) a typical sample keeps.
        warmups: the warm-ups (share of the run, from pure noise, computed in full) the sweep tries.
        gain_modes: the forecast gains the sweep compares: ``"unit"`` (Taylor's first order) and/or
            ``"fitted"`` (the least-squares gain per phase).
        grid_steps: step counts of the tuning grid.
        grid_guidance: guidance scales of the tuning grid (default: ``guidance_scale`` and 4, or 2 and
            4 when ``guidance_scale`` is 4).
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
    if drift_scale is not None:
        metadata["fastcache_rule"] = {"window_scale": drift_scale * num_inference_steps**2}
    if tune_defaults and drift_scale is not None:
        tune_prompts = [prompts[i % len(prompts)] for i in range(tune_samples)]
        guidance = guidance_scale if guidance_scale is not None else 0.0
        cells_guidance = grid_guidance or ((guidance, 4.0) if guidance != 4.0 else (2.0, 4.0))
        profile = _tune(
            pipe,
            profile,
            gains,
            tune_prompts,
            report,
            num_inference_steps,
            guidance_scale,
            [(s, g) for g in cells_guidance for s in grid_steps],
            windows,
            warmups,
            gain_modes,
            target_psnr,
            floor_psnr,
            seed + TUNE_SEED_OFFSET,
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
    report: CalibrationReport,
    steps: int,
    guidance: float | None,
    cells: list[tuple[int, float]],
    windows: Sequence[float],
    warmups: Sequence[float],
    gain_modes: Sequence[str],
    target_psnr: float,
    floor_psnr: float,
    seed: int,
    progress: bool,
) -> CacheProfile:
    """Measure the test's reuse velocity at each warm-up, sweep the grid, keep the chosen variant and
    default."""
    from fastcache_core.cache import apply_fastcache
    from fastcache_core.config import CacheParams, FastCacheConfig

    inputs = pipeline_inputs(pipe, prompts)

    def run(cell_steps: int, cell_guidance: float, profile: CacheProfile | None, tolerance: float) -> Any:
        call = {"num_inference_steps": cell_steps, "output_type": "pt"}
        if cell_guidance:
            call["guidance_scale"] = cell_guidance
        generators = [torch.Generator().manual_seed(seed + i) for i in range(len(prompts))]
        if profile is None:
            return pipe(**inputs, generator=generators, **call).images, []
        params = CacheParams(method="fastcache", tolerance=tolerance, max_skip_steps=UNCAPPED_SKIP_STEPS)
        cache = apply_fastcache(pipe.transformer, FastCacheConfig(calibration=profile, params=params))
        try:
            cache.set_run(num_steps=cell_steps, guidance_scale=cell_guidance or None)
            images = pipe(**inputs, generator=generators, **call).images
            return images, cache.stats()
        finally:
            cache.remove()

    window_scale = base.rule_constants["window_scale"]
    typical = window_scale * 0.14**2
    tolerances = sorted({round(window_scale * h * h, 6) for h in windows if window_scale * h * h <= 1.0})
    variants: dict[str, CacheProfile] = {}
    velocities: dict[str, float | None] = {}
    for warmup in warmups:
        velocity = reuse_velocity(run, base, steps, guidance or 0.0, min(1.0, typical), warmup)
        found = rule_variants(base, gains, velocity, gain_modes, warmup)
        variants.update(found)
        velocities.update(dict.fromkeys(found, velocity))
    sweep = sweep_grid(run, variants, tolerances, cells, target_psnr, floor_psnr, progress)
    chosen = sweep.chosen
    tuned = variants[chosen["variant"]]
    report.rule = {
        **chosen,
        "constants": tuned.metadata["fastcache_rule"],
        "measured_reuse_velocity": velocities[chosen["variant"]],
    }
    report.default_params = {
        "method": "fastcache",
        "tolerance": chosen["tolerance"],
        "max_skip_steps": UNCAPPED_SKIP_STEPS,
    }
    report.grid_sweep = sweep.rows
    tuned.metadata.update(
        default_params=report.default_params,
        target_psnr=target_psnr,
        floor_psnr=floor_psnr,
        rule=report.rule,
        grid_sweep=report.grid_sweep,
    )
    return tuned


def _default_save_path(transformer: torch.nn.Module) -> Path | None:
    source = getattr(transformer.config, "_name_or_path", None)
    if source and Path(source).is_dir():
        return Path(source) / CALIBRATION_FILENAME
    return None


def main(argv: list[str] | None = None) -> int:
    """``fastcache-calibrate MODEL_DIR``: calibrate a local diffusers pipeline directory."""
    import argparse
    import json
    import sys

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
        help="every grid cell's mean PSNR against uncached images the default keeps (40)",
    )
    parser.add_argument("--floor-psnr", type=float, default=31.0, help="every grid cell's worst image (31)")
    parser.add_argument("--grid-steps", default="20,50,100", help="step counts of the tuning grid (20,50,100)")
    parser.add_argument(
        "--windows",
        default=",".join(f"{w:g}" for w in DEFAULT_WINDOWS),
        help="windows (normalized time) whose tolerances the sweep tries",
    )
    parser.add_argument(
        "--warmups",
        default=",".join(f"{w:g}" for w in DEFAULT_WARMUPS),
        help="warm-ups (share of the run computed in full before any forecast) the sweep tries",
    )
    parser.add_argument("--gains", default="unit,fitted", help="forecast gains the sweep compares (unit,fitted)")
    parser.add_argument(
        "--grid-guidance", default=None, help="guidance scales of the tuning grid (default: --guidance-scale and 4)"
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

    def numbers(flag: str, text: str, kind: type[float] | type[int] = float) -> list[Any]:
        try:
            return [kind(v) for v in text.split(",")]
        except ValueError:
            parser.error(f"{flag}: {text!r} is not a comma list of {kind.__name__} values")

    grid_steps = numbers("--grid-steps", args.grid_steps, int)
    windows = numbers("--windows", args.windows)
    grid_guidance = numbers("--grid-guidance", args.grid_guidance) if args.grid_guidance else None
    warmups = numbers("--warmups", args.warmups)
    if any(not 0.0 <= w < 1.0 for w in warmups):
        parser.error("--warmups: every warm-up is a share of the run in [0, 1)")
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
        floor_psnr=args.floor_psnr,
        grid_steps=grid_steps,
        windows=windows,
        warmups=warmups,
        gain_modes=args.gains.split(","),
        grid_guidance=grid_guidance,
        tune_samples=args.tune_samples,
        tune_defaults=not args.no_tune,
        save_to=args.out,
    )
    target = args.out or Path(args.model) / "transformer" / CALIBRATION_FILENAME
    if report.rule:
        chosen = report.rule
        print(f"grid fitted ({chosen['variant']}, tolerance {chosen['tolerance']:g}):", file=sys.stderr)
        print(format_grid(report.grid_sweep, chosen["variant"], chosen["tolerance"]), file=sys.stderr)
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
