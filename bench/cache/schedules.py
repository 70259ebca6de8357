"""TaylorSeer's fixed schedules: the sweep of warm-ups x intervals, its best warm-up on a Pareto run,
and the best single schedule on a grid.

A fixed schedule computes the first ``warmup`` steps, then step ``warmup + 1`` and every ``interval``-th
step after it (``fastcache_core.decisions.taylorseer_computes``, diffusers' schedule); between computes
the block outputs are forecast to first order. Two implementations run every schedule:

* ``"fastcache per-sample"``: ``CacheParams(method="taylorseer", max_skip_steps=interval - 1)`` with
  ``FastCacheConfig(first_steps=warmup)``, TaylorSeer as a per-sample method inside FastCache's
  machinery (a request's choice in a shared batch);
* ``"diffusers"``: diffusers' ``TaylorSeerCache`` hook, ``cache_interval=interval``,
  ``disable_cache_before_step=warmup``, whole blocks predicted.

Both produce the same images (a test checks it); both are measured.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from bench.cache.variant import Variant

TAYLORSEER_WARMUPS = (1, 2, 3)
"""Warm-up computes swept (diffusers' default is 3)."""
TAYLORSEER_INTERVALS = (2, 3, 4, 5, 6, 7, 8)
"""Cache intervals swept: a compute every ``interval`` steps after the warm-up."""
PER_SAMPLE = "fastcache per-sample"
DIFFUSERS = "diffusers"


def schedule_of(row_params: dict[str, Any]) -> tuple[int, int]:
    """(warm-up, interval) of a TaylorSeer row's params."""
    return int(row_params["warmup_steps"]), int(row_params["cache_interval"])


def per_sample_variants(warmups: Sequence[int], intervals: Sequence[int], calibration: str | None) -> list[Variant]:
    """Per-sample TaylorSeer inside FastCache at every (warm-up, interval)."""
    from fastcache_core import CacheParams, FastCacheConfig, apply_fastcache

    variants = []
    for warmup, interval in _schedules(warmups, intervals):
        params = {"method": "taylorseer", "tolerance": 1.0, "max_skip_steps": interval - 1}
        variants.append(
            Variant(
                "taylorseer",
                f"per-sample warm-up={warmup} interval={interval} order=1",
                {"implementation": PER_SAMPLE, "cache_interval": interval, "warmup_steps": warmup, **params},
                lambda t, p=params, w=warmup: apply_fastcache(
                    t, FastCacheConfig(params=CacheParams(**p), first_steps=w, calibration=calibration)
                ),
                is_fastcache=True,
                key=("taylorseer-per-sample", warmup, interval),
            )
        )
    return variants


def diffusers_variants(warmups: Sequence[int], intervals: Sequence[int]) -> list[Variant]:
    """diffusers' TaylorSeer hook (first order, whole blocks) at every (warm-up, interval)."""
    from bench.peers import apply_peer

    variants = []
    for warmup, interval in _schedules(warmups, intervals):
        setting = {"cache_interval": interval, "disable_cache_before_step": warmup, "max_order": 1}
        variants.append(
            Variant(
                "taylorseer",
                f"warm-up={warmup} interval={interval} order=1",
                {"implementation": DIFFUSERS, "warmup_steps": warmup, **setting},
                lambda t, s=setting: apply_peer(t, "taylorseer", **s),
                key=("taylorseer", tuple(setting.items())),
            )
        )
    return variants


def _schedules(warmups: Sequence[int], intervals: Sequence[int]) -> list[tuple[int, int]]:
    return [(w, i) for w in warmups for i in intervals]


def best_warmups(rows: list[dict[str, Any]], mac_fraction: float | None) -> dict[str, dict[str, Any]]:
    """Per implementation, the warm-up whose interval sweep has the highest PSNR at ``mac_fraction``
    (FastCache default's), linearly interpolated along the sweep's MAC fractions (the end point
    nearest to it where it lies outside the sweep). Returns ``{implementation: {"warmup_steps",
    "psnr_db_at_mac", "mac_fraction"}}``; empty without a MAC fraction to compare at."""
    if mac_fraction is None:
        return {}
    best: dict[str, dict[str, Any]] = {}
    curves: dict[tuple[str, int], list[tuple[float, float]]] = {}
    for row in rows:
        params = row["params"]
        if row["method"] != "taylorseer" or row["mac_fraction"] is None or row["psnr_db"] is None:
            continue
        curves.setdefault((params["implementation"], int(params["warmup_steps"])), []).append(
            (row["mac_fraction"], row["psnr_db"])
        )
    for (implementation, warmup), points in sorted(curves.items()):
        points.sort()
        value = float(np.interp(mac_fraction, [p[0] for p in points], [p[1] for p in points]))
        if implementation not in best or value > best[implementation]["psnr_db_at_mac"]:
            best[implementation] = {"warmup_steps": warmup, "psnr_db_at_mac": value, "mac_fraction": mac_fraction}
    return best


def best_fixed_schedule(summaries: list[dict[str, Any]], budget: float | None) -> dict[str, Any] | None:
    """The single fixed schedule that does best on the grid at FastCache's grid-average MAC fraction
    ``budget``: among the schedules (summaries of TaylorSeer rows: ``params``, ``grid_mac_fraction``,
    ``grid_mean_psnr_db``, ``worst_cell_psnr_db``) that spend at most ``budget``, the highest grid-mean
    PSNR, ties broken by the higher worst cell. A schedule given more compute than FastCache could win
    by spending it, so none competes above the budget; when every schedule spends more, the cheapest is
    taken and marked ``"within_budget": False``. ``None`` without schedules or a budget."""
    schedules = [s for s in summaries if s["method"] == "taylorseer" and s["grid_mac_fraction"] is not None]
    if not schedules or budget is None:
        return None
    within = [s for s in schedules if s["grid_mac_fraction"] <= budget + 1e-9]
    if within:
        chosen = max(within, key=lambda s: (s["grid_mean_psnr_db"], s["worst_cell_psnr_db"]))
    else:
        chosen = min(schedules, key=lambda s: (s["grid_mac_fraction"], -s["grid_mean_psnr_db"]))
    return {**chosen, "within_budget": bool(within), "budget_mac_fraction": budget}


def mark_best_warmups(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """On a Pareto run's rows: set ``params["best_warmup"]`` on every TaylorSeer row (whether its warm-up
    is its implementation's best at FastCache default's MAC fraction, ``best_warmups``) and return the
    best warm-up per implementation."""
    default = next((r for r in rows if r["method"] == "fastcache" and r["params"].get("setting") == "default"), None)
    best = best_warmups(rows, default["mac_fraction"] if default else None)
    for row in rows:
        found = best.get(row["params"].get("implementation", ""))
        if row["method"] == "taylorseer" and found is not None:
            row["params"]["best_warmup"] = int(row["params"]["warmup_steps"]) == found["warmup_steps"]
    return best
