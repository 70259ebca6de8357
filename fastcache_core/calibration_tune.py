"""Calibration's end-to-end part: measure the reuse velocity of FastCache's test, then choose the rule
variant and the default tolerance on a grid of step counts and guidance scales.

* **Reuse velocity** ``v``: FastCache runs at the calibration's step count and guidance on the tuning
  seeds; each sample's guided reuse error at its second compute, per unit of normalized time, is
  measured (``drift_ratio`` against a provisional ``v = 1``); ``v`` is their median, so a typical
  sample of the calibration sits at ``r = 1``.
* **Grid sweep.** For each rule variant (a warm-up: the share of the run computed in full first; the
  per-sample test on or off; unit or fitted forecast gain) and each candidate tolerance, every cell
  of the grid (steps x guidance) runs the tuning images and is compared with the uncached images of
  the same seeds. A variant's default tolerance is the largest one whose every cell keeps a mean PSNR
  of at least ``target_psnr`` and a worst image of at least ``floor_psnr``; the variant kept is the
  one that computes least (grid-average MAC fraction) at its default, ties to the better worst cell.
  So the default is chosen where it runs: on every cell of the grid, not at one operating point.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from fastcache_core.profile import CacheProfile

DEFAULT_WINDOWS = (0.06, 0.08, 0.10, 0.12, 0.14, 0.17, 0.20, 0.24)
"""Windows (normalized time) a typical sample keeps at the swept tolerances (``window_scale h^2``)."""
DEFAULT_WARMUPS = (0.0, 0.4)
"""Warm-ups (share of the run computed in full) the sweep tries: none, and the 0.4 a model whose
composition is decided early needs (measured on the canvas model: forecasting in the first 40% of
the run makes a different image there, and only there)."""
UNCAPPED_SKIP_STEPS = 100
"""FastCache's calibrated ``max_skip_steps``: windows are counted in time, not capped in steps."""


@dataclass
class GridSweep:
    """Every variant x tolerance x cell the tuning ran, and what it chose."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    chosen: dict[str, Any] = field(default_factory=dict)


RunImages = Callable[[int, float, CacheProfile | None, float], tuple[torch.Tensor, list[Any]]]
"""``(steps, guidance, profile or None for uncached, tolerance) -> (images, per-sample stats)``."""


def reuse_velocity(
    run: RunImages, profile: CacheProfile, steps: int, guidance: float, tolerance: float, warmup: float = 0.0
) -> float | None:
    """The median guided reuse error per unit of normalized time of the tuning samples (``v``), with the
    rule's ``warmup`` (with one the test's second compute is the next step, so ``v`` is measured so)."""
    probe = _with_rule(profile, {"reuse_velocity": 1.0, "warmup": warmup})
    _, stats = run(steps, guidance, probe, tolerance)
    ratios = [s.details["drift_ratio"] for s in stats if s.details.get("drift_ratio")]
    return float(statistics.median(ratios)) if ratios else None


def sweep_grid(
    run: RunImages,
    variants: dict[str, CacheProfile],
    tolerances: Sequence[float],
    cells: Sequence[tuple[int, float]],
    target_psnr: float,
    floor_psnr: float,
    progress: bool,
) -> GridSweep:
    """Run every variant x tolerance x cell against uncached references; choose variant and default."""
    from fastcache_core.quality import psnr

    references = {cell: run(cell[0], cell[1], None, 0.0)[0] for cell in cells}
    sweep = GridSweep()
    jobs = [(name, tol, cell) for name in variants for tol in sorted(tolerances) for cell in cells]
    for name, tolerance, (steps, guidance) in tqdm(jobs, desc="grid sweep", disable=not progress):
        images, stats = run(steps, guidance, variants[name], tolerance)
        values = psnr(images, references[(steps, guidance)]).clamp(max=100.0)
        sweep.rows.append(
            {
                "variant": name,
                "tolerance": tolerance,
                "steps": steps,
                "guidance": guidance,
                "psnr_db": float(values.mean()),
                "psnr_min_db": float(values.min()),
                "mac_fraction": float(np.mean([s.mac_fraction for s in stats])),
            }
        )
    sweep.chosen = choose_default(sweep.rows, target_psnr, floor_psnr)
    return sweep


def choose_default(rows: list[dict[str, Any]], target_psnr: float, floor_psnr: float) -> dict[str, Any]:
    """The variant and tolerance that compute least while every cell meets the floors (see the module
    docstring); without any that meets them, the best worst cell."""
    settings: dict[tuple[str, float], list[dict[str, Any]]] = {}
    for row in rows:
        settings.setdefault((row["variant"], row["tolerance"]), []).append(row)

    def summary(key: tuple[str, float]) -> dict[str, Any]:
        cells = settings[key]
        return {
            "variant": key[0],
            "tolerance": key[1],
            "grid_mac_fraction": float(np.mean([c["mac_fraction"] for c in cells])),
            "worst_cell_psnr_db": min(c["psnr_db"] for c in cells),
            "worst_image_psnr_db": min(c["psnr_min_db"] for c in cells),
            "grid_psnr_db": float(np.mean([c["psnr_db"] for c in cells])),
        }

    summaries = [summary(key) for key in settings]
    good = [s for s in summaries if s["worst_cell_psnr_db"] >= target_psnr and s["worst_image_psnr_db"] >= floor_psnr]
    if good:
        return min(good, key=lambda s: (round(s["grid_mac_fraction"], 3), -s["worst_cell_psnr_db"]))
    return max(summaries, key=lambda s: s["worst_cell_psnr_db"])


def _with_rule(profile: CacheProfile, changes: dict[str, Any]) -> CacheProfile:
    rule = {**(profile.metadata.get("fastcache_rule") or {}), **changes}
    return CacheProfile(
        profile.num_phases,
        profile.forecast_gain,
        profile.error_floor,
        profile.tolerance_weight,
        {**profile.metadata, "fastcache_rule": rule},
    )


def rule_variants(
    profile: CacheProfile,
    gains: torch.Tensor,
    velocity: float | None,
    gain_modes: Sequence[str] = ("unit", "fitted"),
    warmup: float = 0.0,
) -> dict[str, CacheProfile]:
    """The variants the sweep compares at one ``warmup``: the test on (when a velocity was measured) or
    off, each gain of ``gain_modes`` (unit or fitted). Names carry the warm-up when there is one."""
    variants: dict[str, CacheProfile] = {}
    known = {"unit": None, "fitted": gains}
    suffix = f", warm-up {warmup:g}" if warmup > 0.0 else ""
    for test in [True, False] if velocity else [False]:
        for gain_name in gain_modes:
            gain = known[gain_name]
            variant = _with_rule(profile, {"reuse_velocity": velocity if test else None, "warmup": warmup})
            variant.forecast_gain = gain
            variants[f"test {'on' if test else 'off'}, {gain_name} gain{suffix}"] = variant
    return variants


def format_grid(rows: list[dict[str, Any]], variant: str, tolerance: float) -> str:
    """The chosen setting's cells as a small text table (``fastcache-calibrate`` prints it)."""
    lines = ["steps  guidance  PSNR mean / worst (dB)  MAC fraction"]
    for r in rows:
        if r["variant"] == variant and r["tolerance"] == tolerance:
            lines.append(
                f"{r['steps']:>5}  {r['guidance']:>8g}  {r['psnr_db']:>10.1f} / {r['psnr_min_db']:<5.1f}"
                f"        {r['mac_fraction']:.3f}"
            )
    return "\n".join(lines)
