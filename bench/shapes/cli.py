"""``python -m bench.shapes``: FastCache and the engine at published model shapes (random weights).

Per shape (``catalog.py``), on ``--images`` images of ``--steps`` steps, the uncached reference,
FastCache at tolerance 0 and FastCache at ``--tolerance`` run in lockstep (one step of each back to
back, the order rotating every step; ``measure.interleaved``), ``--repeats`` times:

* ``uncached_seconds_per_step``: the engine's loop (``FamilyRunner.forward`` + scheduler step) with
  no cache attached, per denoising step (prompt encoding and decoding not included);
* ``tolerance0_overhead_fraction``: the median over paired steps of ``1 - uncached / tolerance-0``
  step time: FastCache computing every step, i.e. its bookkeeping alone;
* ``mac_fraction``, ``speedup``, ``wallclock_efficiency``: FastCache at ``--tolerance``: its measured
  MAC fraction, uncached / cached wall-clock (median over repeats), and their product (1.0: every
  saved MAC became saved time);
* ``overhead_fraction``: ``bench.cache``'s figure (timers in every block; one more run each);
* ``cache_state_bytes_per_image``: the cache's pooled tensors per row slot times the image's rows,
  and its share of the published model's weights;
* ``peak_mem_bytes``: over the lockstep runs, CUDA's ``max_memory_allocated``, or on CPU the
  process's peak RSS (weights included: an upper bound);
* ``first_call_extra_seconds``: what the cache's first step adds once (its block cost model);
* ``batches``: seconds per image and step, uncached and at tolerance 0, at each ``--batches`` size,
  and the pool's bytes;
* ``--load``: load time and peak RSS of the saved pipeline directory in a fresh process, with and
  without ``accelerate`` (``low_cpu_mem_usage``; ``loading.py``).

``--save-pipeline DIR`` writes the shape's random-weight pipeline as a diffusers directory and exits:
``fastcache-serve --model DIR`` then serves it (the smoke test of a deployment before real weights).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Sequence
from typing import Any

import torch

from bench.cache.runner import resolve_device, resolve_dtype
from bench.common import command_line, fmt, machine_description, markdown_table, write_json
from bench.shapes.catalog import SHAPES
from bench.shapes.loading import measure_loading

log = logging.getLogger("bench.shapes")

# the digits model's calibrated window (0.14 of the run) under the library's drift constant: an
# uncalibrated model's own default (0.02) keeps a window of 0.045 and computes every step at 20 steps
DEFAULT_TOLERANCE = 0.19


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.shapes",
        description="FastCache and the serving engine at published DiT shapes with random weights.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--shape", default="dit-xl-2", help="comma list among " + ", ".join(SHAPES))
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    parser.add_argument("--dtype", default="auto", help="float32, bfloat16, float16; auto: bfloat16 on CUDA")
    parser.add_argument("--steps", type=int, default=None, help="denoising steps (default: the shape's)")
    parser.add_argument("--images", type=int, default=1, help="images per timed run")
    parser.add_argument("--guidance", type=float, default=None, help="guidance scale (default: the family's)")
    parser.add_argument("--size", type=int, default=None, help="image size in pixels (default: the shape's)")
    parser.add_argument("--layers", type=int, default=None, help="fewer blocks than published (stated in the row)")
    parser.add_argument("--text-tokens", type=int, default=None, help="prompt tokens (default: the shape's)")
    parser.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE, help="FastCache's saving row")
    parser.add_argument("--repeats", type=int, default=2, help="interleaved timed runs per row")
    parser.add_argument("--batches", default="1,2,4,8", help="batch sizes of the scaling table ('' for none)")
    parser.add_argument("--batch-steps", type=int, default=2, help="steps per run of the scaling table")
    parser.add_argument("--no-timers", dest="timers", action="store_false", help="skip overhead_fraction's runs")
    parser.add_argument("--load", action="store_true", help="also measure loading with and without accelerate")
    parser.add_argument("--seed", type=int, default=0, help="weights' seed")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--out", default=None, help="write the rows as JSON here")
    parser.add_argument("--save-pipeline", default=None, metavar="DIR", help="write the pipeline directory and exit")
    args = parser.parse_args(argv)
    unknown = [name for name in args.shape.split(",") if name not in SHAPES]
    if unknown:
        parser.error(f"--shape: unknown {', '.join(unknown)}; choose among {', '.join(SHAPES)}")
    try:
        args.batches = [int(b) for b in args.batches.split(",") if b.strip()]
    except ValueError:
        parser.error("--batches: a comma list of integers")
    if any(b < 1 for b in args.batches) or args.images < 1 or args.repeats < 1:
        parser.error("--batches, --images and --repeats must be >= 1")
    if args.layers is not None and args.layers < 1:
        parser.error("--layers must be >= 1")
    return args


def print_tables(rows: list[dict[str, Any]], loads: list[dict[str, Any]]) -> None:
    headers = [
        "shape", "params", "tokens", "steps", "uncached s/step", "tol-0 overhead", "MAC", "speedup",
        "speedup x MAC", "overhead_fraction", "cache MB/image", "of weights",
    ]  # fmt: skip
    table = [
        [
            r["shape"] + ("" if r["parameters"] == r["published_parameters"] else f" ({r['parameters'] / 1e6:.0f}M)"),
            f"{r['published_parameters'] / 1e6:.0f}M",
            r["image_tokens"],
            r["steps"],
            fmt(r["uncached_seconds_per_step"], 2),
            fmt(r["tolerance0_overhead_fraction"]),
            fmt(r["mac_fraction"]),
            fmt(r["speedup"], 2),
            fmt(r["wallclock_efficiency"], 2),
            fmt(r.get("overhead_fraction")),
            fmt(r["cache_state_bytes_per_image"] / 2**20, 1),
            f"{100 * r['cache_state_fraction_of_published_weights']:.1f}%",
        ]
        for r in rows
    ]
    print(markdown_table(headers, table))
    batch_rows = [
        [
            r["shape"],
            b["batch"],
            fmt(b["uncached_seconds_per_image_step"], 2),
            fmt(b["tolerance0_seconds_per_image_step"], 2),
            fmt(b["cache_pool_bytes"] / 2**20, 1),
            b["cache_pool_slots"],
        ]
        for r in rows
        for b in r["batches"]
    ]
    if batch_rows:
        print()
        print(
            markdown_table(
                ["shape", "batch", "uncached s/image-step", "tol-0 s/image-step", "cache pool MB", "pool slots"],
                batch_rows,
            )
        )
    if loads:
        print()
        print(
            markdown_table(
                ["shape", "accelerate", "load s", "peak RSS GB", "RSS before load GB", "transformer GB"],
                [
                    [
                        row["shape"],
                        row["accelerate"],
                        fmt(row["load_seconds"], 1),
                        fmt(row["peak_rss_bytes"] / 1e9, 2),
                        fmt(row["rss_before_load_bytes"] / 1e9, 2),
                        fmt(row["transformer_bytes"] / 1e9, 2),
                    ]
                    for row in loads
                ],
            )
        )


def main(argv: Sequence[str] | None = None) -> int:
    from bench.shapes.shape_run import measure_shape

    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    import diffusers

    diffusers.utils.logging.set_verbosity_error()
    if args.threads:
        torch.set_num_threads(args.threads)
    shapes = [SHAPES[name] for name in args.shape.split(",")]
    if args.save_pipeline:
        from bench.shapes.build import save_pipeline

        seconds = save_pipeline(shapes[0], args.save_pipeline, args.layers, args.seed, args.text_tokens)
        print(f"wrote {shapes[0].name} to {args.save_pipeline} in {seconds:.1f} s")
        return 0
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    print(f"# {machine_description(device)}")
    print(f"# {command_line('bench.shapes', argv)}")
    began = time.perf_counter()
    rows = [measure_shape(shape, args, device, dtype) for shape in shapes]
    loads = (
        [row for shape in shapes for row in measure_loading(shape, args.layers, args.seed, args.text_tokens)]
        if args.load
        else []
    )
    print_tables(rows, loads)
    print(f"\n# {time.perf_counter() - began:.0f} s in all")
    if args.out:
        write_json(
            args.out,
            {
                "machine": machine_description(device),
                "command": command_line("bench.shapes", argv),
                "rows": rows,
                "loading": loads,
            },
        )
    return 0
