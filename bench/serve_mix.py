"""``python -m bench.serve --mix``: the service under mixed traffic, against each kind served alone.

Mixes (``--mix``, a comma list; default all three). Each is a set of request *kinds* with weights:

* ``resolutions``: 80% at the model's native size (32x32 for the bundled model), 20% at 1.5x (48x48);
  ``--mix-sizes`` gives other sizes (first = the common kind).
* ``steps``: 80% at the model's default steps (50 for the bundled model, or ``--steps``), 20% at half.
* ``cache``: the five cache settings of ``--mixed-cache``, 20% each.

Requests are drawn from a mix in its exact proportions (largest remainder, then shuffled with a
seed): a random draw would let the share of a costly kind, and with it the measured capacity, drift.

For each mix, on one service with ``--max-batch-size`` = the largest of ``--batch-sizes``:

1. **Homogeneous capacity** of each kind: a closed loop keeping ``2 x max batch size`` requests
   outstanding, ``--requests`` requests of that kind only; capacity = images / (last response - start).
2. **Expected mixed capacity**: the harmonic mean of those capacities weighted by the mix,
   ``1 / sum_k(w_k / C_k)`` - what serving the kinds one after the other would achieve.
3. **Mixed capacity**: the same closed loop, the requests drawn from the mix.
4. ``mixed_efficiency`` = mixed capacity / expected capacity (1.0: mixing costs nothing).
   Steps 1-4 form a *round*; ``--mix-repeats`` rounds run one after the other and the round with the
   median efficiency is reported (every round is in ``rounds``): a shared CPU's speed drifts by tens of
   percent over minutes, and a round keeps the runs it compares a minute apart.
5. **Latency per kind**: an open loop (Poisson arrivals) at ``--mix-load`` x the measured mixed
   capacity, kinds drawn from the mix: p50/p95/p99 per kind. Each kind is then served alone at ``--mix-load`` x
   its own capacity (the same load, as many requests as the mixed run), and ``p99_vs_alone`` = its p99
   in the mix / its p99 alone. Latency uses ``--mix-latency-requests`` requests (default 2 x
   ``--requests``): the rarer kind of an 80/20 mix needs enough requests for a p99.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import time
from pathlib import Path
from typing import Any

import httpx

from bench.common import clean_number, command_line, fmt, machine_description, markdown_table, percentile, write_json
from bench.load import MIXED_CACHE, Cluster, _send, open_loop, request_body

MIXES = ("resolutions", "steps", "cache")

COMMON_WEIGHT, RARE_WEIGHT = 0.8, 0.2  # the 80/20 mixes: the common kind, then the rarer one


def model_sizes(model: str) -> tuple[int, int]:
    """(native size, size multiple) in pixels of a DiT-style pipeline directory, from its configs."""
    root = Path(model)
    transformer = json.loads((root / "transformer" / "config.json").read_text())
    vae = json.loads((root / "vae" / "config.json").read_text())
    factor = 2 ** (len(vae["block_out_channels"]) - 1)
    return transformer["sample_size"] * factor, transformer.get("patch_size", 1) * factor


def model_default_steps(model: str) -> int:
    path = Path(model) / "fastcache_serving.json"
    if path.is_file():
        return int(json.loads(path.read_text()).get("default_steps", 50))
    return 50


def mix_kinds(mix: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    """The kinds of one mix: ``{"kind": name, "weight": w, "fields": request fields}``."""
    if mix == "resolutions":
        if args.mix_sizes:
            common, rare = args.mix_sizes
        else:
            native, multiple = model_sizes(args.model)
            common, rare = native, max(multiple, round(1.5 * native / multiple) * multiple)
        return [
            {"kind": f"{common}x{common}", "weight": COMMON_WEIGHT, "fields": {"width": common, "height": common}},
            {"kind": f"{rare}x{rare}", "weight": RARE_WEIGHT, "fields": {"width": rare, "height": rare}},
        ]
    if mix == "steps":
        full = args.steps or model_default_steps(args.model)
        half = max(1, full // 2)
        return [
            {"kind": f"steps{full}", "weight": COMMON_WEIGHT, "fields": {"steps": full}},
            {"kind": f"steps{half}", "weight": RARE_WEIGHT, "fields": {"steps": half}},
        ]
    if mix == "cache":
        names = ["default" if not c else " ".join(f"{k}={v}" for k, v in c.items()) for c in MIXED_CACHE]
        return [
            {"kind": name, "weight": 1 / len(MIXED_CACHE), "fields": {"cache": dict(c)}}
            for name, c in zip(names, MIXED_CACHE, strict=True)
        ]
    raise ValueError(f"unknown mix {mix!r}; choose from {', '.join(MIXES)}")


def mix_picks(weights: list[float], count: int, rng: random.Random) -> list[int]:
    """``count`` kind indexes in the mix's exact proportions (largest remainder), shuffled."""
    quotas = [w * count / sum(weights) for w in weights]
    counts = [int(q) for q in quotas]
    by_remainder = sorted(range(len(weights)), key=lambda i: (counts[i] - quotas[i], i))
    for i in by_remainder[: count - sum(counts)]:
        counts[i] += 1
    picks = [i for i, n in enumerate(counts) for _ in range(n)]
    rng.shuffle(picks)
    return picks


def bodies_for(
    kinds: list[dict[str, Any]], count: int, args: argparse.Namespace, seed: int, only: int | None = None
) -> tuple[list[dict[str, Any]], list[int]]:
    """``count`` request bodies (kind ``only``, or the mix in its proportions) and their kind indexes."""
    rng = random.Random(seed)
    picks = [only] * count if only is not None else mix_picks([k["weight"] for k in kinds], count, rng)
    bodies = []
    for i, pick in enumerate(picks):
        body = request_body(i, args, rng)
        body.update(kinds[pick]["fields"])
        bodies.append(body)
    return bodies, picks


async def closed_loop(url: str, bodies: list[dict[str, Any]], concurrency: int, timeout: float):
    """Send ``bodies`` keeping ``concurrency`` requests outstanding; outcomes in body order, and the start time."""
    loop = asyncio.get_running_loop()
    outcomes: list[Any] = [None] * len(bodies)
    next_index = 0
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(base_url=url, timeout=timeout + 60, limits=limits) as client:
        start = loop.time()

        async def user() -> None:
            nonlocal next_index
            while next_index < len(bodies):
                index = next_index
                next_index += 1
                outcomes[index] = await _send(client, bodies[index], loop.time(), loop)

        await asyncio.gather(*(user() for _ in range(concurrency)))
    return outcomes, start


def capacity(outcomes: list[Any], start: float) -> float:
    """Images per second completed by a closed loop."""
    ok = [o for o in outcomes if o.status == 200]
    if not ok:
        return 0.0
    span = max(o.done for o in ok) - start
    return sum(len(o.images) for o in ok) / span if span > 0 else 0.0


def latency(outcomes: list[Any]) -> dict[str, Any]:
    ok = [o for o in outcomes if o.status == 200]
    values = [o.done - o.scheduled for o in ok]
    return {
        "completed": len(ok),
        "requests": len(outcomes),
        "latency_p50_s": clean_number(percentile(values, 50), 4),
        "latency_p95_s": clean_number(percentile(values, 95), 4),
        "latency_p99_s": clean_number(percentile(values, 99), 4),
    }


def run_mix(mix: str, url: str, max_batch_size: int, args: argparse.Namespace, progress) -> dict[str, Any]:
    """Measure one mix on a running service (see the module docstring)."""
    kinds = mix_kinds(mix, args)
    concurrency = 2 * max_batch_size
    images_per_request = args.n
    for index, kind in enumerate(kinds):  # first-call costs of each kind (e.g. a new resolution) off the clock
        warm, _ = bodies_for(kinds, 1, args, args.seed, only=index)
        outcomes, _ = asyncio.run(closed_loop(url, warm, 1, args.timeout))
        if outcomes[0].status != 200:
            raise RuntimeError(f"{mix}/{kind['kind']}: warm-up failed ({outcomes[0].status}): {outcomes[0].error}")
    rounds = []
    for round_index in range(args.mix_repeats):
        seed = args.seed + 1000 * round_index
        capacities = []
        for index, kind in enumerate(kinds):
            bodies, _ = bodies_for(kinds, args.requests, args, seed + 100 + index, only=index)
            outcomes, start = asyncio.run(closed_loop(url, bodies, concurrency, args.timeout))
            capacities.append(clean_number(capacity(outcomes, start), 4))
            progress(f"{mix} round {round_index + 1}: {kind['kind']} alone: {capacities[-1]} img/s")
        expected = (
            1.0 / sum(k["weight"] / c for k, c in zip(kinds, capacities, strict=True)) if all(capacities) else 0.0
        )
        bodies, _ = bodies_for(kinds, args.requests, args, seed + 200)
        outcomes, start = asyncio.run(closed_loop(url, bodies, concurrency, args.timeout))
        mixed = capacity(outcomes, start)
        efficiency = mixed / expected if expected > 0 else None
        progress(
            f"{mix} round {round_index + 1}: mixed {mixed:.3f} img/s, expected {expected:.3f} "
            f"-> mixed_efficiency {fmt(efficiency, 3)}"
        )
        rounds.append(
            {
                "capacities_images_per_s": capacities,
                "expected_capacity_images_per_s": clean_number(expected, 4),
                "mixed_capacity_images_per_s": clean_number(mixed, 4),
                "mixed_efficiency": clean_number(efficiency, 4),
            }
        )
    ranked = sorted(rounds, key=lambda r: r["mixed_efficiency"] if r["mixed_efficiency"] is not None else -1.0)
    reported = ranked[(len(ranked) - 1) // 2]  # the median round (the lower one of an even count)
    for kind, value in zip(kinds, reported["capacities_images_per_s"], strict=True):
        kind["capacity_images_per_s"] = value
    expected = reported["expected_capacity_images_per_s"] or 0.0
    mixed, efficiency = reported["mixed_capacity_images_per_s"] or 0.0, reported["mixed_efficiency"]
    if mixed <= 0:
        raise RuntimeError(f"{mix}: the mixed run completed no request (see the service logs)")
    # latency at the same load (utilization): the mix at load x its measured capacity, each kind alone at
    # load x its own capacity. Loading the mix by its expected capacity would run it hotter than the kinds
    # alone whenever mixing costs throughput, which mixed_efficiency already reports.
    rate = args.mix_load * mixed / images_per_request
    latency_requests = args.mix_latency_requests
    bodies, picks = bodies_for(kinds, latency_requests, args, args.seed + 300)
    outcomes, _ = asyncio.run(open_loop(url, rate, latency_requests, args, args.seed + 300, bodies=bodies))
    for index, kind in enumerate(kinds):
        kind.update(latency([o for o, p in zip(outcomes, picks, strict=True) if p == index]))
        alone_rate = args.mix_load * kind["capacity_images_per_s"] / images_per_request
        # as many requests as the mixed run: queues need the same time to build up at the same load
        alone_count = latency_requests
        alone_bodies, _ = bodies_for(kinds, alone_count, args, args.seed + 400 + index, only=index)
        alone, _ = asyncio.run(
            open_loop(url, alone_rate, alone_count, args, args.seed + 400 + index, bodies=alone_bodies)
        )
        alone_latency = latency(alone)
        kind["alone_rate_rps"] = clean_number(alone_rate, 4)
        for key in ("latency_p50_s", "latency_p95_s", "latency_p99_s"):
            kind[f"alone_{key}"] = alone_latency[key]
        p99, alone_p99 = kind["latency_p99_s"], kind["alone_latency_p99_s"]
        kind["p99_vs_alone"] = clean_number(p99 / alone_p99, 4) if p99 is not None and alone_p99 else None
        kind["request"] = kind.pop("fields")
    return {
        "mix": mix,
        "mixed_efficiency": clean_number(efficiency, 4),
        "expected_capacity_images_per_s": clean_number(expected, 4),
        "mixed_capacity_images_per_s": clean_number(mixed, 4),
        "rounds": rounds,
        "load_factor": args.mix_load,
        "latency_requests": latency_requests,
        "mixed_rate_rps": clean_number(rate, 4),
        "failed": sum(1 for o in outcomes if o.status != 200),
        "kinds": kinds,
    }


def print_mix(result: dict[str, Any]) -> None:
    print(f"\n## mix: {result['mix']}\n")
    print(
        markdown_table(
            ["kind", "weight", "alone img/s", "p50 s", "p95 s", "p99 s", "p99 alone s", "p99 vs alone", "ok/sent"],
            [
                [
                    k["kind"],
                    fmt(k["weight"], 2),
                    fmt(k["capacity_images_per_s"], 3),
                    fmt(k["latency_p50_s"], 3),
                    fmt(k["latency_p95_s"], 3),
                    fmt(k["latency_p99_s"], 3),
                    fmt(k["alone_latency_p99_s"], 3),
                    fmt(k["p99_vs_alone"], 2),
                    f"{k['completed']}/{k['requests']}",
                ]
                for k in result["kinds"]
            ],
        )
    )
    rounds = ", ".join(fmt(r["mixed_efficiency"], 3) for r in result["rounds"])
    print(
        f"\nmixed_efficiency {fmt(result['mixed_efficiency'], 3)}: measured "
        f"{fmt(result['mixed_capacity_images_per_s'], 3)} img/s / expected "
        f"{fmt(result['expected_capacity_images_per_s'], 3)} img/s (weighted harmonic mean of the kinds alone), "
        f"the median of {len(result['rounds'])} rounds ({rounds}); "
        f"latency at {result['load_factor']:g}x the measured capacity, {result['latency_requests']} requests"
    )


def main_mix(args: argparse.Namespace, argv, log_dir: Path, progress) -> dict[str, Any]:
    """Run every ``--mix`` on one service configuration and report (see the module docstring)."""
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    max_batch_size = max(args.batch_sizes)
    print(
        f"# bench.serve --mix\n\nmachine: {machine_description(device, args.threads)}  \n"
        f"command: `{command_line('bench.serve', argv)}`  \nmodel: {args.model}; max batch size {max_batch_size}; "
        f"{args.requests} requests per capacity measurement, {args.mix_repeats} rounds; latency at "
        f"{args.mix_load:g}x the measured capacity, {args.mix_latency_requests} requests per run\n",
        flush=True,
    )
    started = time.time()
    cluster = Cluster(f"mix-batch{max_batch_size}", max_batch_size, args, log_dir)
    results = []
    try:
        cluster.start()
        cluster.wait_ready(args.ready_timeout)
        for mix in args.mix:
            result = run_mix(mix, cluster.url, max_batch_size, args, progress)
            print_mix(result)
            results.append(result)
    finally:
        cluster.stop()
    output = {
        "mixed_efficiency": {r["mix"]: r["mixed_efficiency"] for r in results},
        "mixes": results,
        "config": {
            "max_batch_size": max_batch_size,
            "queue": "redis" if cluster.queue != "local" else "local",
            "workers": args.workers if cluster.queue != "local" else 0,
        },
        "settings": {
            "model": str(args.model),
            "requests_per_measurement": args.requests,
            "latency_requests": args.mix_latency_requests,
            "repeats": args.mix_repeats,
            "images_per_request": args.n,
            "steps": args.steps,
            "load_factor": args.mix_load,
            "threads": args.threads,
            "closed_loop_concurrency": 2 * max_batch_size,
        },
        "machine": machine_description(device, args.threads),
        "command": command_line("bench.serve", argv),
        "seconds": round(time.time() - started, 1),
    }
    if args.json:
        write_json(args.json, output)
    return output
