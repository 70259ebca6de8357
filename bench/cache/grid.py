"""``python -m bench.cache --grid``: quality and compute over cells of steps x guidance, not one point.

Every cell (a step count and a guidance scale, at the model's default size) generates the same
images (label ``i % 10``, seed ``grid seed + i``) uncached and with each method, and measures per
method: mean PSNR against the uncached image of the same seed, the worst image's PSNR, SSIM and the
measured MAC fraction (FLOPs counted as in the Pareto run). Nothing is timed: the grid is about what
a method keeps and spends, which CPU sharing does not change.

Methods: FastCache's default (``apply_fastcache(transformer, FastCacheConfig())``, the rule main ships;
plus ``--tolerances`` when given), and TaylorSeer's fixed schedules, warm-ups x intervals, per sample
and as diffusers' hook (``bench.cache.schedules``). Over the grid each method gets its grid mean (mean
of the cell means), its worst cell (lowest cell mean), its worst image and its grid-average MAC
fraction (mean of the cell fractions). ``best_fixed_schedule`` is the fixed schedule that does best
on the grid at FastCache's grid-average MAC fraction (``schedules.best_fixed_schedule``).

Seeds: the grid's images use seeds ``GRID_SEED + i``, none of the seeds calibration draws from
(``CALIBRATION_SEEDS``), so the tuning images are never the benchmark's.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
from pathlib import Path
from typing import Any

import torch

from bench.cache.report import worst_image_psnr
from bench.cache.runner import ImageRunner, Measured, counted_run
from bench.cache.schedules import best_fixed_schedule, diffusers_variants, per_sample_variants
from bench.cache.variant import Variant
from bench.cache.variants import fastcache_variant
from bench.common import clean_number
from fastcache_core.calibration import FIT_SEED, TUNE_SEED_OFFSET

log = logging.getLogger(__name__)

GRID_CELLS: dict[str, tuple[tuple[int, ...], tuple[float, ...]]] = {
    "digits-dit": ((10, 20, 50, 100), (1.5, 4.0)),
    "canvas-dit": ((20, 50, 100), (2.0, 4.0)),
}
"""Default (steps, guidance scales) per bundled model, by directory name; other models take the
digits model's."""
GRID_SAMPLES = 8
"""Images per cell by default (``--quick``: 2)."""
GRID_SEED = 0
"""Seed of the grid's image 0 by default: image ``i`` uses ``GRID_SEED + i`` (the benchmark's seeds)."""
CALIBRATION_SEEDS = frozenset(range(FIT_SEED, FIT_SEED + 2 * TUNE_SEED_OFFSET))
"""Generator seeds ``fastcache-calibrate`` draws from with its defaults: the streamed fit seeds batch
``b`` with ``FIT_SEED + b`` and tuning image ``i`` with ``FIT_SEED + TUNE_SEED_OFFSET + i``
(``fastcache_core.calibration``): 10,000 to 29,999 holds both."""
MAGCACHE_SEED = 1_000_000
"""MagCache's calibration images use seeds from here on (``bench.cache.variants``)."""
GRID_ROW_KEYS = ("method", "params", "steps", "guidance", "mac_fraction", "psnr_db", "psnr_min_db", "ssim")
SUMMARY_KEYS = (
    "method",
    "label",
    "params",
    "grid_mean_psnr_db",
    "worst_cell_psnr_db",
    "psnr_min_db",
    "grid_mac_fraction",
)


def default_cells(model: str) -> tuple[list[int], list[float]]:
    """The model's default grid: its entry in ``GRID_CELLS`` by directory name, else the digits model's."""
    steps, guidance = GRID_CELLS.get(Path(model.rstrip("/")).name, GRID_CELLS["digits-dit"])
    return list(steps), list(guidance)


def grid_seeds(seed: int, samples: int) -> list[int]:
    """The grid's seeds; a warning when any is one calibration or MagCache's calibration draws from."""
    seeds = [seed + i for i in range(samples)]
    shared = sorted(s for s in seeds if s in CALIBRATION_SEEDS or MAGCACHE_SEED <= s < MAGCACHE_SEED + 100)
    if shared:
        log.warning("grid seeds %s are also calibration seeds: the tuning images are among the benchmark's", shared)
    return seeds


def grid_variants(transformer: torch.nn.Module, args: argparse.Namespace) -> tuple[list[Variant], dict[str, Any]]:
    """FastCache's default (and ``--tolerances``), then TaylorSeer's schedules per sample and as diffusers'
    hook, as ``--methods`` allows."""
    from fastcache_core import FastCacheConfig, apply_fastcache

    probe = apply_fastcache(transformer, FastCacheConfig(calibration=args.calibration))
    defaults = probe.default_params.to_dict()
    info = {"calibrated": bool(probe.calibrated), "default_params": defaults}
    probe.remove()
    variants: list[Variant] = []
    if "fastcache" in args.methods:
        tau = float(defaults["tolerance"])
        context = (defaults, info["calibrated"], args.calibration)
        variants.append(
            fastcache_variant(f"default (tau={tau:g})", {}, {"setting": "default"}, *context, explicit=False)
        )
        for t in args.tolerances or []:
            params = {"method": "fastcache", "tolerance": t}
            variants.append(fastcache_variant(f"tau={t:g}", params, {"setting": "tolerance_sweep"}, *context))
    if "taylorseer" in args.methods:
        variants += per_sample_variants(args.taylorseer_warmups, args.taylorseer_intervals, args.calibration)
        if not getattr(args, "no_taylorseer_hook", False):
            variants += diffusers_variants(args.taylorseer_warmups, args.taylorseer_intervals)
    return variants, info


def cell_row(variant: Variant, steps: int, guidance: float, result: Measured, reference: Measured) -> dict[str, Any]:
    """One method at one cell (keys ``GRID_ROW_KEYS``)."""
    from fastcache_core.quality import mean_finite, psnr, ssim

    per_image = psnr(result.images, reference.images)
    row = {
        "method": variant.method,
        "params": {"label": variant.label, **variant.params},
        "steps": steps,
        "guidance": guidance,
        "mac_fraction": clean_number(result.flops / reference.flops if reference.flops > 0 else None, 4),
        "psnr_db": clean_number(mean_finite(per_image), 3),
        "psnr_min_db": clean_number(worst_image_psnr(per_image), 3),
        "ssim": clean_number(float(ssim(result.images, reference.images).mean()), 5),
    }
    assert tuple(row) == GRID_ROW_KEYS
    return row


def summarize(method: str, label: str, params: dict[str, Any], rows: list[dict[str, Any]]) -> dict[str, Any]:
    """A method's figures over the grid from its cell rows (keys ``SUMMARY_KEYS``)."""

    def values(key: str) -> list[float]:
        return [r[key] for r in rows if r[key] is not None]

    means, worst, macs = values("psnr_db"), values("psnr_min_db"), values("mac_fraction")
    return {
        "method": method,
        "label": label,
        "params": params,
        "grid_mean_psnr_db": clean_number(statistics.fmean(means), 3) if means else None,
        "worst_cell_psnr_db": clean_number(min(means), 3) if means else None,
        "psnr_min_db": clean_number(min(worst), 3) if worst else None,
        "grid_mac_fraction": clean_number(statistics.fmean(macs), 4) if len(macs) == len(rows) and macs else None,
    }


def run_grid(args: argparse.Namespace, ref_pipe: Any, bench_pipe: Any, device: str) -> dict[str, Any]:
    """Measure every method in every cell; the rows, the per-method summaries and ``best_fixed_schedule``."""
    from tqdm.auto import tqdm

    variants, info = grid_variants(bench_pipe.transformer, args)
    cells = [(steps, guidance) for steps in args.grid_steps for guidance in args.grid_guidance]
    seeds = grid_seeds(args.seed, args.samples)
    labels = [i % 10 for i in range(args.samples)]
    reference_variant = Variant("none", "uncached", {"setting": "reference"}, None, key=("none",))
    bar = tqdm(
        total=len(cells) * (len(variants) + 1),
        desc="cells x methods",
        unit="run",
        file=sys.stderr,
        disable=args.no_progress,
        dynamic_ncols=True,
    )
    rows: list[dict[str, Any]] = []
    for steps, guidance in cells:
        gen = ImageRunner(labels, seeds, steps, guidance, args.batch_size, device)
        warm_steps = min(steps, 3)
        bar.set_postfix_str(f"{steps} steps, guidance {guidance:g}: uncached")
        reference, _ = counted_run(gen, ref_pipe, reference_variant, warm_steps)
        bar.update(1)
        for variant in variants:
            bar.set_postfix_str(f"{steps} steps, guidance {guidance:g}: {variant.method} {variant.label}")
            result, handle = counted_run(gen, bench_pipe, variant, warm_steps)
            handle.remove()
            rows.append(cell_row(variant, steps, guidance, result, reference))
            bar.update(1)
    bar.close()

    summaries = []
    for variant in variants:
        mine = [r for r in rows if r["params"]["label"] == variant.label and r["method"] == variant.method]
        summaries.append(summarize(variant.method, variant.label, variant.params, mine))
    fastcache_default = next(
        (s for s in summaries if s["method"] == "fastcache" and s["params"].get("setting") == "default"), None
    )
    budget = fastcache_default["grid_mac_fraction"] if fastcache_default else None
    best = best_fixed_schedule(summaries, budget)
    if best is not None:
        chosen = {
            "implementation": best["params"]["implementation"],
            "warmup_steps": best["params"]["warmup_steps"],
            "cache_interval": best["params"]["cache_interval"],
            "chosen_from": best["label"],
            "within_budget": best["within_budget"],
            "budget_mac_fraction": best["budget_mac_fraction"],
        }
        label = f"warm-up={chosen['warmup_steps']} interval={chosen['cache_interval']} ({chosen['implementation']})"
        best_rows = [
            {**r, "method": "best_fixed_schedule", "params": {"label": label, **chosen}}
            for r in rows
            if r["method"] == "taylorseer" and r["params"]["label"] == best["label"]
        ]
        rows += best_rows
        summaries.append(summarize("best_fixed_schedule", label, chosen, best_rows))
    return {
        "rows": rows,
        "summary": summaries,
        "best_fixed_schedule": summaries[-1] if best is not None else None,
        "cells": [{"steps": s, "guidance": g} for s, g in cells],
        "settings": {
            "model": args.model,
            "samples": args.samples,
            "seeds": [seeds[0], seeds[-1]],
            "labels": "i % 10",
            "calibrated": info["calibrated"],
            "default_params": info["default_params"],
            "taylorseer_warmups": list(args.taylorseer_warmups),
            "taylorseer_intervals": list(args.taylorseer_intervals),
        },
    }
