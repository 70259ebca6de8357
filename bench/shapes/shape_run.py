"""Everything ``bench.shapes`` measures for one shape, as one JSON-ready row (see ``cli.py`` for meanings)."""

from __future__ import annotations

import argparse
import logging
import statistics
import time
from typing import Any

import torch

from bench.cache.instrument import TransformerTimer, overhead_fraction
from bench.common import PeakMemory, clean_number
from bench.shapes.build import build_pipeline, parameter_bytes, published_parameters
from bench.shapes.catalog import ModelShape, scaled_config
from bench.shapes.measure import ShapeBench, cache_bytes_per_image, interleaved
from fastcache_core.config import CacheParams

log = logging.getLogger("bench.shapes")
EXACT = CacheParams(tolerance=0.0)


def image_tokens(shape: ModelShape, size: int) -> int:
    """Image tokens of one image of ``size`` pixels (VAE factor 8; Flux packs 2x2 latents)."""
    latent = size // 8
    patch = 2 if shape.family == "flux" else int(shape.config["patch_size"])
    return (latent // patch) ** 2


def measure_shape(shape: ModelShape, args: argparse.Namespace, device: str, dtype: torch.dtype) -> dict[str, Any]:
    """Build ``shape``; run the reference, FastCache at tolerance 0 and at ``args.tolerance`` in lockstep
    ``args.repeats`` times; then the timers' runs and the batch scaling. Returns the row."""
    steps = args.steps or shape.steps
    guidance = shape.guidance if args.guidance is None else args.guidance
    size = args.size or shape.size
    built = time.perf_counter()
    bench = ShapeBench(build_pipeline(shape, args.layers, args.seed, args.text_tokens), device, dtype)
    build_seconds = time.perf_counter() - built
    transformer = bench.pipe.transformer
    parameters = sum(p.numel() for p in transformer.parameters())
    published = published_parameters(shape)
    element = next(transformer.parameters()).element_size()
    saving = CacheParams(tolerance=args.tolerance)

    def specs(params: CacheParams, images: int = args.images, count: int = steps) -> list:
        return bench.specs(images, count, guidance, size, params)

    rows_per_image = 2 if bench.reference.cache_guidance(specs(EXACT, 1)[0]) else 1
    log.info(
        "%s: %.0fM parameters built in %.1f s (%s, %s), %d image tokens, %d steps",
        shape.name,
        parameters / 1e6,
        build_seconds,
        device,
        dtype,
        image_tokens(shape, size),
        steps,
    )
    # warm-up: kernels and allocator for both; the cache's cost model is measured on its first step
    warm_steps = min(2, steps)
    warm_reference = bench.loop(specs(EXACT, 1, warm_steps), cached=False).seconds
    warm_cached = bench.loop(specs(saving, 1, warm_steps), cached=True).seconds
    memory = PeakMemory(device)
    timings: dict[str, list[float]] = {"reference": [], "tolerance0": [], "fastcache": []}
    overheads: list[float] = []
    for repeat in range(args.repeats):
        with memory.window():
            results = interleaved(
                {
                    "reference": bench.start(specs(EXACT), cached=False, tag="reference"),
                    "tolerance0": bench.start(specs(EXACT), cached=True, tag="tolerance0"),
                    "fastcache": bench.start(specs(saving), cached=True, tag="fastcache"),
                }
            )
        for which, result in results.items():
            timings[which].append(result.seconds)
        # both compute every step: each step of one is compared with the same step of the other
        pairs = zip(results["reference"].step_seconds, results["tolerance0"].step_seconds, strict=True)
        overheads += [1.0 - r / t for r, t in pairs]
        log.info(
            "%s repeat %d: s/step %s",
            shape.name,
            repeat,
            ", ".join(f"{which} {result.seconds_per_step:.2f}" for which, result in results.items()),
        )
    fastcache = results["fastcache"]
    speedups = [r / f for r, f in zip(timings["reference"], timings["fastcache"], strict=True)]
    speedup = statistics.median(speedups)
    per_image = cache_bytes_per_image(fastcache, rows_per_image)
    row: dict[str, Any] = {
        "shape": shape.name,
        "note": shape.note,
        "device": device,
        "dtype": str(dtype).removeprefix("torch."),
        "config": scaled_config(shape, args.layers),
        "parameters": parameters,
        "published_parameters": published,
        "weights_bytes": parameter_bytes(transformer),
        "size": size,
        "image_tokens": image_tokens(shape, size),
        "text_tokens": args.text_tokens or shape.text_tokens,
        "steps": steps,
        "images": args.images,
        "guidance": guidance,
        "repeats": args.repeats,
        "uncached_seconds_per_step": clean_number(statistics.median(timings["reference"]) / steps),
        "tolerance0_seconds_per_step": clean_number(statistics.median(timings["tolerance0"]) / steps),
        "tolerance0_overhead_fraction": clean_number(statistics.median(overheads)),
        "fastcache_tolerance": args.tolerance,
        "fastcache_seconds_per_step": clean_number(statistics.median(timings["fastcache"]) / steps),
        "mac_fraction": clean_number(fastcache.mac_fraction),
        "speedup": clean_number(speedup),
        "wallclock_efficiency": clean_number(speedup * fastcache.mac_fraction),
        "first_call_extra_seconds": clean_number(warm_cached - warm_reference),
        "cache_state_bytes_per_image": clean_number(per_image, 0),
        "cache_state_fraction_of_published_weights": clean_number(per_image / (published * element)),
        "peak_mem_bytes": memory.peak,
    }
    memory.close()
    if args.timers:
        row["overhead_fraction"] = clean_number(timer_overhead(bench, specs(EXACT), specs(saving)))
    row["batches"] = [batch_row(bench, batch, args, specs, rows_per_image) for batch in args.batches]
    bench.close()
    return row


def timer_overhead(bench: ShapeBench, exact: list, saving: list) -> float | None:
    """bench.cache's ``overhead_fraction`` of FastCache at the saving tolerance (timers in every block)."""
    reference_timer = TransformerTimer(bench.pipe.transformer, bench.device)
    cached_timer = TransformerTimer(bench.cached.transformer, bench.device)
    try:
        interleaved(
            {
                "reference": bench.start(exact, cached=False, tag="timed reference"),
                "fastcache": bench.start(saving, cached=True, tag="timed fastcache"),
            }
        )
    finally:
        reference_timer.remove()
        cached_timer.remove()
    return overhead_fraction(cached_timer, reference_timer)


def batch_row(bench: ShapeBench, batch: int, args: argparse.Namespace, specs: Any, rows_per_image: int) -> dict:
    """Seconds per image and step, uncached and at tolerance 0, and the cache's pool, at ``batch`` images."""
    results = interleaved(
        {
            "reference": bench.start(specs(EXACT, batch, args.batch_steps), cached=False, tag="batch reference"),
            "tolerance0": bench.start(specs(EXACT, batch, args.batch_steps), cached=True, tag="batch tolerance0"),
        }
    )
    reference, cached = results["reference"], results["tolerance0"]
    log.info(
        "batch %d: %.2f / %.2f s per image-step",
        batch,
        reference.seconds_per_step / batch,
        cached.seconds_per_step / batch,
    )
    return {
        "batch": batch,
        "uncached_seconds_per_image_step": clean_number(reference.seconds_per_step / batch),
        "tolerance0_seconds_per_image_step": clean_number(cached.seconds_per_step / batch),
        "cache_pool_bytes": cached.pool_bytes,
        "cache_pool_slots": cached.pool_slots,
        "cache_state_bytes_per_image": clean_number(cache_bytes_per_image(cached, rows_per_image), 0),
    }
