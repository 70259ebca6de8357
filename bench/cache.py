"""``python -m bench.cache``: FastCache against its peers on one DiT pipeline: speed, compute, fidelity.

Every method generates the same images (label ``i % 10``, seed ``seed + i``, one generator per image
so each image depends only on its own seed) and is compared with the uncached pipeline:

* ``speedup``: uncached wall-clock / method wall-clock for the same images, each timed run of the
  method interleaved with a timed uncached run (order alternating), median of the ratios over
  ``--repeats``;
* ``mac_fraction``: transformer FLOPs of the method / uncached transformer FLOPs, both measured with
  ``torch.utils.flop_counter.FlopCounterMode`` around every transformer call of the same generation
  (everything the cache does inside or around the transformer is counted, its linear approximations
  included; the VAE and scheduler are not);
* ``psnr_db``, ``ssim``: mean over images against the uncached image of the same seed (identical
  images count as 100 dB);
* ``class_accuracy``, ``fid``: the bundled digit classifier (``DigitsJudge``): share of images
  classified as their label, and digits FID against held-out real digits (null without a judge);
* ``peak_mem_bytes``: CUDA ``max_memory_allocated`` over the method's timed runs, or on CPU the peak
  RSS of this process sampled by a background thread during them.

A method whose images are bit-identical to the uncached ones never engaged; its row is flagged
(``params["flag"]``, a note in the table, a warning) and ``--strict`` makes that an error.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import logging
import math
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from bench.common import (
    DEFAULT_MODEL,
    PeakMemory,
    clean_number,
    command_line,
    fmt,
    machine_description,
    markdown_table,
    pyplot,
    write_json,
)

ROW_KEYS = (
    "method",
    "params",
    "speedup",
    "mac_fraction",
    "psnr_db",
    "ssim",
    "class_accuracy",
    "fid",
    "peak_mem_bytes",
    "overhead_fraction",
    "fastcache_margin_db",
)
METHOD_NAMES = ("none", "fastcache", "fbcache", "teacache", "taylorseer", "pab", "magcache", "seacache", "cachedit")
UNCHANGED_FLAG = "output identical to uncached: the method never engaged"

SWEEP_HORIZONS = (2, 3, 4, 5, 6, 7, 8)
"""Default FastCache sweep of a calibrated model: the tolerances at which a typical sample settles at
these horizons (``tolerance = drift_scale * h^2``, see ``fastcache_core.decisions``)."""
UNCALIBRATED_TOLERANCES = (0.005, 0.01, 0.02, 0.05, 0.1)
PER_SAMPLE_TAYLORSEER_SKIPS = (2, 4)
"""``max_skip_steps`` of the per-sample TaylorSeer rows: intervals 3 and 5, like diffusers' rows."""
DEFAULT_TEACACHE_THRESHOLDS = (0.05, 0.1, 0.2)
FBCACHE_THRESHOLDS = (0.05, 0.1)
TAYLORSEER_SETTINGS = (
    {"cache_interval": 3, "disable_cache_before_step": 3, "max_order": 1},
    {"cache_interval": 5, "disable_cache_before_step": 3, "max_order": 1},
)
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

log = logging.getLogger("bench.cache")


# ---------------------------------------------------------------------------------------------- methods


@dataclass
class Variant:
    """One row: a method at one setting, and how to attach it to a transformer."""

    method: str
    label: str
    params: dict[str, Any]
    attach: Callable[[torch.nn.Module], Any] | None  # None: the uncached reference
    is_fastcache: bool = False  # a FastCache handle (needs set_run)
    key: tuple | None = None  # rows with equal keys compute the same thing: measured once


def _fastcache_config(params: dict[str, Any] | None, use_calibration: bool, calibration: str | None):
    from fastcache_core import CacheParams, FastCacheConfig

    cache_params = CacheParams(**params) if params else CacheParams()
    return FastCacheConfig(params=cache_params, use_calibration=use_calibration, calibration=calibration)


def build_variants(
    transformer: torch.nn.Module, args: argparse.Namespace, pipe: Any = None
) -> tuple[list[Variant], dict[str, Any]]:
    """The rows to measure, and facts about the calibration (for the report).

    ``pipe`` (the pipeline around ``transformer``) gives MagCache its calibration runs and the peers
    their scheduler; without it the ``magcache``, ``seacache`` and ``cachedit`` rows are left out."""
    from bench.peers import apply_peer
    from fastcache_core import CacheParams, FastCacheConfig, apply_fastcache

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
        resolved = {**defaults, **params}
        effective_calibration = use_calibration and calibrated
        config_params = resolved if explicit else None
        return Variant(
            "fastcache",
            label,
            {**meta, "calibrated": effective_calibration, **resolved},
            lambda t, p=config_params, u=use_calibration: apply_fastcache(t, _fastcache_config(p, u, args.calibration)),
            is_fastcache=True,
            key=("fastcache", effective_calibration, tuple(sorted(resolved.items()))),
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
    variants.append(
        fastcache(
            f"uncalibrated (tau={tau:g})",
            {"method": "fastcache"},
            {"setting": "ablation", "ablation": "uncalibrated"},
            use_calibration=False,
        )
    )

    # TaylorSeer as a per-sample method inside the cache (a request's choice in a shared batch), with
    # diffusers' warm-up of 3 computes so it matches diffusers' rows
    for skips in PER_SAMPLE_TAYLORSEER_SKIPS:
        params = {"method": "taylorseer", "tolerance": 1.0, "max_skip_steps": skips}
        variants.append(
            Variant(
                "taylorseer",
                f"per-sample interval={skips + 1} order=1",
                {"implementation": "fastcache per-sample", "cache_interval": skips + 1, "warmup_steps": 3, **params},
                lambda t, p=params: apply_fastcache(
                    t, FastCacheConfig(params=CacheParams(**p), first_steps=3, calibration=args.calibration)
                ),
                is_fastcache=True,
                key=("taylorseer-per-sample", skips),
            )
        )

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
    for setting in TAYLORSEER_SETTINGS:
        variants.append(
            Variant(
                "taylorseer",
                f"interval={setting['cache_interval']} order={setting['max_order']}",
                {"implementation": "diffusers", **setting},
                lambda t, s=setting: apply_peer(t, "taylorseer", **s),
                key=("taylorseer", tuple(setting.items())),
            )
        )
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


# ---------------------------------------------------------------------------------------------- measuring


class TransformerFlops:
    """Counts the FLOPs of every call of ``module`` (pre-hooks and forward hooks included).

    ``FlopCounterMode`` is entered before any other pre-hook of the module runs and left after its
    last forward hook (``fastcache_core.stats.flop_counter``: CPU attention counted too).
    """

    def __init__(self, module: torch.nn.Module) -> None:
        from fastcache_core.stats import flop_counter

        self.counter = flop_counter()
        self.total = 0
        self._depth = 0
        self._hooks = [
            module.register_forward_pre_hook(self._enter, prepend=True),
            module.register_forward_hook(self._exit),
        ]

    def _enter(self, *args: Any) -> None:
        self._depth += 1
        if self._depth == 1:
            self.counter.__enter__()

    def _exit(self, *args: Any) -> None:
        self._depth -= 1
        if self._depth == 0:
            self.counter.__exit__(None, None, None)
            self.total += self.counter.get_total_flops()

    def remove(self) -> None:
        for hook in self._hooks:
            hook.remove()


class TransformerTimer:
    """Wall-clock of every transformer forward, of every block, and of the math inside the blocks.

    Hooks time the transformer (outermost, before any other pre-hook), every block as a whole, and every
    direct child module of every block (attention, feed-forward, norms: the block's own math). Torch's
    module hooks run inside any forward replaced by a cache's registry hook, so a skipped block is simply
    not timed. A block's first child counts the block's executions. On CUDA every hook synchronizes, so
    this runs apart from the timed runs.
    """

    def __init__(self, transformer: torch.nn.Module, device: str) -> None:
        from fastcache_core.adapters import adapter_for

        self.cuda = device.startswith("cuda")
        self.total = self.inside = self.blocks_total = 0.0
        self.forwards = self.block_calls = 0
        self._started: dict[int, float] = {}
        self._hooks = [
            transformer.register_forward_pre_hook(self._enter(-1), prepend=True),
            transformer.register_forward_hook(self._exit(-1, "transformer")),
        ]
        for block in adapter_for(transformer).blocks(transformer):
            self._hooks += [
                block.register_forward_pre_hook(self._enter(id(block))),
                block.register_forward_hook(self._exit(id(block), "block")),
            ]
            for position, child in enumerate(block.children()):
                self._hooks += [
                    child.register_forward_pre_hook(self._enter(id(child))),
                    child.register_forward_hook(self._exit(id(child), "first child" if position == 0 else "child")),
                ]

    def _now(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    def _enter(self, key: int) -> Callable[..., None]:
        def hook(*args: Any) -> None:
            self._started[key] = self._now()

        return hook

    def _exit(self, key: int, kind: str) -> Callable[..., None]:
        def hook(*args: Any) -> None:
            elapsed = self._now() - self._started.pop(key)
            if kind == "transformer":
                self.total += elapsed
                self.forwards += 1
            elif kind == "block":
                self.blocks_total += elapsed
            else:
                self.inside += elapsed
                self.block_calls += kind == "first child"

        return hook

    def remove(self) -> None:
        for hook in self._hooks:
            hook.remove()


def overhead_fraction(method: TransformerTimer, reference: TransformerTimer) -> float | None:
    """Share of the method's transformer wall-clock spent outside the work an uncached forward does.

    From the uncached run (no cache hooks, so a block's timer holds only the block): the model's own
    non-block time per forward (embeddings, head) and a block's glue per execution (its residual adds and
    gating between its child modules, plus the timers' own cost). The method is charged its measured
    child-module math, that glue per block it executed and the non-block time per forward; the rest of
    its transformer wall-clock is the cache's. The cache's approximation math counts as overhead, so
    this is an upper bound."""
    if method.total <= 0 or reference.forwards == 0 or reference.block_calls == 0:
        return None
    model_own = (reference.total - reference.blocks_total) / reference.forwards
    glue = (reference.blocks_total - reference.inside) / reference.block_calls
    expected = method.inside + glue * method.block_calls + model_own * method.forwards
    return (method.total - expected) / method.total


def fastcache_margins(rows: list[dict[str, Any]]) -> list[float | None]:
    """Per row, FastCache's PSNR interpolated at the row's MAC fraction along its tolerance sweep minus
    the row's PSNR (peer rows inside the sweep's MAC range only; ``None`` elsewhere)."""
    import numpy as np

    curve = sorted(
        (r["mac_fraction"], r["psnr_db"])
        for r in rows
        if r["method"] == "fastcache"
        and r["params"].get("setting") in ("default", "tolerance_sweep")
        and r["mac_fraction"] is not None
        and r["psnr_db"] is not None
    )
    margins: list[float | None] = []
    for r in rows:
        mac, value = r["mac_fraction"], r["psnr_db"]
        if (
            r["method"] in ("none", "fastcache")
            or len(curve) < 2
            or mac is None
            or value is None
            or not curve[0][0] <= mac <= curve[-1][0]
        ):
            margins.append(None)
            continue
        margins.append(float(np.interp(mac, [c[0] for c in curve], [c[1] for c in curve])) - value)
    return margins


@dataclass
class ImageRunner:
    """Runs a DiT pipeline on a fixed list of (label, seed) in batches."""

    labels: list[int]
    seeds: list[int]
    steps: int
    guidance: float
    batch_size: int
    device: str

    def _sync(self) -> None:
        if self.device.startswith("cuda"):
            torch.cuda.synchronize(self.device)

    @torch.no_grad()
    def run(
        self,
        pipe,
        count: int | None = None,
        handle: Any = None,
        steps: int | None = None,
        on_batch: Callable[[int], None] | None = None,
    ) -> tuple[torch.Tensor, float]:
        """Images (n, c, h, w) float32 on CPU in [0, 1] for the first ``count`` samples, and seconds spent."""
        count = len(self.seeds) if count is None else count
        steps = steps or self.steps
        images, seconds = [], 0.0
        for start in range(0, count, self.batch_size):
            stop = min(count, start + self.batch_size)
            if handle is not None and hasattr(handle, "set_run"):
                handle.set_run(num_steps=steps)
            generators = [torch.Generator().manual_seed(s) for s in self.seeds[start:stop]]
            self._sync()
            began = time.perf_counter()
            out = pipe(
                class_labels=self.labels[start:stop],
                guidance_scale=self.guidance,
                num_inference_steps=steps,
                generator=generators,
                output_type="pt",
            ).images
            self._sync()
            seconds += time.perf_counter() - began
            images.append(out.float().cpu())
            if on_batch is not None:
                on_batch(stop - start)
        return torch.cat(images), seconds


@dataclass
class Measured:
    images: torch.Tensor
    flops: float
    ratios: list[float] = field(default_factory=list)
    method_seconds: list[float] = field(default_factory=list)
    reference_seconds: list[float] = field(default_factory=list)
    peak_mem: int = 0
    deterministic: bool = True
    timer: TransformerTimer | None = None


def share_parameters_clone(module: torch.nn.Module) -> torch.nn.Module:
    """A structural copy of ``module`` that shares its parameters and buffers (no extra weight memory)."""
    memo = {id(t): t for t in itertools.chain(module.parameters(), module.buffers())}
    return copy.deepcopy(module, memo)


# ---------------------------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.cache",
        description="Speed, compute and fidelity of FastCache and its peers on a DiT pipeline.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--model", default=str(DEFAULT_MODEL), help="DiTPipeline directory")
    parser.add_argument("--steps", type=int, default=50, help="denoising steps")
    parser.add_argument(
        "--samples", type=int, default=None, help="images per method (labels cycle 0..9); default 100, --quick 10"
    )
    parser.add_argument("--seed", type=int, default=0, help="image i uses seed + i")
    parser.add_argument("--guidance", type=float, default=1.5, help="classifier-free guidance scale")
    parser.add_argument(
        "--methods",
        default=",".join(METHOD_NAMES),
        help="comma list among " + ", ".join(METHOD_NAMES) + " (the uncached reference always runs; "
        "cachedit needs the optional cache-dit package and is skipped without it)",
    )
    parser.add_argument(
        "--tolerances",
        default=None,
        help="FastCache tolerance sweep (the default setting is added); default: the tolerances "
        "at which a typical sample settles at horizons 2..8 (calibrated model), else "
        + ",".join(f"{t:g}" for t in UNCALIBRATED_TOLERANCES),
    )
    parser.add_argument("--teacache-thresholds", default=",".join(f"{t:g}" for t in DEFAULT_TEACACHE_THRESHOLDS))
    parser.add_argument(
        "--batch-size", type=int, default=None, help="images per pipeline call; default 16, --quick: all"
    )
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per method; default 3, --quick 1")
    parser.add_argument(
        "--timing-samples", type=int, default=None, help="images per timed run (the first ones); default one batch"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    parser.add_argument("--dtype", default="auto", help="float32, float16, bfloat16 or auto (bf16 on CUDA)")
    parser.add_argument(
        "--judge",
        default=None,
        help="digit-classifier directory for class accuracy and FID (default <model>/classifier)",
    )
    parser.add_argument(
        "--calibration",
        default=None,
        help="FastCache calibration file (default: the one next to the transformer, if any)",
    )
    parser.add_argument("--json", default=None, help="write the rows as JSON here")
    parser.add_argument("--plot", default=None, help="write the speedup-vs-PSNR Pareto plot (PNG) here")
    parser.add_argument(
        "--quick", action="store_true", help="10 images, one timed repeat, one batch: every row in minutes on a CPU"
    )
    parser.add_argument("--strict", action="store_true", help="exit 1 when a method left the images unchanged")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)

    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(args.methods) - set(METHOD_NAMES))
    if unknown:
        parser.error(f"unknown method(s) {', '.join(unknown)}; choose among {', '.join(METHOD_NAMES)}")
    if args.tolerances is not None:
        args.tolerances = [float(t) for t in args.tolerances.split(",") if t.strip()]
    args.teacache_thresholds = [float(t) for t in args.teacache_thresholds.split(",") if t.strip()]
    if args.samples is None:
        args.samples = 10 if args.quick else 100
    if args.repeats is None:
        args.repeats = 1 if args.quick else 3
    if args.batch_size is None:
        args.batch_size = args.samples if args.quick else 16
    args.batch_size = max(1, min(args.batch_size, args.samples))
    if args.timing_samples is None:
        args.timing_samples = args.batch_size
    args.timing_samples = max(1, min(args.timing_samples, args.samples))
    if args.samples < 1 or args.steps < 1 or args.repeats < 1:
        parser.error("--samples, --steps and --repeats must be >= 1")
    return args


def _resolve_device(name: str) -> str:
    if name != "auto":
        return name
    return "cuda" if torch.cuda.is_available() else "cpu"


def _resolve_dtype(name: str, device: str) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[name]


def load_pipeline(model: str, device: str, dtype: torch.dtype):
    import diffusers
    from diffusers import DiTPipeline

    from models.pipeline_io import load_dit_pipeline

    diffusers.utils.logging.set_verbosity_error()
    pipe = load_dit_pipeline(model, dtype=dtype)
    if not isinstance(pipe, DiTPipeline):
        raise SystemExit(f"{model} is not a DiTPipeline directory")
    pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            component.eval()
    return pipe


def load_judge(args: argparse.Namespace, sample_images: torch.Tensor):
    """The bundled model's judge (class accuracy, FID), or None (with the reason logged): the digits
    judge for 32x32 digits, the canvas judge for 64x64 canvases, by the classifier shipped with the model."""
    from models.digits_dit.data import IMAGE_SIZE, DigitClassifier
    from models.digits_dit.judge import DigitsJudge

    directory = Path(args.judge) if args.judge else Path(args.model) / "classifier"
    if not (directory / "config.json").is_file():
        log.warning("no digit classifier at %s: class_accuracy and fid are null", directory)
        return None
    size = sample_images.shape[-1]
    if sample_images.shape[1] == 1 and size == IMAGE_SIZE:
        return DigitsJudge(DigitClassifier.load(directory))
    from models.canvas_dit.data import CANVAS_SIZE, CanvasClassifier
    from models.canvas_dit.judge import CanvasJudge

    if sample_images.shape[1] == 1 and size == CANVAS_SIZE:
        return CanvasJudge(CanvasClassifier.load(directory))
    log.warning(
        "images of shape %s are neither %dx%d digits nor %dx%d canvases: class_accuracy and fid are null",
        tuple(sample_images.shape[1:]),
        IMAGE_SIZE,
        IMAGE_SIZE,
        CANVAS_SIZE,
        CANVAS_SIZE,
    )
    return None


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    log.setLevel(logging.INFO)
    if args.threads:
        torch.set_num_threads(args.threads)
    from tqdm.auto import tqdm

    from fastcache_core.quality import mean_finite, psnr, ssim

    device = _resolve_device(args.device)
    dtype = _resolve_dtype(args.dtype, device)
    ref_pipe = load_pipeline(args.model, device, dtype)
    # the methods run on a structural copy of the transformer sharing its weights, so no cache hook
    # ever touches the uncached reference pipeline
    from diffusers import DiTPipeline

    bench_pipe = DiTPipeline(
        transformer=share_parameters_clone(ref_pipe.transformer), vae=ref_pipe.vae, scheduler=ref_pipe.scheduler
    )
    bench_pipe.set_progress_bar_config(disable=True)

    variants, info = build_variants(bench_pipe.transformer, args, pipe=bench_pipe)
    gen = ImageRunner(
        labels=[i % 10 for i in range(args.samples)],
        seeds=[args.seed + i for i in range(args.samples)],
        steps=args.steps,
        guidance=args.guidance,
        batch_size=args.batch_size,
        device=device,
    )
    labels = torch.tensor(gen.labels)
    memory = PeakMemory(device)
    warm_steps = min(args.steps, 3)

    print(
        f"# bench.cache\n\nmachine: {machine_description(device)}  \ncommand: `{command_line('bench.cache', argv)}`  \n"
        f"model: {args.model} ({device}, {str(dtype).replace('torch.', '')}); steps {args.steps}, "
        f"guidance {args.guidance}, {args.samples} images, timing {args.timing_samples} images x "
        f"{args.repeats} repeat(s); FastCache calibrated: {info['calibrated']}; default params: "
        f"{info['default_params']}\n",
        flush=True,
    )

    # one unit of work per image and method; each method's image count is spread over its runs
    per_method_units = args.samples + 2 * args.repeats * args.timing_samples
    bar = tqdm(
        total=len(variants) * args.samples,
        desc="methods x samples",
        unit="img",
        file=sys.stderr,
        disable=args.no_progress,
        dynamic_ncols=True,
        bar_format="{l_bar}{bar}| {n:.0f}/{total_fmt} [{elapsed}<{remaining}{postfix}]",
    )

    done = {"units": 0, "shown": 0}

    def advance(n: int, whole_method: bool = False) -> None:
        done["units"] += per_method_units if whole_method else n
        target = min(bar.total, done["units"] * args.samples // per_method_units)
        bar.update(target - done["shown"])
        done["shown"] = target

    # warm the reference pipeline (kernels, allocator) before anything is timed
    gen.run(ref_pipe, count=1, steps=warm_steps)

    measured: dict[tuple, Measured] = {}
    reference: Measured | None = None
    started = time.perf_counter()
    for variant in variants:
        bar.set_postfix_str(f"{variant.method}: {variant.label}")
        if variant.key in measured:
            log.info(
                "%s %s computes the same as an earlier row: reusing its measurement", variant.method, variant.label
            )
            advance(0, whole_method=True)
            continue
        pipe = ref_pipe if variant.attach is None else bench_pipe
        handle = None if variant.attach is None else variant.attach(bench_pipe.transformer)
        try:
            if handle is not None:  # warm-up: fits the cache's cost model, warms the hooks' code paths
                gen.run(pipe, count=1, handle=handle, steps=warm_steps)
            counter = TransformerFlops(pipe.transformer)
            try:
                images, _ = gen.run(pipe, handle=handle, on_batch=advance)
            finally:
                counter.remove()
            result = Measured(images=images, flops=float(counter.total))
            memory.reset()
            for repeat in range(args.repeats):
                order = ("ref", "method") if repeat % 2 == 0 else ("method", "ref")
                times = {}
                for which in order:
                    if which == "ref":
                        ref_images, times["ref"] = gen.run(ref_pipe, count=args.timing_samples, on_batch=advance)
                        if reference is not None and not torch.equal(
                            ref_images, reference.images[: args.timing_samples]
                        ):
                            log.warning("the uncached reference changed between runs: results are not comparable")
                    else:
                        with memory.window():
                            timed_images, times["method"] = gen.run(
                                pipe, count=args.timing_samples, handle=handle, on_batch=advance
                            )
                        if not torch.equal(timed_images, images[: args.timing_samples]):
                            result.deterministic = False
                result.ratios.append(times["ref"] / max(times["method"], 1e-12))
                result.method_seconds.append(times["method"])
                result.reference_seconds.append(times["ref"])
            result.peak_mem = memory.peak
            # one more run with timers in every block: where the method's wall-clock goes
            timer = TransformerTimer(pipe.transformer, device)
            try:
                gen.run(pipe, count=args.timing_samples, handle=handle)
            finally:
                timer.remove()
            result.timer = timer
        finally:
            if handle is not None:
                handle.remove()
        if variant.attach is None:
            reference = result
        measured[variant.key] = result
    bar.close()
    memory.close()
    elapsed = time.perf_counter() - started

    judge = load_judge(args, reference.images)

    def fid(images: torch.Tensor) -> float:
        # a handful of images gives a rank-deficient feature covariance: FID still comes out, noisier
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Matrix is singular")
            return judge.fid_to_real(images)

    rows, notes, labels_by_key = [], [], {}
    for variant in variants:
        result = measured[variant.key]
        params = dict(variant.params)
        if variant.key in labels_by_key:
            params["measured_as"] = labels_by_key[variant.key]
        labels_by_key.setdefault(variant.key, f"{variant.method} {variant.label}")
        note = []
        if variant.attach is None:
            speedup, mac = 1.0, 1.0
        else:
            speedup = statistics.median(result.ratios)
            mac = result.flops / reference.flops if reference.flops > 0 else None
            if torch.equal(result.images, reference.images):
                params["flag"] = UNCHANGED_FLAG
                note.append("UNCHANGED: never engaged")
                log.warning(
                    "%s %s: images identical to uncached; its speed says nothing about caching",
                    variant.method,
                    variant.label,
                )
        if not result.deterministic:
            note.append("non-deterministic")
            log.warning("%s %s: timed images differ from the counted run's", variant.method, variant.label)
        if "measured_as" in params:
            note.append(f"= {params['measured_as']}")
        row = {
            "method": variant.method,
            "params": params,
            "speedup": clean_number(speedup, 4),
            "mac_fraction": clean_number(mac, 4),
            "psnr_db": clean_number(mean_finite(psnr(result.images, reference.images)), 3),
            "ssim": clean_number(float(ssim(result.images, reference.images).mean()), 5),
            "class_accuracy": clean_number(judge.class_accuracy(result.images, labels), 4) if judge else None,
            "fid": clean_number(fid(result.images), 3) if judge else None,
            "peak_mem_bytes": int(result.peak_mem),
            "overhead_fraction": clean_number(overhead_fraction(result.timer, reference.timer), 4),
            "fastcache_margin_db": None,
        }
        assert tuple(row) == ROW_KEYS
        rows.append(row)
        notes.append((variant.label, "; ".join(note)))

    for row, margin in zip(rows, fastcache_margins(rows), strict=True):
        row["fastcache_margin_db"] = clean_number(margin, 3)
    ref_per_image = statistics.median(reference.reference_seconds) / args.timing_samples
    noise = statistics.median(reference.ratios)  # the uncached pipeline timed against itself
    print(
        markdown_table(
            [
                "method",
                "setting",
                "speedup",
                "MAC fraction",
                "PSNR dB",
                "FastCache margin dB",
                "overhead",
                "SSIM",
                "class acc",
                "FID",
                "peak mem MiB",
                "note",
            ],
            [
                [
                    r["method"],
                    label,
                    fmt(r["speedup"], 2),
                    fmt(r["mac_fraction"], 3),
                    fmt(r["psnr_db"], 2),
                    fmt(r["fastcache_margin_db"], 2),
                    fmt(r["overhead_fraction"], 3),
                    fmt(r["ssim"], 4),
                    fmt(r["class_accuracy"], 3),
                    fmt(r["fid"], 2),
                    f"{r['peak_mem_bytes'] / 2**20:.0f}",
                    note,
                ]
                for r, (label, note) in zip(rows, notes, strict=True)
            ],
        )
    )
    print(
        f"\nuncached: {ref_per_image:.3f} s per image (batches of {args.batch_size}); "
        f"uncached vs itself (timing noise): {noise:.3f}; benchmark took {elapsed:.0f} s. "
        f"PSNR 100 dB = identical images. "
        f"Peak memory: {'CUDA max allocated' if device.startswith('cuda') else 'process RSS (CPU)'}."
    )
    if args.json:
        write_json(args.json, rows)
    if args.plot:
        plot_pareto(
            rows,
            [label for label, _ in notes],
            args.plot,
            title=f"{Path(args.model.rstrip('/')).name}: {args.steps} steps, {args.samples} images",
        )
    flagged = [f"{r['method']} {label}" for r, (label, _) in zip(rows, notes, strict=True) if "flag" in r["params"]]
    if flagged and args.strict:
        print(f"error: unchanged output for {', '.join(flagged)}", file=sys.stderr)
        raise SystemExit(1)
    return rows


def plot_pareto(rows: list[dict[str, Any]], labels: list[str], path: str, title: str = "") -> None:
    """Speedup (x) vs PSNR (y): one line per method (FastCache's tolerance sweep as its line, its
    ablations as separate markers) and the Pareto front over all rows as a dashed line."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(10.5, 5.5), dpi=120)
    colors = {
        "fastcache": "tab:red",
        "teacache": "tab:blue",
        "fbcache": "tab:green",
        "taylorseer": "tab:purple",
        "pab": "tab:orange",
        "magcache": "tab:brown",
        "seacache": "tab:pink",
        "cachedit": "tab:olive",
    }
    points = [
        (r, label)
        for r, label in zip(rows, labels, strict=True)
        if r["method"] != "none" and r["speedup"] is not None and r["psnr_db"] is not None
    ]
    for method, color in colors.items():
        line = sorted(
            [
                (r["speedup"], r["psnr_db"])
                for r, _ in points
                if r["method"] == method and r["params"].get("setting") != "ablation"
            ]
        )
        if line:
            ax.plot([p[0] for p in line], [p[1] for p in line], "o-", color=color, label=method, alpha=0.9)
        for r, _label in points:
            if r["method"] == method and r["params"].get("setting") == "default":
                ax.plot(r["speedup"], r["psnr_db"], "*", color=color, markersize=14, label="fastcache default")
    markers = iter("sD^vP<>Xh")
    for r, label in points:
        if r["params"].get("setting") == "ablation":
            ax.plot(
                r["speedup"],
                r["psnr_db"],
                next(markers, "x"),
                color="tab:red",
                alpha=0.6,
                markersize=8,
                linestyle="none",
                label=f"ablation: {label}",
            )
    front, best = [], -math.inf
    for s, p in sorted(((r["speedup"], r["psnr_db"]) for r, _ in points), key=lambda x: (-x[0], -x[1])):
        if p > best:
            front.append((s, p))
            best = p
    if front:
        front.sort()
        ax.plot([p[0] for p in front], [p[1] for p in front], "--", color="grey", linewidth=1, label="Pareto front")
    ax.axvline(1.0, color="black", linewidth=0.6, alpha=0.4)
    ax.set_xlabel("speedup over uncached (wall-clock)")
    ax.set_ylabel("PSNR vs uncached image of the same seed (dB)")
    ax.set_title(title or "bench.cache")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    plt.close(fig)


if __name__ == "__main__":
    main()
