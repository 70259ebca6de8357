"""``python -m bench.serve --memory``: Redis memory per finished job and the API replica's weight, per result store.

For each result store named (``redis``: images inline in Redis, the default; ``s3``: an S3-compatible
object store, ``AWS_ENDPOINT_URL`` and credentials from the environment, or moto's standalone server
started here when ``AWS_ENDPOINT_URL`` is unset; ``file``: a directory) it starts a throwaway
``redis-server``, one worker and one API replica (``--queue redis://``), and reports

* ``api_ready_seconds``: from starting the API process to its first ``/readyz`` 200 (a worker is up
  already), the median of ``READY_STARTS`` starts;
* Redis memory per finished job: ``INFO memory`` ``used_memory`` after ``--requests`` ``/generate`` requests
  minus before, over the jobs: right after they finished (``*_just_finished``), and once each job's events
  stream has expired (``EVENTS_AFTER_RESULT_SECONDS`` later: what a job costs for the rest of its TTL);
* the same for ``used_memory_dataset`` (``used_memory`` less Redis' own overhead: client buffers,
  the key tables, scripts);
* ``MEMORY USAGE`` summed over every key, after minus before, per job (the data alone, without the
  allocator's and the client buffers' noise), and of one finished job's record, on average;
* the API replica's RSS after serving them, and whether torch is mapped into it.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import httpx

from bench.common import clean_number, command_line, fmt, machine_description, markdown_table, write_json
from bench.load import Child, free_port

STORES = ("redis", "s3", "file")
BUCKET = "fastcache-bench"
CONCURRENCY = 4
READY_STARTS = 5


def _wait(condition: Callable[[], bool], timeout: float, what: str, children: list[Child], interval: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        dead = [c for c in children if not c.alive()]
        if dead:
            raise RuntimeError(f"{dead[0].name} exited with {dead[0].proc.returncode}:\n{dead[0].tail()}")
        time.sleep(interval)
    raise RuntimeError(f"{what} not ready after {timeout:.0f} s")


def _ok(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def _torch_mapped(pid: int) -> bool:
    maps = Path(f"/proc/{pid}/maps")
    if not maps.exists():
        return False
    return any("libtorch" in line for line in maps.read_text().splitlines())


def _key_bytes(r: Any) -> int:
    """``MEMORY USAGE`` summed over every key: what the data takes, without allocator and buffer noise."""
    return sum(int(r.memory_usage(key, samples=0) or 0) for key in r.scan_iter(count=1000))


def _rss_bytes(pid: int) -> int:
    import psutil

    return int(psutil.Process(pid).memory_info().rss)


def _start_moto(env: dict[str, str], log_dir: Path, children: list[Child]) -> str:
    """moto's standalone S3 server on loopback (the test extra installs it), with the benchmark's bucket."""
    binary = shutil.which("moto_server", path=str(Path(sys.executable).parent)) or shutil.which("moto_server")
    if binary is None:
        raise RuntimeError("--memory s3 needs AWS_ENDPOINT_URL and credentials, or moto_server (moto[server])")
    port = free_port()
    children.append(Child("moto", [binary, "-H", "127.0.0.1", "-p", str(port)], env, log_dir))
    endpoint = f"http://127.0.0.1:{port}"
    _wait(lambda: _ok(f"{endpoint}/moto-api/"), 60, "moto_server", children, 0.2)
    return endpoint


def measure_store(store: str, args: argparse.Namespace, log_dir: Path, progress: Callable[[str], None]) -> dict:
    """Start redis-server, a worker and an API with ``store``; load it; measure Redis memory and the API."""
    import redis

    from service.queue.redis_protocol import EVENTS_AFTER_RESULT_SECONDS

    python = args.python or sys.executable
    env = dict(os.environ)
    env.update({"PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(args.threads)})
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH")]))
    children: list[Child] = []
    scratch = Path(tempfile.mkdtemp(prefix="bench-memory-"))
    try:
        if store == "s3":
            if not env.get("AWS_ENDPOINT_URL"):
                env.update(
                    AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench-secret", AWS_DEFAULT_REGION="us-east-1"
                )
                env["AWS_ENDPOINT_URL"] = _start_moto(env, log_dir, children)
            import boto3

            client = boto3.session.Session(
                aws_access_key_id=env.get("AWS_ACCESS_KEY_ID"),
                aws_secret_access_key=env.get("AWS_SECRET_ACCESS_KEY"),
                region_name=env.get("AWS_DEFAULT_REGION", "us-east-1"),
            ).client("s3", endpoint_url=env["AWS_ENDPOINT_URL"])
            existing = {b["Name"] for b in client.list_buckets().get("Buckets", [])}
            if BUCKET not in existing:
                client.create_bucket(Bucket=BUCKET)
            store_url = f"s3://{BUCKET}/bench-{int(time.time())}"
        elif store == "file":
            store_url = f"file://{scratch / 'results'}"
        else:
            store_url = "redis"
        binary = shutil.which("redis-server") or "/usr/bin/redis-server"
        redis_port = free_port()
        children.append(
            Child(
                "redis",
                [binary, "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
                env,
                log_dir,
            )
        )
        redis_url = f"redis://127.0.0.1:{redis_port}/0"
        r = redis.Redis.from_url(redis_url, decode_responses=True)

        def redis_up() -> bool:
            try:
                return bool(r.ping())
            except redis.RedisError:
                return False

        _wait(redis_up, 30, "redis-server", children, 0.1)
        common = ["--model", str(args.model), "--threads", str(args.threads), "--log-level", "warning"]
        common += ["--result-store", store_url, "--max-batch-size", "8"]
        worker_port = free_port()
        worker_cmd = [python, "-m", "service.worker_process", "--redis", redis_url, "--host", "127.0.0.1"]
        worker_cmd += ["--metrics-port", str(worker_port), *common]
        children.append(Child(f"{store}-worker", worker_cmd, env, log_dir))
        _wait(lambda: _ok(f"http://127.0.0.1:{worker_port}/readyz"), args.ready_timeout, "worker", children, 0.2)
        # the API is started READY_STARTS times (the median start is reported); the last one takes the load
        ready: list[float] = []
        for start in range(READY_STARTS):
            api_port = free_port()
            url = f"http://127.0.0.1:{api_port}"
            api_cmd = [python, "-m", "service", "--host", "127.0.0.1", "--port", str(api_port), "--queue", redis_url]
            api_cmd += ["--result-store", store_url, "--max-queue", "1024", "--log-level", "warning"]
            started = time.monotonic()
            api = Child(f"{store}-api{start}", api_cmd, env, log_dir)
            children.append(api)
            _wait(lambda u=url: _ok(f"{u}/readyz"), args.ready_timeout, "API", children, 0.02)
            ready.append(time.monotonic() - started)
            if start < READY_STARTS - 1:
                api.stop()
                children.remove(api)
        ready_seconds = statistics.median(ready)
        progress(f"{store}: API ready in {', '.join(f'{r:.2f}' for r in ready)} s; warming up")
        body = {"prompt": "7", "n": args.n, "steps": args.steps or 50}
        warm = httpx.post(f"{url}/generate", json={**body, "seed": 0}, timeout=args.timeout)
        warm.raise_for_status()
        before_info = r.info("memory")
        before = int(before_info["used_memory"])
        dataset_before = int(before_info["used_memory_dataset"])
        keys_before = _key_bytes(r)
        progress(f"{store}: {args.requests} requests of {args.n} image(s)")
        ids, image_bytes = asyncio.run(_load(url, body, args))
        just_finished = int(r.info("memory")["used_memory"])
        record_bytes = [int(r.memory_usage(f"fastcache:job:{i}") or 0) for i in ids]
        events_bytes = [int(r.memory_usage(f"fastcache:events:{i}") or 0) for i in ids]
        rss = _rss_bytes(api.proc.pid)
        torch_loaded = _torch_mapped(api.proc.pid)
        progress(f"{store}: waiting {EVENTS_AFTER_RESULT_SECONDS + 2} s for the events streams to expire")
        time.sleep(EVENTS_AFTER_RESULT_SECONDS + 2)
        r.ping()  # expiry is also lazy: touch nothing, just let the active cycle run
        steady_info = r.info("memory")
        steady = int(steady_info["used_memory"])
        dataset_steady = int(steady_info["used_memory_dataset"])
        keys_steady = _key_bytes(r)
        jobs = len(ids)
        return {
            "result_store": store,
            "result_store_url": store_url,
            "jobs": jobs,
            "images_per_job": args.n,
            "image_bytes_mean": clean_number(statistics.fmean(image_bytes), 1) if image_bytes else None,
            "redis_bytes_per_job_just_finished": clean_number((just_finished - before) / jobs, 1),
            "redis_bytes_per_job": clean_number((steady - before) / jobs, 1),
            "redis_dataset_bytes_per_job": clean_number((dataset_steady - dataset_before) / jobs, 1),
            "redis_key_bytes_per_job": clean_number((keys_steady - keys_before) / jobs, 1),
            "record_memory_usage_bytes_mean": clean_number(statistics.fmean(record_bytes), 1),
            "events_memory_usage_bytes_mean": clean_number(statistics.fmean(events_bytes), 1),
            "api_rss_bytes": rss,
            "api_ready_seconds": clean_number(ready_seconds, 3),
            "api_ready_seconds_each_start": [clean_number(r, 3) for r in ready],
            "api_torch_loaded": torch_loaded,
        }
    finally:
        for child in reversed(children):
            child.stop()
        shutil.rmtree(scratch, ignore_errors=True)


async def _load(url: str, body: dict[str, Any], args: argparse.Namespace) -> tuple[list[str], list[int]]:
    """``--requests`` ``/generate`` calls, ``CONCURRENCY`` at a time; the job ids and each image's size."""
    import base64

    semaphore = asyncio.Semaphore(CONCURRENCY)
    ids: list[str] = []
    sizes: list[int] = []
    async with httpx.AsyncClient(base_url=url, timeout=args.timeout) as client:

        async def one(index: int) -> None:
            async with semaphore:
                response = await client.post("/generate", json={**body, "seed": 1 + index * args.n})
                response.raise_for_status()
                answer = response.json()
                ids.append(answer["id"])
                sizes.extend(len(base64.b64decode(image["b64_json"])) for image in answer["images"])

        await asyncio.gather(*(one(i) for i in range(args.requests)))
    return ids, sizes


def main_memory(
    args: argparse.Namespace, argv: Sequence[str] | None, log_dir: Path, progress: Callable[[str], None]
) -> dict[str, Any]:
    started = time.time()
    rows = [measure_store(store, args, log_dir, progress) for store in args.memory]
    result = {
        "rows": rows,
        "settings": {"model": str(args.model), "requests": args.requests, "n": args.n, "steps": args.steps or 50},
        "machine": machine_description("cpu", args.threads),
        "command": command_line("bench.serve", argv),
        "seconds": round(time.time() - started, 1),
    }
    print(
        markdown_table(
            [
                "result store",
                "jobs",
                "image bytes",
                "Redis bytes/job (steady)",
                "keys bytes/job (steady)",
                "Redis bytes/job (just finished)",
                "record bytes",
                "API RSS MB",
                "API ready s",
                "torch in API",
            ],
            [
                [
                    row["result_store"],
                    row["jobs"],
                    fmt(row["image_bytes_mean"], 0),
                    fmt(row["redis_bytes_per_job"], 0),
                    fmt(row["redis_key_bytes_per_job"], 0),
                    fmt(row["redis_bytes_per_job_just_finished"], 0),
                    fmt(row["record_memory_usage_bytes_mean"], 0),
                    fmt(row["api_rss_bytes"] / 2**20, 1),
                    fmt(row["api_ready_seconds"], 2),
                    "yes" if row["api_torch_loaded"] else "no",
                ]
                for row in rows
            ],
        )
    )
    if args.json:
        write_json(args.json, result)
    return result
