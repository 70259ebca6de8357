"""``calibrate(pipe, ...)``: fit FastCache's linear maps, block scales and defaults on real runs.

1. Run the pipeline uncached on calibration prompts, recording every block's input and output per
   step (and the stack's, and the first block's modulated input for TeaCache).
2. For step pairs ``(t - k, t)`` with gaps ``k = 1..max_gap`` accumulate the normal equations of the
   first-order map ``out(t) - out(t-k) ~ W (in(t) - in(t-k)) + k b`` per block, stream and schedule
   phase; a held-out share of the runs only accumulates error statistics.
3. Solve the ridge problems, measure held-out error of the fitted map against residual reuse (W = I)
   and output reuse (W = 0), derive per-block tolerance scales and TeaCache's rescaling polynomial.
4. Optionally sweep the tolerance on held-out prompts and store the largest one whose images stay
   above ``target_psnr`` dB against the uncached images as the model's default.

The result is saved as ``fastcache_calibration.safetensors`` next to the transformer, where
``apply_fastcache`` finds it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from fastcache_core.adapters import adapter_for
from fastcache_core.approx import (
    CALIBRATION_FILENAME,
    ApproximatorSet,
    LinearApproximator,
    NormalEquations,
    phase_of,
)


@dataclass
class _Recording:
    """Activations of one uncached pipeline call: lists over steps of (rows, tokens, width) tensors."""

    times: list[float] = field(default_factory=list)
    blocks: dict[str, list[torch.Tensor]] = field(default_factory=dict)  # "<name>.in" / "<name>.out"
    modulated: list[torch.Tensor] = field(default_factory=list)


class _Recorder:
    """Temporarily wraps a transformer's blocks to record inputs and outputs of every call."""

    def __init__(self, transformer: torch.nn.Module) -> None:
        self.adapter = adapter_for(transformer)
        self.transformer = transformer
        self.blocks = self.adapter.blocks(transformer)
        self.recording = _Recording()
        self._handles: list[Any] = []

    def __enter__(self) -> "_Recorder":
        if getattr(self.transformer, "_fastcache", None) is not None:
            raise RuntimeError("calibrate() records uncached runs: call .remove() on the FastCache handle first")
        for index, block in enumerate(self.blocks):
            block.forward = self._wrap(index, block.forward)
        self._handles.append(self.transformer.register_forward_pre_hook(self._on_forward, with_kwargs=True))
        return self

    def __exit__(self, *exc: Any) -> None:
        for block in self.blocks:
            block.__dict__.pop("forward", None)
        for handle in self._handles:
            handle.remove()

    def take(self) -> _Recording:
        recording, self.recording = self.recording, _Recording()
        return recording

    def _on_forward(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        import inspect

        bound = inspect.signature(module.forward).bind(*args, **kwargs).arguments
        timestep = bound["timestep"]
        t = timestep.reshape(-1)[:1] if torch.is_tensor(timestep) else torch.tensor([timestep])
        self.recording.times.append(self.adapter.normalized_time(t)[0])

    def _wrap(self, index: int, original: Any) -> Any:
        def forward(*args: Any, **kwargs: Any) -> Any:
            call = self.adapter.bind_call(original, args, kwargs)
            image, text = self.adapter.split_streams(call)
            output = original(*args, **kwargs)
            out_image, out_text = self.adapter.output_to_streams(output)
            rec = self.recording.blocks
            rec.setdefault(f"block{index}.image.in", []).append(image.detach())
            rec.setdefault(f"block{index}.image.out", []).append(out_image.detach())
            if text is not None and out_text is not None:
                rec.setdefault(f"block{index}.text.in", []).append(text.detach())
                rec.setdefault(f"block{index}.text.out", []).append(out_text.detach())
            if index == 0:
                rec.setdefault("stack.image.in", []).append(image.detach())
                try:
                    self.recording.modulated.append(
                        self.adapter.modulated_input(self.blocks[0], call, image).detach())
                except (NotImplementedError, KeyError, AttributeError):
                    pass
            if index == len(self.blocks) - 1:
                rec.setdefault("stack.image.out", []).append(out_image.detach())
            return output

        return forward


@dataclass
class CalibrationReport:
    """Held-out fit quality and what the calibration chose.

    ``errors[name]`` maps ``fitted``/``identity``/``output_reuse`` to the held-out sum of squared errors
    of the predicted output change, over all phases; lower is better.
    """

    errors: dict[str, dict[str, float]] = field(default_factory=dict)
    block_scales: list[list[float]] = field(default_factory=list)
    teacache_coefficients: list[float] = field(default_factory=list)
    default_params: dict[str, Any] = field(default_factory=dict)
    tolerance_sweep: list[dict[str, float]] = field(default_factory=list)
    samples: int = 0

    velocity_gain: str = "fitted"
    candidate_errors: dict[str, dict[str, float]] = field(default_factory=dict)

    def summary(self) -> dict[str, float]:
        """Held-out error totals over every map: fitted vs residual reuse (W = I) vs output reuse (W = 0)."""
        return _totals(self.errors)


def pipeline_inputs(pipe: Any, prompts: Sequence[Any]) -> dict[str, Any]:
    """Keyword arguments that ask ``pipe`` for ``prompts`` (class labels for DiT, text otherwise)."""
    if type(pipe).__name__ == "DiTPipeline":
        labels = []
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


def _accumulate(recording: _Recording, num_phases: int, max_gap: int,
                equations: dict[tuple[str, int], NormalEquations], scale_sums: np.ndarray,
                scale_counts: np.ndarray, tea_points: list[tuple[float, float]]) -> None:
    steps = len(recording.times)
    phases = [phase_of(t, num_phases) for t in recording.times]
    names = sorted({key.rsplit(".", 1)[0] for key in recording.blocks})
    for name in names:
        ins, outs = recording.blocks[f"{name}.in"], recording.blocks[f"{name}.out"]
        if len(ins) != steps:
            continue
        width = ins[0].shape[-1]
        # the residual-velocity term exists for blocks (the static-token stack path does not use it)
        with_velocity = name.startswith("block")
        for t in range(1, steps):
            for gap in range(1, min(max_gap, t) + 1):
                cached = t - gap
                delta_in = (ins[t] - ins[cached]).double()
                target = (outs[t] - outs[cached]).double() - delta_in
                velocity_term = None
                if with_velocity and cached - gap >= 0:
                    # gap * v, with v the per-step residual change between computes at cached-gap and cached
                    velocity_term = ((outs[cached] - ins[cached]) - (outs[cached - gap] - ins[cached - gap])).double()
                eq = equations.setdefault((name, phases[t]), NormalEquations(width))
                eq.add(delta_in, target, gap, velocity_term)
            if name.startswith("block") and name.endswith(".image"):
                block = int(name[len("block"):].split(".")[0])
                prev = ins[t - 1].double()
                change = (ins[t].double() - prev).flatten(1).norm(dim=1) / prev.flatten(1).norm(dim=1).clamp_min(1e-12)
                scale_sums[block, phases[t]] += float(change.sum())
                scale_counts[block, phases[t]] += change.numel()
    outs = recording.blocks.get("stack.image.out", [])
    for t in range(1, min(len(recording.modulated), len(outs))):
        m_prev, o_prev = recording.modulated[t - 1].double(), outs[t - 1].double()
        x = float((recording.modulated[t].double() - m_prev).abs().sum() / m_prev.abs().sum().clamp_min(1e-12))
        y = float((outs[t].double() - o_prev).abs().sum() / o_prev.abs().sum().clamp_min(1e-12))
        tea_points.append((x, y))


@torch.no_grad()
def calibrate(
    pipe: Any,
    prompts: Sequence[Any] | None = None,
    *,
    num_samples: int = 32,
    batch_size: int = 8,
    num_inference_steps: int = 50,
    guidance_scale: float | None = None,
    num_phases: int = 3,
    max_gap: int = 4,
    ridge: float = 1e-3,
    velocity_gain: float | None | str = "auto",
    rank: int | None = None,
    holdout_every: int = 4,
    seed: int = 0,
    tune_defaults: bool = True,
    target_psnr: float = 30.0,
    tolerances: Sequence[float] = (0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.6),
    max_skip_steps: Sequence[int] = (4, 8, 16),
    tune_samples: int = 8,
    save_to: str | Path | bool | None = None,
    progress: bool = True,
) -> tuple[ApproximatorSet, CalibrationReport]:
    """Fit FastCache's linear maps on uncached runs of ``pipe`` and save them next to its transformer.

    Args:
        prompts: calibration prompts (class labels or names for DiT); default: every label in turn.
        num_samples: images generated for fitting (every ``holdout_every``-th batch is held out).
        rank: store each correction in this rank (reduced-rank regression); ``None``: width / 32 (at
            least 4), which keeps an approximation near 1% of a block's cost. Measured on the bundled
            model, a full-rank map cost more (~8% of a block per reuse) than it returned end to end.
        velocity_gain: gamma of the residual-velocity term: ``None`` fits it jointly with ``M`` and ``b``;
            a number fixes it (``M`` and ``b`` then fit what it leaves); ``"auto"`` (default) fits both
            variants and keeps the one with the better end-to-end default in the sweep (on the bundled
            model the fitted gamma predicted single steps better but chained reuse worse). Without
            ``tune_defaults``, ``"auto"`` keeps the fitted variant.
        tune_defaults: sweep ``tolerances`` x ``max_skip_steps`` on ``tune_samples`` fresh seeds and store
            the setting that computes least while its mean PSNR against uncached images stays at least
            ``target_psnr`` (ties: the higher PSNR) as the model's default.
        save_to: file to write; ``None`` (default): ``<transformer dir>/fastcache_calibration.safetensors``
            when the transformer was loaded from a directory; ``False``: not saved.

    Returns the fitted ``ApproximatorSet`` and a ``CalibrationReport`` with held-out errors.
    """
    transformer = pipe.transformer
    if prompts is None:
        prompts = default_prompts(pipe, num_samples)
    prompts = list(prompts)
    call_args: dict[str, Any] = {"num_inference_steps": num_inference_steps, "output_type": "pt"}
    if guidance_scale is not None:
        call_args["guidance_scale"] = guidance_scale
    fit_eq: dict[tuple[str, int], NormalEquations] = {}
    held_eq: dict[tuple[str, int], NormalEquations] = {}
    num_blocks = len(adapter_for(transformer).blocks(transformer))
    scale_sums = np.zeros((num_blocks, num_phases))
    scale_counts = np.zeros((num_blocks, num_phases))
    tea_points: list[tuple[float, float]] = []
    batches = [prompts[i:i + batch_size] for i in range(0, min(num_samples, len(prompts)), batch_size)]
    with _Recorder(transformer) as recorder:
        for b, chunk in enumerate(tqdm(batches, desc="calibration runs", disable=not progress)):
            generator = torch.Generator().manual_seed(seed + b)
            pipe(**pipeline_inputs(pipe, chunk), generator=generator, **call_args)
            recording = recorder.take()
            held_out = holdout_every > 0 and b % holdout_every == holdout_every - 1
            _accumulate(recording, num_phases, max_gap, held_eq if held_out else fit_eq,
                        scale_sums, scale_counts, tea_points)
    report = CalibrationReport(samples=sum(len(c) for c in batches))
    gain_modes = {"fitted": None, "unit": 1.0} if velocity_gain == "auto" else \
        {("fitted" if velocity_gain is None else f"fixed {velocity_gain:g}"): velocity_gain}
    candidates = {mode: _fit_maps(fit_eq, held_eq, num_phases, ridge, rank, gain, progress)
                  for mode, gain in gain_modes.items()}
    mean_change = scale_sums / np.maximum(scale_counts, 1)
    overall = scale_sums.sum() / max(scale_counts.sum(), 1)
    block_scales = torch.tensor(np.where(scale_counts > 0, mean_change / max(overall, 1e-12), 1.0), dtype=torch.float32)
    report.block_scales = block_scales.tolist()
    if len(tea_points) > 8:
        x, y = np.array(tea_points).T
        report.teacache_coefficients = [float(c) for c in np.polyfit(x, y, 4)]
    metadata = {
        "family": adapter_for(transformer).family,
        "num_inference_steps": num_inference_steps,
        "guidance_scale": guidance_scale,
        "max_gap": max_gap,
        "ridge": ridge,
        "samples": report.samples,
    }
    if report.teacache_coefficients:
        metadata["teacache_coefficients"] = report.teacache_coefficients
    sets = {mode: ApproximatorSet(num_phases, maps, block_scales, {**metadata, "velocity_gain": mode})
            for mode, (maps, _) in candidates.items()}
    chosen = next(iter(sets))
    if tune_defaults:
        # choose the gain mode end to end: single-step held-out error does not rank chained reuse
        results = {mode: _tune_defaults(pipe, approximators, prompts, call_args, tolerances, max_skip_steps,
                                        target_psnr, tune_samples, seed + 10_000, progress)
                   for mode, approximators in sets.items()}
        chosen = min(results, key=lambda mode: _sweep_rank(results[mode][1], results[mode][0]))
        report.default_params, report.tolerance_sweep = results[chosen]
        for mode, (_, sweep) in results.items():
            for row in sweep:
                row["velocity_gain"] = mode
        report.tolerance_sweep = [row for mode in results for row in results[mode][1]]
        sets[chosen].metadata.update(default_params=report.default_params, tolerance_sweep=report.tolerance_sweep,
                                     target_psnr=target_psnr)
    approximators = sets[chosen]
    report.errors = candidates[chosen][1]
    report.velocity_gain = chosen
    report.candidate_errors = {mode: _totals(errors) for mode, (_, errors) in candidates.items()}
    approximators.metadata["heldout_errors"] = report.summary()
    approximators.metadata["candidate_heldout_errors"] = report.candidate_errors
    path = None if save_to is False else (Path(save_to) if save_to else _default_save_path(transformer))
    if path is not None:
        approximators.save(path)
    return approximators, report


def _fit_maps(fit_eq: dict[tuple[str, int], NormalEquations], held_eq: dict[tuple[str, int], NormalEquations],
              num_phases: int, ridge: float, rank: int | None, velocity_gain: float | None,
              progress: bool) -> tuple[dict[str, LinearApproximator], dict[str, dict[str, float]]]:
    """Solve every (map, phase) problem; return the maps and their held-out errors against both reuse rules."""
    maps: dict[str, LinearApproximator] = {}
    all_errors: dict[str, dict[str, float]] = {}
    names = sorted({name for name, _ in fit_eq})
    for name in tqdm(names, desc="fitting maps", disable=not progress):
        width = next(eq.dim for (n, _), eq in fit_eq.items() if n == name)
        use_rank = rank if rank is not None else max(4, width // 32)
        corrections, us, vs, biases, gains = [], [], [], [], []
        errors = {"fitted": 0.0, "identity": 0.0, "output_reuse": 0.0}
        for phase in range(num_phases):
            eq = fit_eq.get((name, phase))
            if eq is None or eq.count == 0:
                coeffs, gain = torch.zeros(width + 1, width, dtype=torch.float64), 0.0
                u = torch.zeros(width, use_rank, dtype=torch.float64) if use_rank < width else None
                v = torch.zeros(use_rank, width, dtype=torch.float64) if use_rank < width else None
            else:
                coeffs, gain, u, v = eq.solve(ridge, use_rank, fixed_gain=velocity_gain)
            corrections.append(coeffs[:width])
            biases.append(coeffs[width])
            gains.append(gain)
            if u is not None:
                us.append(u)
                vs.append(v)
            held = held_eq.get((name, phase))
            if held is not None and held.count:
                output_reuse = torch.zeros(width + 1, width, dtype=torch.float64)
                output_reuse[:width] = -torch.eye(width, dtype=torch.float64)
                errors["fitted"] += held.error(coeffs, gain)
                errors["identity"] += held.error(torch.zeros_like(coeffs))
                errors["output_reuse"] += held.error(output_reuse)
        all_errors[name] = errors
        fitted_gains = torch.tensor(gains, dtype=torch.float32) if any(gains) else None
        bias = torch.stack(biases).float()
        if us:
            maps[name] = LinearApproximator(u=torch.stack(us).float(), v=torch.stack(vs).float(), bias=bias,
                                            velocity_gain=fitted_gains)
        else:
            maps[name] = LinearApproximator(correction=torch.stack(corrections).float(), bias=bias,
                                            velocity_gain=fitted_gains)
    return maps, all_errors


def _totals(errors: dict[str, dict[str, float]]) -> dict[str, float]:
    totals = {"fitted": 0.0, "identity": 0.0, "output_reuse": 0.0}
    for per_map in errors.values():
        for key in totals:
            totals[key] += per_map[key]
    return totals


def _sweep_rank(sweep: list[dict[str, Any]], best: dict[str, Any]) -> tuple[float, float]:
    """Sort key of a sweep's chosen setting: least compute, then highest PSNR."""
    row = next(r for r in sweep if r["tolerance"] == best["tolerance"] and r["max_skip_steps"] == best["max_skip_steps"])
    return round(row["mac_fraction"], 3), -row["psnr_db"]


def _default_save_path(transformer: torch.nn.Module) -> Path | None:
    source = getattr(transformer.config, "_name_or_path", None)
    if source and Path(source).is_dir():
        return Path(source) / CALIBRATION_FILENAME
    return None


def _tune_defaults(pipe: Any, approximators: ApproximatorSet, prompts: list[Any], call_args: dict[str, Any],
                   tolerances: Sequence[float], max_skip_steps: Sequence[int], target_psnr: float, samples: int,
                   seed: int, progress: bool) -> tuple[dict[str, Any], list[dict[str, float]]]:
    """The (tolerance, max_skip_steps) with the lowest MAC fraction whose mean PSNR vs. uncached images
    is at least ``target_psnr``; ties go to the higher PSNR. Falls back to the most careful setting."""
    from fastcache_core.cache import apply_fastcache
    from fastcache_core.config import CacheParams, FastCacheConfig
    from fastcache_core.quality import mean_finite, psnr

    inputs = pipeline_inputs(pipe, prompts[:samples])
    reference = pipe(**inputs, generator=torch.Generator().manual_seed(seed), **call_args).images
    settings = [(t, k) for k in sorted(max_skip_steps) for t in sorted(tolerances)]
    sweep = []
    for tolerance, skips in tqdm(settings, desc="default sweep", disable=not progress):
        params = CacheParams(tolerance=tolerance, max_skip_steps=skips)
        cache = apply_fastcache(pipe.transformer, FastCacheConfig(calibration=approximators, params=params))
        try:
            cache.set_run(num_steps=call_args["num_inference_steps"])
            images = pipe(**inputs, generator=torch.Generator().manual_seed(seed), **call_args).images
            stats = cache.stats()
        finally:
            cache.remove()
        sweep.append({"tolerance": tolerance, "max_skip_steps": skips, "psnr_db": mean_finite(psnr(images, reference)),
                      "mac_fraction": float(np.mean([s.mac_fraction for s in stats]))})
    good = [row for row in sweep if row["psnr_db"] >= target_psnr]
    if good:
        best = min(good, key=lambda row: (round(row["mac_fraction"], 3), -row["psnr_db"]))
    else:
        best = sweep[0]
    return {"tolerance": best["tolerance"], "max_skip_steps": best["max_skip_steps"]}, sweep


def main(argv: list[str] | None = None) -> None:
    """``python -m fastcache_core.calibration --model DIR``: calibrate a local pipeline directory."""
    import argparse
    import json

    from diffusers import DiffusionPipeline

    parser = argparse.ArgumentParser(description="Fit FastCache's linear maps for a local diffusers pipeline.")
    parser.add_argument("--model", required=True, help="pipeline directory (the calibration is saved in its transformer/)")
    parser.add_argument("--prompts", nargs="*", help="calibration prompts (labels for DiT); default: every label")
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--guidance-scale", type=float, default=None)
    parser.add_argument("--target-psnr", type=float, default=30.0)
    parser.add_argument("--tune-samples", type=int, default=8, help="images of the default-setting sweep")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    pipe = DiffusionPipeline.from_pretrained(args.model)
    pipe.set_progress_bar_config(disable=True)
    _, report = calibrate(pipe, args.prompts, num_samples=args.samples, batch_size=args.batch_size,
                          num_inference_steps=args.steps, guidance_scale=args.guidance_scale,
                          target_psnr=args.target_psnr, tune_samples=args.tune_samples)
    print(json.dumps({"velocity_gain": report.velocity_gain, "heldout_errors": report.summary(),
                      "candidate_heldout_errors": report.candidate_errors, "default_params": report.default_params,
                      "tolerance_sweep": report.tolerance_sweep}, indent=2))


if __name__ == "__main__":
    main()
