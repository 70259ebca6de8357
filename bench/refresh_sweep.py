"""``python -m bench.refresh_sweep``: token refresh and merging against the block cache alone, MACs and PSNR.

A quick frontier study without timing (so contention on shared cores does not matter): for each
tolerance (the block cache's window) and each refresh fraction, the images' PSNR against the uncached
images of the same seeds, the MAC fraction measured with torch's FLOP counter around every transformer
call, and class accuracy by the model's classifier. Defaults use tuning seeds (20000 and up), never the
benchmark's (0 and up); ``--seed 0`` measures on benchmark seeds. ``bench.cache`` gives the timed rows.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import torch

from bench.cache.instrument import TransformerFlops
from bench.cache.runner import ImageRunner, bench_pipeline, load_judge, load_pipeline
from fastcache_core.quality import psnr


def _run(
    gen: ImageRunner, pipe: Any, params: dict[str, Any] | None, score: str, warmup: float | None, **config: Any
) -> dict:
    from fastcache_core import CacheParams, FastCacheConfig, apply_fastcache

    handle = None
    if params is not None:
        config = FastCacheConfig(params=CacheParams(method="fastcache", **params), refresh_score=score, **config)
        handle = apply_fastcache(pipe.transformer, config)
        if warmup is not None:
            handle.profile.metadata["fastcache_rule"] = {**handle.profile.rule_constants, "warmup": warmup}
    counter = TransformerFlops(pipe.transformer)
    try:
        began = time.perf_counter()
        images, _ = gen.run(pipe, handle=handle)
        seconds = time.perf_counter() - began
    finally:
        counter.remove()
        pool_bytes = handle.pool.nbytes if handle is not None else 0
        if handle is not None:
            handle.remove()
    return {"images": images, "flops": float(counter.total), "seconds": seconds, "pool_bytes": pool_bytes}


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(prog="python -m bench.refresh_sweep", description=__doc__)
    parser.add_argument("--model", default="models/canvas-dit")
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--seed", type=int, default=20000, help="image i uses seed + i (20000: tuning seeds)")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--guidance", type=float, default=4.0)
    parser.add_argument("--tolerances", default="0.06", help="comma list of block-cache tolerances")
    parser.add_argument("--fractions", default="0,0.25", help="comma list of refresh fractions (0: block cache)")
    parser.add_argument("--scores", default="forecast_error", help="comma list of refresh scores")
    parser.add_argument("--warmup", type=float, default=None, help="override the profile's warm-up share")
    parser.add_argument("--merges", default="0", help="comma list of merge ratios (block cache + merge rows)")
    parser.add_argument("--merge-strategy", default="static_bipartite", help="knn or static_bipartite")
    parser.add_argument("--context", default="kept", help="refresh context: kept or forecast")
    parser.add_argument("--no-correction", action="store_true", help="a refresh corrects its own step only")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    ref_pipe = load_pipeline(args.model, "cpu", torch.float32)
    pipe = bench_pipeline(ref_pipe)
    gen = ImageRunner(
        labels=[i % 10 for i in range(args.samples)],
        seeds=[args.seed + i for i in range(args.samples)],
        steps=args.steps,
        guidance=args.guidance,
        batch_size=args.batch_size,
        device="cpu",
    )
    reference = _run(gen, ref_pipe, None, "forecast_error", None)
    judge = load_judge(argparse.Namespace(judge=None, model=args.model), reference["images"])
    labels = torch.tensor(gen.labels)
    rows = []
    for tolerance in [float(t) for t in args.tolerances.split(",")]:
        settings = [(float(f), 0.0) for f in args.fractions.split(",")]
        settings += [(0.0, float(m)) for m in args.merges.split(",") if float(m) > 0]
        for fraction, merge in settings:
            for score in args.scores.split(",") if fraction > 0 else ["-"]:
                params = {"tolerance": tolerance, "refresh_fraction": fraction, "merge_ratio": merge}
                got = _run(
                    gen,
                    pipe,
                    params,
                    score if fraction > 0 else "forecast_error",
                    args.warmup,
                    refresh_context=args.context,
                    refresh_correction=not args.no_correction,
                    merge_strategy=args.merge_strategy,
                )
                per_image = psnr(got["images"], reference["images"]).clamp(max=100.0).tolist()
                accuracy = judge.class_accuracy(got["images"], labels) if judge is not None else None
                row = {
                    "tolerance": tolerance,
                    "refresh_fraction": fraction,
                    "merge_ratio": merge,
                    "merge_strategy": args.merge_strategy if merge else None,
                    "score": score,
                    "warmup": args.warmup,
                    "context": args.context,
                    "correction": not args.no_correction,
                    "mac_fraction": round(got["flops"] / reference["flops"], 4),
                    "psnr_db": round(sum(per_image) / len(per_image), 2),
                    "worst_db": round(min(per_image), 2),
                    "class_accuracy": accuracy,
                    "seconds": round(got["seconds"], 2),
                    "pool_bytes_per_sample": got["pool_bytes"] // max(1, min(args.batch_size, args.samples)),
                }
                rows.append(row)
                print(json.dumps(row), flush=True)
    if args.json:
        with open(args.json, "w") as out:
            json.dump(rows, out, indent=2)
    return rows


if __name__ == "__main__":
    main()
