"""Load generation shared by the serving benchmarks: service processes, open-loop and sequential clients."""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from bench.common import REPO

MIXED_CACHE = (
    {},  # the model's default (calibrated) FastCache setting
    {"method": "none"},
    {"method": "fastcache", "tolerance": 0.06},  # a window of 0.08 of the run on the bundled model
    {"method": "teacache", "tolerance": 0.1},
    {"method": "fbcache", "tolerance": 0.1},
)


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
        # the child writes through its own copy of the descriptor; ours can close once it has started
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                args, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO, start_new_session=True
            )

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
        env.update(
            {
                "PYTHONUNBUFFERED": "1",
                "HF_HUB_OFFLINE": "1",
                "OMP_NUM_THREADS": str(a.threads),
                "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")])),
            }
        )
        common = [
            "--model",
            str(a.model),
            "--max-batch-size",
            str(self.max_batch_size),
            "--threads",
            str(a.threads),
            "--log-level",
            "warning",
        ]
        if a.device:
            common += ["--device", a.device]
        self.queue = a.queue
        if a.start_redis:
            binary = shutil.which("redis-server") or "/usr/bin/redis-server"
            port = free_port()
            self.children.append(
                Child(
                    f"{self.name}-redis",
                    [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
                    env,
                    self.log_dir,
                )
            )
            self.queue = f"redis://127.0.0.1:{port}/0"
            self._wait(lambda: _redis_ping(self.queue), 30, "redis-server")
        if self.queue != "local":
            for i in range(a.workers):
                port = free_port()
                self.worker_urls.append(f"http://127.0.0.1:{port}")
                self.children.append(
                    Child(
                        f"{self.name}-worker{i}",
                        [
                            python,
                            "-m",
                            "service.worker_process",
                            "--redis",
                            self.queue,
                            "--host",
                            "127.0.0.1",
                            "--metrics-port",
                            str(port),
                            *common,
                        ],
                        env,
                        self.log_dir,
                    )
                )
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.children.append(
            Child(
                f"{self.name}-api",
                [
                    python,
                    "-m",
                    "service",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(port),
                    "--queue",
                    self.queue,
                    "--max-queue",
                    str(a.max_queue),
                    *common,
                ],
                env,
                self.log_dir,
            )
        )

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
                raise RuntimeError(
                    f"{self.name}: {dead[0].name} exited with {dead[0].proc.returncode}:\n{dead[0].tail()}"
                )
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
    body: dict[str, Any] = {
        "prompt": str(i % 10),
        "n": args.n,
        "seed": args.seed + 1000 * i,
        "timeout_seconds": float(args.timeout),
    }
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


async def open_loop(
    url: str, rate: float, count: int, args: argparse.Namespace, seed: int, bodies: list[dict[str, Any]] | None = None
) -> tuple[list[Outcome], float]:
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
        for at, body in zip(arrivals, bodies, strict=True):
            delay = start + at - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(_send(client, body, start + at, loop)))
        outcomes = await asyncio.gather(*tasks)
    return [
        Outcome(o.scheduled - start, o.sent - start, o.done - start, o.status, o.images, o.error) for o in outcomes
    ], start


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
