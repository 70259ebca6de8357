"""The rows ``bench.cache`` measures: each method at each setting, and how to attach it to a transformer.

FastCache (calibrated default, tolerance sweep, ablations), the per-sample peers inside FastCache's
machinery (TaylorSeer, TeaCache), diffusers' hooks (First-Block-Cache, TaylorSeer, PAB, MagCache,
SeaCache) and cache-dit's DBCache (optional package).
"""

from __future__ import annotations

import argparse
import itertools
import logging
import math
from typing import Any

import torch

from bench.cache.variant import Variant

METHOD_NAMES = ("none", "fastcache", "fbcache", "teacache", "taylorseer", "pab", "magcache", "seacache", "cachedit")
SWEEP_HORIZONS = (2, 3, 4, 5, 6, 7, 8)
"""Default FastCache sweep of a calibrated model: the tolerances whose window is this many steps at the
calibration's step count (``tolerance = drift_scale * h^2`` = ``window_scale * (h / steps)^2``; the rule
is in ``fastcache_core.methods.fastcache``)."""
UNCALIBRATED_TOLERANCES = (0.005, 0.01, 0.02, 0.05, 0.1)
DEFAULT_TEACACHE_THRESHOLDS = (0.05, 0.1, 0.2)
FBCACHE_THRESHOLDS = (0.05, 0.1)
PAB_SETTINGS = (
    {"block_skip_range": 2, "timestep_skip_range": [100, 800]},
    {"block_skip_range": 4, "timestep_skip_range": [100, 800]},
)
# peers' settings chosen to span MAC fractions ~0.15-0.5 on models/digits-dit (50 DDIM steps, guidance 1.5)
MAGCACHE_SETTINGS = (
    {"threshold": 0.06, "max_skip_steps": 3, "retention_ratio": 0.2},  # diffusers' defaults
    {"threshold": 0.24, "max_skip_steps": 3, "retention_ratio": 0.1},
    {"threshold": 0.8, "max_skip_steps": 8, "retention_ratio": 0.04},
)
MAGCACHE_CALIBRATION_IMAGES = 10  # labels 0..9, seeds from MAGCACHE_CALIBRATION_SEED on, none of the benchmark's
MAGCACHE_CALIBRATION_SEED = 1_000_000
SEACACHE_SETTINGS = (
    {"threshold": 0.25, "max_consecutive_cached": 2},  # diffusers' defaults
    {"threshold": 0.5, "max_consecutive_cached": 4},
    {"threshold": 0.75, "max_consecutive_cached": 8},
)
CACHEDIT_SETTINGS = (
    {"threshold": 0.2, "max_warmup_steps": 4, "max_continuous_cached_steps": 2},
    {"threshold": 0.3, "max_warmup_steps": 4, "max_continuous_cached_steps": 3},
    {"threshold": 1.0, "max_warmup_steps": 4, "max_continuous_cached_steps": 6},
)
ABLATION_MERGE_RATIO = 0.25
ABLATION_MOTION_FRACTIONS = (0.75, 0.5)
REFRESH_FRACTIONS = (0.125, 0.25)
REFRESH_HORIZONS = (3, 4)
"""Token refresh rows: these shares of tokens refreshed at every forecast step, on the block cache at the
tolerances where a typical sample refreshes every 3 and 4 steps (compare with the sweep at equal MACs)."""

log = logging.getLogger(__name__)


def _fastcache_config(params: dict[str, Any] | None, use_calibration: bool, calibration: str | None):
    from fastcache_core import CacheParams, FastCacheConfig

    cache_params = CacheParams(**params) if params else CacheParams()
    return FastCacheConfig(params=cache_params, use_calibration=use_calibration, calibration=calibration)


def fastcache_variant(
    label: str,
    params: dict[str, Any],
    meta: dict[str, Any],
    defaults: dict[str, Any],
    calibrated: bool,
    calibration: str | None,
    use_calibration: bool = True,
    explicit: bool = True,
) -> Variant:
    """A FastCache row: the library's default params (``defaults``, as resolved) updated by ``params``.

    ``explicit=False`` attaches ``FastCacheConfig()`` without params, so the row runs whatever default
    rule the library ships; ``params`` then only names it."""
    from fastcache_core import apply_fastcache

    resolved = {**defaults, **params}
    effective_calibration = use_calibration and calibrated
    config_params = resolved if explicit else None
    return Variant(
        "fastcache",
        label,
        {**meta, "calibrated": effective_calibration, **resolved},
        lambda t, p=config_params, u=use_calibration: apply_fastcache(t, _fastcache_config(p, u, calibration)),
        is_fastcache=True,
        key=("fastcache", effective_calibration, tuple(sorted(resolved.items()))),
    )


def build_variants(
    transformer: torch.nn.Module, args: argparse.Namespace, pipe: Any = None
) -> tuple[list[Variant], dict[str, Any]]:
    """The rows to measure, and facts about the calibration (for the report).

    ``pipe`` (the pipeline around ``transformer``) gives MagCache its calibration runs and the peers
    their scheduler; without it the ``magcache``, ``seacache`` and ``cachedit`` rows are left out."""
    from bench.cache.schedules import diffusers_variants, per_sample_variants
    from bench.peers import apply_peer
    from fastcache_core import apply_fastcache

    probe = apply_fastcache(transformer, _fastcache_config(None, True, args.calibration))
    defaults = probe.default_params.to_dict()
    calibrated = bool(probe.calibrated)
    metadata = dict(probe.profile.metadata)
    drift_scale = probe.profile.drift_scale
    probe.remove()
    if args.tolerances is None:
        args.tolerances = (
            [round(drift_scale * h * h, 6) for h in SWEEP_HORIZONS] if drift_scale else list(UNCALIBRATED_TOLERANCES)
        )
    tea_polynomial = "calibrated" if metadata.get("teacache_coefficients") else "identity"
    info = {"calibrated": calibrated, "default_params": defaults, "teacache_polynomial": tea_polynomial}

    def fastcache(
        label: str, params: dict[str, Any], meta: dict[str, Any], use_calibration: bool = True, explicit: bool = True
    ) -> Variant:
        return fastcache_variant(
            label,
            params,
            meta,
            defaults,
            calibrated,
            args.calibration,
            use_calibration=use_calibration,
            explicit=explicit,
        )

    variants = [Variant("none", "uncached", {"setting": "reference"}, None, key=("none",))]
    tau = float(defaults["tolerance"])
    calibrated_tokens = defaults["motion_threshold"] > 0 or defaults["motion_fraction"] < 1
    token_settings = (
        [{"motion_threshold": defaults["motion_threshold"], "motion_fraction": defaults["motion_fraction"]}]
        if calibrated_tokens
        else [{"motion_threshold": 0.0, "motion_fraction": f} for f in ABLATION_MOTION_FRACTIONS]
    )
    merge = defaults["merge_ratio"] if defaults["merge_ratio"] > 0 else ABLATION_MERGE_RATIO

    def token_label(tokens: dict[str, float]) -> str:
        if tokens["motion_fraction"] < 1:
            return f"motion fraction {tokens['motion_fraction']:g}"
        return f"motion threshold {tokens['motion_threshold']:g}"

    # FastCache: the calibrated default, a tolerance sweep around it, and the ablations
    variants.append(fastcache(f"default (tau={tau:g})", {}, {"setting": "default"}, explicit=False))
    for t in args.tolerances:
        if not math.isclose(t, tau):
            variants.append(
                fastcache(f"tau={t:g}", {"method": "fastcache", "tolerance": t}, {"setting": "tolerance_sweep"})
            )
    variants.append(
        fastcache(
            f"block cache only (tau={tau:g})",
            {"method": "fastcache", "motion_threshold": 0.0, "motion_fraction": 1.0, "merge_ratio": 0.0},
            {"setting": "ablation", "ablation": "block_cache_only"},
        )
    )
    for tokens in token_settings:
        variants.append(
            fastcache(
                f"token selection only, {token_label(tokens)} (tau=0)",
                {"method": "fastcache", "tolerance": 0.0, "merge_ratio": 0.0, **tokens},
                {"setting": "ablation", "ablation": "token_selection_only"},
            )
        )
        variants.append(
            fastcache(
                f"block cache + {token_label(tokens)}",
                {"method": "fastcache", "merge_ratio": 0.0, **tokens},
                {"setting": "ablation", "ablation": "block_cache+token_selection"},
            )
        )
    variants.append(
        fastcache(
            f"block cache + {token_label(token_settings[0])} + merge {merge:g}",
            {"method": "fastcache", "merge_ratio": merge, **token_settings[0]},
            {"setting": "ablation", "ablation": "block_cache+token_selection+merge"},
        )
    )
    variants.append(
        fastcache(
            f"block cache + merge {merge:g}",
            {"method": "fastcache", "merge_ratio": merge, "motion_threshold": 0.0, "motion_fraction": 1.0},
            {"setting": "ablation", "ablation": "block_cache+merge"},
        )
    )
    refresh_tolerances = (
        [round(drift_scale * h * h, 6) for h in REFRESH_HORIZONS] if drift_scale else list(UNCALIBRATED_TOLERANCES[2:4])
    )
    for t in refresh_tolerances:
        for fraction in REFRESH_FRACTIONS:
            variants.append(
                fastcache(
                    f"block cache + token refresh {fraction:g} (tau={t:g})",
                    {"method": "fastcache", "tolerance": t, "refresh_fraction": fraction},
                    {"setting": "ablation", "ablation": "block_cache+token_refresh"},
                )
            )
    variants.append(
        fastcache(
            f"uncalibrated (tau={tau:g})",
            {"method": "fastcache"},
            {"setting": "ablation", "ablation": "uncalibrated"},
            use_calibration=False,
        )
    )

    # TaylorSeer as a per-sample method inside the cache (a request's choice in a shared batch), on the
    # same schedules as diffusers' rows (warm-ups x intervals), so it matches them
    variants.extend(per_sample_variants(args.taylorseer_warmups, args.taylorseer_intervals, args.calibration))

    # TeaCache inside FastCache (per sample); its polynomial comes from the calibration when present
    for thr in args.teacache_thresholds:
        params = {"method": "teacache", "tolerance": thr}
        variants.append(
            Variant(
                "teacache",
                f"thr={thr:g} ({tea_polynomial} poly)",
                {"setting": "threshold", "threshold": thr, "polynomial": tea_polynomial, **params},
                lambda t, p=params: apply_fastcache(t, _fastcache_config(p, True, args.calibration)),
                is_fastcache=True,
                key=("teacache", thr),
            )
        )

    # diffusers' own hooks
    for thr in FBCACHE_THRESHOLDS:
        variants.append(
            Variant(
                "fbcache",
                f"diffusers thr={thr:g}",
                {"implementation": "diffusers", "threshold": thr},
                lambda t, thr=thr: apply_peer(t, "fbcache", threshold=thr),
                key=("fbcache", thr),
            )
        )
    variants.extend(diffusers_variants(args.taylorseer_warmups, args.taylorseer_intervals))
    for setting in PAB_SETTINGS:
        low, high = setting["timestep_skip_range"]
        variants.append(
            Variant(
                "pab",
                f"skip range={setting['block_skip_range']} t in ({low},{high})",
                {"implementation": "diffusers", **setting},
                lambda t, s=setting: apply_peer(
                    t,
                    "pab",
                    block_skip_range=s["block_skip_range"],
                    timestep_skip_range=tuple(s["timestep_skip_range"]),
                ),
                key=("pab", setting["block_skip_range"], low, high),
            )
        )

    variants.extend(_more_peer_variants(args, pipe))

    wanted = set(args.methods)
    return [v for v in variants if v.method == "none" or v.method in wanted], info


def _more_peer_variants(args: argparse.Namespace, pipe: Any) -> list[Variant]:
    """MagCache and SeaCache (diffusers' hooks) and cache-dit's DBCache + TaylorSeer (optional package)."""
    from bench.peers import MagCacheCalibration, apply_peer, peer_unavailable_reason

    variants: list[Variant] = []
    wanted = set(args.methods)
    if pipe is None:
        if wanted & {"magcache", "seacache", "cachedit"}:
            log.warning("no pipeline given: magcache, seacache and cachedit rows are left out")
        return variants
    scheduler = pipe.scheduler
    # MagCache's magnitude ratios: calibrated once per run (on first use), on seeds the benchmark never uses
    bench_seeds = set(range(args.seed, args.seed + args.samples))
    seeds = list(
        itertools.islice(
            (s for s in itertools.count(MAGCACHE_CALIBRATION_SEED) if s not in bench_seeds), MAGCACHE_CALIBRATION_IMAGES
        )
    )
    labels = [i % 10 for i in range(MAGCACHE_CALIBRATION_IMAGES)]
    mag = MagCacheCalibration(pipe, args.model, labels, seeds)
    calibration = {"calibration_images": len(seeds), "calibration_seeds": [seeds[0], seeds[-1]]}
    for s in MAGCACHE_SETTINGS:
        variants.append(
            Variant(
                "magcache",
                f"thr={s['threshold']:g} K={s['max_skip_steps']} retention={s['retention_ratio']:g}",
                {"implementation": "diffusers", **s, **calibration},
                lambda t, s=s: apply_peer(
                    t, "magcache", mag_ratios=mag.ratios(args.steps, args.guidance), scheduler=scheduler, **s
                ),
                key=("magcache", tuple(s.items())),
            )
        )
    for s in SEACACHE_SETTINGS:
        variants.append(
            Variant(
                "seacache",
                f"thr={s['threshold']:g} max cached={s['max_consecutive_cached']} order=1",
                {"implementation": "diffusers", "residual_order": 1, **s},
                lambda t, s=s: apply_peer(t, "seacache", scheduler=scheduler, **s),
                key=("seacache", tuple(s.items())),
            )
        )
    unavailable = peer_unavailable_reason("cachedit")
    if unavailable:
        if "cachedit" in wanted:
            log.warning("cachedit rows skipped: %s", unavailable)
        return variants
    for s in CACHEDIT_SETTINGS:
        variants.append(
            Variant(
                "cachedit",
                f"DBCache F1B0 thr={s['threshold']:g} W={s['max_warmup_steps']} "
                f"max cached={s['max_continuous_cached_steps']} + TaylorSeer O1",
                {
                    "implementation": "cache-dit",
                    "fn_compute_blocks": 1,
                    "bn_compute_blocks": 0,
                    "taylorseer_order": 1,
                    **s,
                },
                lambda t, s=s: apply_peer(t, "cachedit", scheduler=scheduler, **s),
                key=("cachedit", tuple(s.items())),
            )
        )
    return variants
