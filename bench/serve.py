"""``python -m bench.serve``: the HTTP service under open-loop Poisson load, one at a time vs batched.

For each configuration (``--batch-sizes``, default ``1,8``: the engine's ``--max-batch-size``) the
benchmark starts the service as child processes of its own (``python -m service``; with a Redis queue
also ``python -m service.worker_process`` processes and, with ``--start-redis``, a ``redis-server``), waits for
``/readyz``, and at every arrival rate sends ``--requests`` ``POST /generate`` requests whose arrival
times are a Poisson process (exponential gaps), *open loop*: a request is sent at its arrival time
whether or not earlier ones have finished. Per configuration and rate it reports

* throughput: images completed / (last completion - first arrival), images/s;
* latency percentiles p50/p95/p99: completion - *scheduled* arrival, as the client sees it;
* mean queue wait and compute time (from each image's ``stats``), and the batch sizes the images
  shared (``stats.batch_sizes``: images in the batch at each of the image's steps).

Unless ``--rates`` gives them, the arrival rates are ``--load-factors`` times the capacity of one-at-a-
time serving, measured first with sequential requests. ``throughput_ratio_batched_vs_single`` is the
best throughput of the largest batch size over that of batch size 1 (at the top rates both saturate).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import signal
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.common import (
    DEFAULT_MODEL,
    clean_number,
    command_line,
    fmt,
    machine_description,
    markdown_table,
    percentile,
    pyplot,
    write_json,
)
from bench.load import MIXED_CACHE, Cluster, Outcome, open_loop, sequential
from bench.serve_memory import STORES, main_memory
from bench.serve_mix import MIXES, main_mix

DEFAULT_LOAD_FACTORS = (0.25, 0.5, 1.0, 2.0, 4.0)
QUICK_LOAD_FACTORS = (0.5, 1.5, 4.0)


def summarize(name: str, max_batch_size: int, rate: float, outcomes: list[Outcome], n: int) -> dict[str, Any]:
    ok = [o for o in outcomes if o.status == 200]
    latencies = [o.done - o.scheduled for o in ok]
    images = [img for o in ok for img in o.images]
    steps_batches = [b for img in images for b in img["stats"].get("batch_sizes", [])]
    per_image_mean = [
        statistics.fmean(img["stats"]["batch_sizes"]) for img in images if img["stats"].get("batch_sizes")
    ]
    first = min((o.scheduled for o in outcomes), default=0.0)
    last = max((o.done for o in ok), default=first)
    span = last - first
    failures = Counter(str(o.status) for o in outcomes if o.status != 200)
    hist = Counter(steps_batches)
    return {
        "config": name,
        "max_batch_size": max_batch_size,
        "rate_rps": clean_number(rate, 4),
        "offered_images_per_s": clean_number(rate * n, 4),
        "requests": len(outcomes),
        "completed": len(ok),
        "failed": dict(failures),
        "images": len(images),
        "duration_s": clean_number(span, 3),
        "throughput_images_per_s": clean_number(len(images) / span, 4) if span > 0 and images else 0.0,
        "latency_p50_s": clean_number(percentile(latencies, 50), 4),
        "latency_p95_s": clean_number(percentile(latencies, 95), 4),
        "latency_p99_s": clean_number(percentile(latencies, 99), 4),
        "latency_mean_s": clean_number(statistics.fmean(latencies), 4) if latencies else None,
        "queue_wait_mean_s": clean_number(statistics.fmean(i["stats"]["queue_wait_seconds"] for i in images), 4)
        if images
        else None,
        "compute_mean_s": clean_number(statistics.fmean(i["stats"]["compute_seconds"] for i in images), 4)
        if images
        else None,
        "batch_size_mean": clean_number(statistics.fmean(steps_batches), 3) if steps_batches else None,
        "batch_size_mean_per_image": clean_number(statistics.fmean(per_image_mean), 3) if per_image_mean else None,
        "batch_size_max": max(steps_batches) if steps_batches else None,
        "batch_size_histogram": {str(k): hist[k] for k in sorted(hist)},
        "cache_methods": dict(Counter(i["stats"].get("method", "?") for i in images)),
        "errors": sorted({o.error for o in outcomes if o.error})[:3],
    }


# ---------------------------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.serve",
        description="Throughput and latency of the service under open-loop Poisson load, one at a time vs batched.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--model", default=str(DEFAULT_MODEL), help="model directory the service loads")
    parser.add_argument("--batch-sizes", default="1,8", help="--max-batch-size of each configuration compared")
    parser.add_argument(
        "--rates",
        default=None,
        help="arrival rates in requests/s (comma list); default: --load-factors x the measured one-at-a-time capacity",
    )
    parser.add_argument(
        "--load-factors",
        default=None,
        help=f"rates as multiples of one-at-a-time capacity; default "
        f"{','.join(map(str, DEFAULT_LOAD_FACTORS))}, --quick {','.join(map(str, QUICK_LOAD_FACTORS))}",
    )
    parser.add_argument("--requests", type=int, default=None, help="requests per rate; default 64, --quick 16")
    parser.add_argument("--n", type=int, default=1, help="images per request")
    parser.add_argument("--steps", type=int, default=None, help="denoising steps per request (default: the model's)")
    parser.add_argument("--guidance", type=float, default=None, help="guidance scale (default: the model's)")
    parser.add_argument(
        "--cache",
        type=json.loads,
        default={},
        help="cache settings of every request, JSON (default {}: the model's FastCache default)",
    )
    parser.add_argument(
        "--mixed-cache",
        action="store_true",
        help="each request draws its cache settings from: " + "; ".join(json.dumps(c) for c in MIXED_CACHE),
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--queue", default="local", help="'local' (in-process queue) or a redis:// URL")
    parser.add_argument(
        "--start-redis",
        action="store_true",
        help="start a throwaway redis-server per configuration (implies the Redis queue)",
    )
    parser.add_argument("--workers", type=int, default=1, help="worker processes per configuration (Redis queue)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads of each server/worker")
    parser.add_argument("--device", default=None, help="--device passed to the service (default: its auto)")
    parser.add_argument("--max-queue", type=int, default=1024, help="the service's --max-queue")
    parser.add_argument("--timeout", type=float, default=600.0, help="per-request deadline, seconds")
    parser.add_argument(
        "--warmup",
        type=int,
        default=5,
        help="sequential requests per configuration before measuring (the capacity probe)",
    )
    parser.add_argument("--ready-timeout", type=float, default=300.0, help="seconds to wait for /readyz")
    parser.add_argument(
        "--overlap-startup",
        action="store_true",
        help="start every configuration at once (shorter; each holds its own model copy); "
        "implied by --quick unless an external Redis URL is shared",
    )
    parser.add_argument("--python", default=None, help="interpreter for the service (default: this one)")
    parser.add_argument("--logs", default=None, help="keep the service logs in this directory")
    parser.add_argument("--json", default=None, help="write results as JSON here")
    parser.add_argument("--plot", default=None, help="write the latency-vs-throughput plot (PNG) here")
    parser.add_argument("--quick", action="store_true", help="3 rates x 16 requests: minutes on a CPU")
    parser.add_argument(
        "--mix",
        nargs="?",
        const=",".join(MIXES),
        default=None,
        help=f"mixed traffic instead: measure mixed_efficiency and latency per request kind for "
        f"these mixes (comma list of {', '.join(MIXES)}; all when given alone); see bench/README.md",
    )
    parser.add_argument(
        "--memory",
        nargs="?",
        const="redis,s3",
        default=None,
        help=f"instead: Redis memory per finished job and the API replica's RSS and ready time, per result store "
        f"(comma list of {', '.join(STORES)}; redis,s3 when given alone; s3 uses AWS_ENDPOINT_URL or starts "
        "moto_server); see bench/README.md",
    )
    parser.add_argument(
        "--mix-sizes",
        default=None,
        help="--mix resolutions: the common and the rarer size, e.g. 32,48; unset: native and 1.5x native",
    )
    parser.add_argument(
        "--mix-load", type=float, default=0.8, help="--mix: latency is measured at this fraction of the capacity"
    )
    parser.add_argument(
        "--mix-repeats",
        type=int,
        default=3,
        help="--mix: rounds of (each kind alone, then the mix); the round with the median efficiency is reported",
    )
    parser.add_argument(
        "--mix-latency-requests",
        type=int,
        default=None,
        help="--mix: requests of each latency run (the mix, and each kind alone); default 2 x --requests",
    )
    args = parser.parse_args(argv)
    if args.mix is not None:
        args.mix = [m.strip() for m in args.mix.split(",") if m.strip()]
        unknown = [m for m in args.mix if m not in MIXES]
        if unknown or not args.mix:
            parser.error(f"--mix takes {', '.join(MIXES)}; got {unknown or 'nothing'}")
        if args.mixed_cache:
            parser.error("--mix cache already mixes the cache settings of --mixed-cache: leave --mixed-cache out")
    if args.memory is not None:
        args.memory = [m.strip() for m in args.memory.split(",") if m.strip()]
        unknown = [m for m in args.memory if m not in STORES]
        if unknown or not args.memory:
            parser.error(f"--memory takes {', '.join(STORES)}; got {unknown or 'nothing'}")
        if args.mix is not None:
            parser.error("--memory and --mix are separate benchmarks: give one")
    if args.mix_sizes:
        try:
            args.mix_sizes = [int(v) for v in args.mix_sizes.split(",")]
        except ValueError:
            parser.error("--mix-sizes takes two sizes in pixels, e.g. 32,48")
        if len(args.mix_sizes) != 2 or min(args.mix_sizes) < 1:
            parser.error("--mix-sizes takes two sizes in pixels, e.g. 32,48")
    if not 0 < args.mix_load <= 2:
        parser.error("--mix-load must be in (0, 2]")
    if args.mix_repeats < 1 or (args.mix_latency_requests is not None and args.mix_latency_requests < 1):
        parser.error("--mix-repeats and --mix-latency-requests must be >= 1")
    args.batch_sizes = [int(b) for b in args.batch_sizes.split(",") if b.strip()]
    if not args.batch_sizes or min(args.batch_sizes) < 1:
        parser.error("--batch-sizes needs positive integers")
    args.rates = [float(r) for r in args.rates.split(",")] if args.rates else None
    factors = (
        args.load_factors.split(",")
        if args.load_factors
        else (QUICK_LOAD_FACTORS if args.quick else DEFAULT_LOAD_FACTORS)
    )
    args.load_factors = [float(f) for f in factors]
    if args.requests is None:
        args.requests = 16 if args.quick else 64
    if args.mix_latency_requests is None:
        args.mix_latency_requests = 2 * args.requests
    if args.start_redis and args.queue != "local":
        parser.error("--start-redis starts its own Redis: leave --queue out")
    if args.queue != "local" and not args.queue.startswith(("redis://", "rediss://", "unix://")):
        parser.error("--queue must be 'local' or a redis:// URL")
    if args.quick and not (args.queue != "local" and not args.start_redis):
        args.overlap_startup = True
    if args.overlap_startup and args.queue != "local" and not args.start_redis:
        parser.error("--overlap-startup with a shared external Redis would let configurations steal each other's jobs")
    if args.n < 1 or args.requests < 1 or args.warmup < 1:
        parser.error("--n, --requests and --warmup must be >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    log_dir = Path(args.logs) if args.logs else Path(tempfile.mkdtemp(prefix="bench-serve-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    if args.memory:
        try:
            result = main_memory(args, argv, log_dir, _progress)
        except BaseException:
            _progress(f"failed; service logs kept in {log_dir}")
            raise
        if not args.logs:
            shutil.rmtree(log_dir, ignore_errors=True)
        return result
    if args.mix:
        try:
            result = main_mix(args, argv, log_dir, _progress)
        except BaseException:
            _progress(f"failed; service logs kept in {log_dir}")
            raise
        if not args.logs:
            shutil.rmtree(log_dir, ignore_errors=True)
        return result
    clusters = [Cluster(f"batch{b}", b, args, log_dir) for b in args.batch_sizes]
    mode = "redis" if (args.queue != "local" or args.start_redis) else "local"
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    print(
        f"# bench.serve\n\nmachine: {machine_description(device, args.threads)}  \n"
        f"command: `{command_line('bench.serve', argv)}`  \n"
        f"model: {args.model}; queue: {mode}{f' ({args.workers} worker(s))' if mode == 'redis' else ''}; "
        f"{args.n} image(s)/request; steps: {args.steps or 'model default'}; cache: "
        f"{'mixed' if args.mixed_cache else json.dumps(args.cache)}; {args.requests} requests per rate\n",
        flush=True,
    )
    rows: list[dict[str, Any]] = []
    single_seconds: float | None = None
    rates = args.rates
    started = time.time()

    def handle_term(signum, frame):  # stop our children on SIGTERM too
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handle_term)
    try:
        if args.overlap_startup:
            for cluster in clusters:
                cluster.start()
        # the capacity probe runs on the smallest batch size first
        for cluster in sorted(clusters, key=lambda c: c.max_batch_size):
            if not args.overlap_startup:
                cluster.start()
            t0 = time.time()
            cluster.wait_ready(args.ready_timeout)
            _progress(f"{cluster.name}: ready in {time.time() - t0:.0f} s ({cluster.url})")
            warm = asyncio.run(sequential(cluster.url, args.warmup, args))
            failed = [o for o in warm if o.status != 200]
            if failed:
                raise RuntimeError(f"{cluster.name}: warm-up request failed ({failed[0].status}): {failed[0].error}")
            if rates is None:
                # one-at-a-time capacity: the median client latency of sequential requests (the first two,
                # which still pay first-call costs, dropped when there are enough)
                timed = warm[2:] if len(warm) >= 4 else (warm[1:] or warm)
                single_seconds = statistics.median(o.done - o.scheduled for o in timed)
                capacity = 1.0 / single_seconds  # requests/s
                rates = [round(f * capacity, 4) for f in args.load_factors]
                _progress(f"one request at a time: {single_seconds:.3f} s -> rates {rates} requests/s")
            for index, rate in enumerate(rates):
                _progress(f"{cluster.name}: {args.requests} requests at {rate:g}/s")
                outcomes, _ = asyncio.run(open_loop(cluster.url, rate, args.requests, args, args.seed + index))
                row = summarize(cluster.name, cluster.max_batch_size, rate, outcomes, args.n)
                rows.append(row)
                _progress(
                    f"  -> {row['throughput_images_per_s']} img/s, p50 {row['latency_p50_s']} s, "
                    f"p99 {row['latency_p99_s']} s, mean batch {row['batch_size_mean']}, failed {row['failed']}"
                )
            if not args.overlap_startup:
                cluster.stop()
    except BaseException:
        _progress(f"failed; service logs kept in {log_dir}")
        raise
    finally:
        for cluster in clusters:
            cluster.stop()
        signal.signal(signal.SIGTERM, previous)
    if not args.logs:
        shutil.rmtree(log_dir, ignore_errors=True)

    best = {
        c.max_batch_size: max((r["throughput_images_per_s"] or 0.0 for r in rows if r["config"] == c.name), default=0.0)
        for c in clusters
    }
    low, high = min(best), max(best)
    ratio = clean_number(best[high] / best[low], 4) if low == 1 and high > 1 and best[low] > 0 else None
    result = {
        "throughput_ratio_batched_vs_single": ratio,
        "best_throughput_images_per_s": {f"batch{k}": v for k, v in best.items()},
        "rows": rows,
        "configs": [
            {
                "config": c.name,
                "max_batch_size": c.max_batch_size,
                "queue": mode,
                "workers": args.workers if mode == "redis" else 0,
            }
            for c in clusters
        ],
        "settings": {
            "model": str(args.model),
            "requests_per_rate": args.requests,
            "images_per_request": args.n,
            "steps": args.steps,
            "guidance_scale": args.guidance,
            "mixed_cache": args.mixed_cache,
            "cache": args.cache,
            "rates_rps": rates,
            "load_factors": None if args.rates else args.load_factors,
            "single_request_seconds": clean_number(single_seconds, 4),
            "threads": args.threads,
        },
        "machine": machine_description(device, args.threads),
        "command": command_line("bench.serve", argv),
        "seconds": round(time.time() - started, 1),
    }
    print(
        markdown_table(
            [
                "config",
                "rate req/s",
                "throughput img/s",
                "p50 s",
                "p95 s",
                "p99 s",
                "queue wait s",
                "mean batch",
                "max batch",
                "ok/sent",
            ],
            [
                [
                    r["config"],
                    fmt(r["rate_rps"], 3),
                    fmt(r["throughput_images_per_s"], 3),
                    fmt(r["latency_p50_s"], 3),
                    fmt(r["latency_p95_s"], 3),
                    fmt(r["latency_p99_s"], 3),
                    fmt(r["queue_wait_mean_s"], 3),
                    fmt(r["batch_size_mean"], 2),
                    fmt(r["batch_size_max"]),
                    f"{r['completed']}/{r['requests']}",
                ]
                for r in rows
            ],
        )
    )
    print(
        f"\nthroughput batched vs one at a time: {fmt(ratio, 2)}x (best img/s per config: "
        f"{result['best_throughput_images_per_s']}); took {result['seconds']:.0f} s"
    )
    if args.json:
        write_json(args.json, result)
    if args.plot:
        plot_latency(rows, args.plot, title=f"{Path(str(args.model).rstrip('/')).name}: latency vs throughput")
    return result


def _progress(message: str) -> None:
    print(f"[bench.serve] {message}", file=sys.stderr, flush=True)


def plot_latency(rows: list[dict[str, Any]], path: str, title: str = "") -> None:
    """p50 (solid) and p95 (dashed) latency against achieved throughput, one colour per configuration."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 5), dpi=120)
    configs = list(dict.fromkeys(r["config"] for r in rows))
    for i, config in enumerate(configs):
        color = f"C{i}"
        points = sorted(
            (r["throughput_images_per_s"], r["latency_p50_s"], r["latency_p95_s"], r["rate_rps"])
            for r in rows
            if r["config"] == config and r["latency_p50_s"] is not None
        )
        if not points:
            continue
        xs = [p[0] for p in points]
        ax.plot(xs, [p[1] for p in points], "o-", color=color, label=f"{config} p50")
        ax.plot(xs, [p[2] for p in points], "s--", color=color, alpha=0.7, label=f"{config} p95")
        for x, y, _, rate in points:
            ax.annotate(f"{rate:g}/s", (x, y), textcoords="offset points", xytext=(4, -10), fontsize=7, color=color)
    ax.set_xlabel("throughput (images/s)")
    ax.set_ylabel("latency (s, scheduled arrival to response)")
    ax.set_yscale("log")
    ax.set_title(title or "bench.serve")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    plt.close(fig)


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        sys.exit(130)
