"""``python -m bench.serve``: the HTTP service under open-loop Poisson load, one at a time vs batched.

For each configuration (``--batch-sizes``, default ``1,8``: the engine's ``--max-batch-size``) the
benchmark starts the service as child processes of its own (``python -m service``; with a Redis queue
also ``python -m service.worker`` processes and, with ``--start-redis``, a ``redis-server``), waits for
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
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import httpx

from bench.common import (
    DEFAULT_MODEL,
    REPO,
    clean_number,
    command_line,
    fmt,
    machine_description,
    markdown_table,
    percentile,
    pyplot,
    write_json,
)

MIXED_CACHE = (
    {},  # the model's default (calibrated) FastCache setting
    {"method": "none"},
    {"method": "fastcache", "tolerance": 0.3},
    {"method": "teacache", "tolerance": 0.1},
    {"method": "fbcache", "tolerance": 0.1},
)
DEFAULT_LOAD_FACTORS = (0.25, 0.5, 1.0, 2.0, 4.0)
MIXES = ("resolutions", "steps", "cache")  # --mix (bench/serve_mix.py)
QUICK_LOAD_FACTORS = (0.5, 1.5, 4.0)


# ---------------------------------------------------------------------------------------------- processes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Child:
    """A child process in its own session, output to a log file; stopped by SIGTERM, then SIGKILL."""

    def __init__(self, name: str, args: list[str], env: dict[str, str], log_dir: Path) -> None:
        self.name = name
        self.args = args
        self.log_path = log_dir / f"{name}.log"
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(args, stdout=self._log, stderr=subprocess.STDOUT, env=env, cwd=REPO,
                                     start_new_session=True)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def stop(self, timeout: float = 30.0) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self._log.close()


def _ok(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


@dataclass
class Cluster:
    """One configuration of the service: an API server (+ workers and redis-server in Redis mode)."""

    name: str
    max_batch_size: int
    args: argparse.Namespace
    log_dir: Path
    children: list[Child] = field(default_factory=list)
    url: str = ""
    worker_urls: list[str] = field(default_factory=list)
    queue: str = "local"

    def start(self) -> None:
        a = self.args
        python = a.python or sys.executable
        env = dict(os.environ)
        env.update({"PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(a.threads),
                    "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))})
        common = ["--model", str(a.model), "--max-batch-size", str(self.max_batch_size), "--threads",
                  str(a.threads), "--log-level", "warning"]
        if a.device:
            common += ["--device", a.device]
        self.queue = a.queue
        if a.start_redis:
            binary = shutil.which("redis-server") or "/usr/bin/redis-server"
            port = free_port()
            self.children.append(Child(f"{self.name}-redis", [binary, "--port", str(port), "--bind", "127.0.0.1",
                                                              "--save", "", "--appendonly", "no"], env, self.log_dir))
            self.queue = f"redis://127.0.0.1:{port}/0"
            self._wait(lambda: _redis_ping(self.queue), 30, "redis-server")
        if self.queue != "local":
            for i in range(a.workers):
                port = free_port()
                self.worker_urls.append(f"http://127.0.0.1:{port}")
                self.children.append(Child(f"{self.name}-worker{i}", [
                    python, "-m", "service.worker", "--redis", self.queue, "--host", "127.0.0.1",
                    "--metrics-port", str(port), *common], env, self.log_dir))
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.children.append(Child(f"{self.name}-api", [
            python, "-m", "service", "--host", "127.0.0.1", "--port", str(port), "--queue", self.queue,
            "--max-queue", str(a.max_queue), *common], env, self.log_dir))

    def wait_ready(self, timeout: float) -> None:
        for url in self.worker_urls:
            self._wait(lambda u=url: _ok(f"{u}/readyz"), timeout, "worker")
        self._wait(lambda: _ok(f"{self.url}/readyz"), timeout, "API server")

    def _wait(self, condition, timeout: float, what: str) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if condition():
                return
            dead = [c for c in self.children if not c.alive()]
            if dead:
                raise RuntimeError(f"{self.name}: {dead[0].name} exited with {dead[0].proc.returncode}:\n"
                                   f"{dead[0].tail()}")
            time.sleep(0.2)
        logs = "\n".join(f"--- {c.name}\n{c.tail(1500)}" for c in self.children)
        raise RuntimeError(f"{self.name}: {what} not ready after {timeout:.0f} s\n{logs}")

    def stop(self) -> None:
        # API first (it drains), then workers, then redis
        for child in reversed(self.children):
            child.stop()
        self.children = []


def _redis_ping(url: str) -> bool:
    import redis

    try:
        return bool(redis.Redis.from_url(url, socket_timeout=1).ping())
    except Exception:
        return False


# ---------------------------------------------------------------------------------------------- load


@dataclass
class Outcome:
    scheduled: float
    sent: float
    done: float
    status: int
    images: list[dict[str, Any]]
    error: str = ""


def request_body(i: int, args: argparse.Namespace, rng: random.Random) -> dict[str, Any]:
    body: dict[str, Any] = {"prompt": str(i % 10), "n": args.n, "seed": args.seed + 1000 * i,
                            "timeout_seconds": float(args.timeout)}
    if args.steps:
        body["steps"] = args.steps
    if args.guidance is not None:
        body["guidance_scale"] = args.guidance
    cache = rng.choice(MIXED_CACHE) if args.mixed_cache else args.cache
    if cache:
        body["cache"] = dict(cache)
    return body


async def _send(client: httpx.AsyncClient, body: dict[str, Any], scheduled: float, loop) -> Outcome:
    sent = loop.time()
    try:
        response = await client.post("/generate", json=body)
        done = loop.time()
        if response.status_code == 200:
            return Outcome(scheduled, sent, done, 200, response.json()["images"])
        return Outcome(scheduled, sent, done, response.status_code, [], response.text[:300])
    except httpx.HTTPError as error:
        return Outcome(scheduled, sent, loop.time(), 0, [], f"{type(error).__name__}: {error}")


async def open_loop(url: str, rate: float, count: int, args: argparse.Namespace, seed: int,
                    bodies: list[dict[str, Any]] | None = None) -> tuple[list[Outcome], float]:
    """Send ``count`` requests (``bodies``, or drawn from ``args``) at Poisson arrivals of ``rate`` per second;
    return the outcomes in request order and the start."""
    rng = random.Random(seed)
    gaps = [rng.expovariate(rate) for _ in range(count)]
    arrivals, t = [], 0.0
    for gap in gaps:
        arrivals.append(t)  # the first request goes at once
        t += gap
    if bodies is None:
        bodies = [request_body(i, args, rng) for i in range(count)]
    loop = asyncio.get_running_loop()
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(base_url=url, timeout=args.timeout + 60, limits=limits) as client:
        start = loop.time()
        tasks = []
        for at, body in zip(arrivals, bodies):
            delay = start + at - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(_send(client, body, start + at, loop)))
        outcomes = await asyncio.gather(*tasks)
    return [Outcome(o.scheduled - start, o.sent - start, o.done - start, o.status, o.images, o.error)
            for o in outcomes], start


async def sequential(url: str, count: int, args: argparse.Namespace) -> list[Outcome]:
    rng = random.Random(args.seed)
    loop = asyncio.get_running_loop()
    async with httpx.AsyncClient(base_url=url, timeout=args.timeout + 60) as client:
        outcomes = []
        for i in range(count):
            body = request_body(i, args, rng)
            began = loop.time()
            outcomes.append(await _send(client, body, began, loop))
    return outcomes


def summarize(name: str, max_batch_size: int, rate: float, outcomes: list[Outcome], n: int) -> dict[str, Any]:
    ok = [o for o in outcomes if o.status == 200]
    latencies = [o.done - o.scheduled for o in ok]
    images = [img for o in ok for img in o.images]
    steps_batches = [b for img in images for b in img["stats"].get("batch_sizes", [])]
    per_image_mean = [statistics.fmean(img["stats"]["batch_sizes"]) for img in images if img["stats"].get("batch_sizes")]
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
        if images else None,
        "compute_mean_s": clean_number(statistics.fmean(i["stats"]["compute_seconds"] for i in images), 4)
        if images else None,
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
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", default=str(DEFAULT_MODEL), help="model directory the service loads")
    parser.add_argument("--batch-sizes", default="1,8", help="--max-batch-size of each configuration compared")
    parser.add_argument("--rates", default=None, help="arrival rates in requests/s (comma list); default: "
                        "--load-factors x the measured one-at-a-time capacity")
    parser.add_argument("--load-factors", default=None,
                        help=f"rates as multiples of one-at-a-time capacity; default "
                             f"{','.join(map(str, DEFAULT_LOAD_FACTORS))}, --quick {','.join(map(str, QUICK_LOAD_FACTORS))}")
    parser.add_argument("--requests", type=int, default=None, help="requests per rate; default 64, --quick 16")
    parser.add_argument("--n", type=int, default=1, help="images per request")
    parser.add_argument("--steps", type=int, default=None, help="denoising steps per request (default: the model's)")
    parser.add_argument("--guidance", type=float, default=None, help="guidance scale (default: the model's)")
    parser.add_argument("--cache", type=json.loads, default={},
                        help="cache settings of every request, JSON (default {}: the model's FastCache default)")
    parser.add_argument("--mixed-cache", action="store_true",
                        help="each request draws its cache settings from: " + "; ".join(json.dumps(c) for c in MIXED_CACHE))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--queue", default="local", help="'local' (in-process queue) or a redis:// URL")
    parser.add_argument("--start-redis", action="store_true",
                        help="start a throwaway redis-server per configuration (implies the Redis queue)")
    parser.add_argument("--workers", type=int, default=1, help="worker processes per configuration (Redis queue)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads of each server/worker")
    parser.add_argument("--device", default=None, help="--device passed to the service (default: its auto)")
    parser.add_argument("--max-queue", type=int, default=1024, help="the service's --max-queue")
    parser.add_argument("--timeout", type=float, default=600.0, help="per-request deadline, seconds")
    parser.add_argument("--warmup", type=int, default=5,
                        help="sequential requests per configuration before measuring (the capacity probe)")
    parser.add_argument("--ready-timeout", type=float, default=300.0, help="seconds to wait for /readyz")
    parser.add_argument("--overlap-startup", action="store_true",
                        help="start every configuration at once (shorter; each holds its own model copy); "
                             "implied by --quick unless an external Redis URL is shared")
    parser.add_argument("--python", default=None, help="interpreter for the service (default: this one)")
    parser.add_argument("--logs", default=None, help="keep the service logs in this directory")
    parser.add_argument("--json", default=None, help="write results as JSON here")
    parser.add_argument("--plot", default=None, help="write the latency-vs-throughput plot (PNG) here")
    parser.add_argument("--quick", action="store_true", help="3 rates x 16 requests: minutes on a CPU")
    parser.add_argument("--mix", nargs="?", const=",".join(MIXES), default=None,
                        help=f"mixed traffic instead: measure mixed_efficiency and latency per request kind for "
                             f"these mixes (comma list of {', '.join(MIXES)}; all when given alone); see bench/README.md")
    parser.add_argument("--mix-sizes", default=None,
                        help="--mix resolutions: the common and the rarer size, e.g. 32,48; unset: native and 1.5x native")
    parser.add_argument("--mix-load", type=float, default=0.8,
                        help="--mix: latency is measured at this fraction of the capacity")
    args = parser.parse_args(argv)
    if args.mix is not None:
        args.mix = [m.strip() for m in args.mix.split(",") if m.strip()]
        unknown = [m for m in args.mix if m not in MIXES]
        if unknown or not args.mix:
            parser.error(f"--mix takes {', '.join(MIXES)}; got {unknown or 'nothing'}")
        if args.mixed_cache:
            parser.error("--mix cache already mixes the cache settings of --mixed-cache: leave --mixed-cache out")
    if args.mix_sizes:
        try:
            args.mix_sizes = [int(v) for v in args.mix_sizes.split(",")]
        except ValueError:
            parser.error("--mix-sizes takes two sizes in pixels, e.g. 32,48")
        if len(args.mix_sizes) != 2 or min(args.mix_sizes) < 1:
            parser.error("--mix-sizes takes two sizes in pixels, e.g. 32,48")
    if not 0 < args.mix_load <= 2:
        parser.error("--mix-load must be in (0, 2]")
    args.batch_sizes = [int(b) for b in args.batch_sizes.split(",") if b.strip()]
    if not args.batch_sizes or min(args.batch_sizes) < 1:
        parser.error("--batch-sizes needs positive integers")
    args.rates = [float(r) for r in args.rates.split(",")] if args.rates else None
    factors = args.load_factors.split(",") if args.load_factors else (QUICK_LOAD_FACTORS if args.quick
                                                                         else DEFAULT_LOAD_FACTORS)
    args.load_factors = [float(f) for f in factors]
    if args.requests is None:
        args.requests = 16 if args.quick else 64
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
    if args.mix:
        from bench.serve_mix import main_mix

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
    print(f"# bench.serve\n\nmachine: {machine_description(device, args.threads)}  \ncommand: `{command_line('bench.serve', argv)}`  \n"
          f"model: {args.model}; queue: {mode}{f' ({args.workers} worker(s))' if mode == 'redis' else ''}; "
          f"{args.n} image(s)/request; steps: {args.steps or 'model default'}; cache: "
          f"{'mixed' if args.mixed_cache else json.dumps(args.cache)}; {args.requests} requests per rate\n", flush=True)
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
                _progress(f"  -> {row['throughput_images_per_s']} img/s, p50 {row['latency_p50_s']} s, "
                          f"p99 {row['latency_p99_s']} s, mean batch {row['batch_size_mean']}, failed {row['failed']}")
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

    best = {c.max_batch_size: max((r["throughput_images_per_s"] or 0.0 for r in rows if r["config"] == c.name),
                                  default=0.0) for c in clusters}
    low, high = min(best), max(best)
    ratio = clean_number(best[high] / best[low], 4) if low == 1 and high > 1 and best[low] > 0 else None
    result = {
        "throughput_ratio_batched_vs_single": ratio,
        "best_throughput_images_per_s": {f"batch{k}": v for k, v in best.items()},
        "rows": rows,
        "configs": [{"config": c.name, "max_batch_size": c.max_batch_size, "queue": mode,
                     "workers": args.workers if mode == "redis" else 0} for c in clusters],
        "settings": {"model": str(args.model), "requests_per_rate": args.requests, "images_per_request": args.n,
                     "steps": args.steps, "guidance_scale": args.guidance, "mixed_cache": args.mixed_cache,
                     "cache": args.cache, "rates_rps": rates, "load_factors": None if args.rates else args.load_factors,
                     "single_request_seconds": clean_number(single_seconds, 4), "threads": args.threads},
        "machine": machine_description(device, args.threads),
        "command": command_line("bench.serve", argv),
        "seconds": round(time.time() - started, 1),
    }
    print(markdown_table(
        ["config", "rate req/s", "throughput img/s", "p50 s", "p95 s", "p99 s", "queue wait s", "mean batch",
         "max batch", "ok/sent"],
        [[r["config"], fmt(r["rate_rps"], 3), fmt(r["throughput_images_per_s"], 3), fmt(r["latency_p50_s"], 3),
          fmt(r["latency_p95_s"], 3), fmt(r["latency_p99_s"], 3), fmt(r["queue_wait_mean_s"], 3),
          fmt(r["batch_size_mean"], 2), fmt(r["batch_size_max"]), f"{r['completed']}/{r['requests']}"]
         for r in rows]))
    print(f"\nthroughput batched vs one at a time: {fmt(ratio, 2)}x (best img/s per config: "
          f"{result['best_throughput_images_per_s']}); took {result['seconds']:.0f} s")
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
        points = sorted((r["throughput_images_per_s"], r["latency_p50_s"], r["latency_p95_s"], r["rate_rps"])
                        for r in rows if r["config"] == config and r["latency_p50_s"] is not None)
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
