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
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from bench.cache.grid import GRID_SAMPLES, GRID_SEED, default_cells, run_grid
from bench.cache.grid_report import grid_table, plot_grid
from bench.cache.report import build_rows, plot_pareto, print_table
from bench.cache.runner import (
    ImageRunner,
    bench_pipeline,
    load_judge,
    load_pipeline,
    measure_variants,
    resolve_device,
    resolve_dtype,
)
from bench.cache.schedules import TAYLORSEER_INTERVALS, TAYLORSEER_WARMUPS, mark_best_warmups
from bench.cache.variants import DEFAULT_TEACACHE_THRESHOLDS, METHOD_NAMES, UNCALIBRATED_TOLERANCES, build_variants
from bench.common import DEFAULT_MODEL, command_line, machine_description, write_json

log = logging.getLogger("bench.cache")


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
    parser.add_argument(
        "--seed",
        type=int,
        default=None,
        help=f"image i uses seed + i; default {GRID_SEED} (never calibration's)",
    )
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
    parser.add_argument(
        "--taylorseer-warmups",
        default=",".join(map(str, TAYLORSEER_WARMUPS)),
        help="TaylorSeer warm-up computes swept (per-sample and diffusers' hook)",
    )
    parser.add_argument(
        "--taylorseer-intervals",
        default=",".join(map(str, TAYLORSEER_INTERVALS)),
        help="TaylorSeer cache intervals swept (>= 2)",
    )
    parser.add_argument(
        "--no-taylorseer-hook",
        action="store_true",
        help="--grid: sweep the per-sample TaylorSeer only (diffusers' hook gives the same figures, half the time)",
    )
    grid = parser.add_argument_group("grid (--grid)")
    grid.add_argument(
        "--grid",
        action="store_true",
        help="quality and MACs over cells of steps x guidance (no timing): FastCache's default against "
        "TaylorSeer's fixed schedules and best_fixed_schedule; --steps and --guidance are then unused",
    )
    grid.add_argument(
        "--grid-steps", default=None, help="comma list of step counts; default per model (digits: 10,20,50,100)"
    )
    grid.add_argument(
        "--grid-guidance", default=None, help="comma list of guidance scales; default per model (digits: 1.5,4)"
    )
    args = parser.parse_args(argv)

    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(args.methods) - set(METHOD_NAMES))
    if unknown:
        parser.error(f"unknown method(s) {', '.join(unknown)}; choose among {', '.join(METHOD_NAMES)}")
    if args.tolerances is not None:
        args.tolerances = [float(t) for t in args.tolerances.split(",") if t.strip()]
    args.teacache_thresholds = [float(t) for t in args.teacache_thresholds.split(",") if t.strip()]
    try:
        args.taylorseer_warmups = _int_list(args.taylorseer_warmups)
        args.taylorseer_intervals = _int_list(args.taylorseer_intervals)
        default_steps, default_guidance = default_cells(args.model)
        args.grid_steps = _int_list(args.grid_steps) if args.grid_steps else default_steps
        args.grid_guidance = _float_list(args.grid_guidance) if args.grid_guidance else default_guidance
    except ValueError as error:
        parser.error(str(error))
    if not args.taylorseer_warmups or min(args.taylorseer_warmups) < 1:
        parser.error("--taylorseer-warmups must be integers >= 1")
    if not args.taylorseer_intervals or not all(2 <= i <= 101 for i in args.taylorseer_intervals):
        parser.error("--taylorseer-intervals must be integers in [2, 101]")
    if not args.grid_steps or min(args.grid_steps) < 1 or not args.grid_guidance:
        parser.error("--grid-steps must be integers >= 1 and --grid-guidance must name a scale")
    if args.seed is None:
        args.seed = GRID_SEED if args.grid else 0
    if args.samples is None:
        args.samples = (2 if args.quick else GRID_SAMPLES) if args.grid else 10 if args.quick else 100
    if args.repeats is None:
        args.repeats = 1 if args.quick else 3
    if args.batch_size is None:
        args.batch_size = args.samples if args.quick or args.grid else 16
    args.batch_size = max(1, min(args.batch_size, args.samples))
    if args.timing_samples is None:
        args.timing_samples = args.batch_size
    args.timing_samples = max(1, min(args.timing_samples, args.samples))
    if args.samples < 1 or args.steps < 1 or args.repeats < 1:
        parser.error("--samples, --steps and --repeats must be >= 1")
    return args


def _int_list(text: str) -> list[int]:
    return [int(t) for t in text.split(",") if t.strip()]


def _float_list(text: str) -> list[float]:
    return [float(t) for t in text.split(",") if t.strip()]


def main(argv: Sequence[str] | None = None) -> Any:
    """Run the benchmark; returns what ``--json`` writes: the rows, or with ``--grid`` the grid's result."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    log.setLevel(logging.INFO)
    if args.threads:
        torch.set_num_threads(args.threads)

    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    ref_pipe = load_pipeline(args.model, device, dtype)
    bench_pipe = bench_pipeline(ref_pipe)
    if args.grid:
        return main_grid(args, argv, ref_pipe, bench_pipe, device, dtype)

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

    print(
        f"# bench.cache\n\nmachine: {machine_description(device)}  \ncommand: `{command_line('bench.cache', argv)}`  \n"
        f"model: {args.model} ({device}, {str(dtype).replace('torch.', '')}); steps {args.steps}, "
        f"guidance {args.guidance}, {args.samples} images, timing {args.timing_samples} images x "
        f"{args.repeats} repeat(s); FastCache calibrated: {info['calibrated']}; default params: "
        f"{info['default_params']}\n",
        flush=True,
    )

    measured, reference, elapsed = measure_variants(variants, gen, ref_pipe, bench_pipe, args, device)
    judge = load_judge(args, reference.images)
    rows, notes = build_rows(variants, measured, reference, judge, labels)
    best = mark_best_warmups(rows)
    print_table(rows, notes, reference, args, device, elapsed)
    for implementation, found in best.items():
        print(
            f"TaylorSeer ({implementation}): best warm-up {found['warmup_steps']} "
            f"({found['psnr_db_at_mac']:.2f} dB at FastCache default's MAC fraction {found['mac_fraction']:.3f}, "
            f"interpolated along its intervals)"
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


def main_grid(
    args: argparse.Namespace, argv: Sequence[str] | None, ref_pipe: Any, bench_pipe: Any, device: str, dtype: Any
) -> dict[str, Any]:
    """``--grid``: measure every cell, print the per-cell table, write the JSON and the plot."""
    print(
        f"# bench.cache --grid\n\nmachine: {machine_description(device)}  \n"
        f"command: `{command_line('bench.cache', argv)}`  \n"
        f"model: {args.model} ({device}, {str(dtype).replace('torch.', '')}); steps {args.grid_steps} x "
        f"guidance {args.grid_guidance}; {args.samples} images per cell (labels i % 10, seeds {args.seed}.."
        f"{args.seed + args.samples - 1}); TaylorSeer warm-ups {args.taylorseer_warmups} x intervals "
        f"{args.taylorseer_intervals}\n",
        flush=True,
    )
    result = run_grid(args, ref_pipe, bench_pipe, device)
    print(
        f"FastCache calibrated: {result['settings']['calibrated']}; default params: "
        f"{result['settings']['default_params']}\n"
    )
    print(grid_table(result))
    best = result["best_fixed_schedule"]
    if best is not None:
        budget = best["params"]["budget_mac_fraction"]
        where = "within" if best["params"]["within_budget"] else "none within, the cheapest"
        print(
            f"\nbest_fixed_schedule: {best['label']}, grid-average MAC {best['grid_mac_fraction']} against "
            f"FastCache default's {budget} ({where}); cells: mean PSNR / worst image dB / MAC fraction."
        )
    if args.json:
        write_json(args.json, result)
    if args.plot:
        plot_grid(result, args.plot, title=f"{Path(args.model.rstrip('/')).name}: {args.samples} images per cell")
    return result
