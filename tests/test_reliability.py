"""Fault injection with real processes: API, workers and a real ``redis-server`` (append-only file on).

Each test injects one fault while jobs run and probes every route during it. It asserts that every
answer during the fault is 2xx, 429 or 503 (never a 500, never a dropped connection), and that after
recovery every accepted job has finished exactly once and nothing is lost. The figures each test
measures are printed at the end of the run (see ``tests/faults.py``); the README's Reliability
section quotes them.
"""

from __future__ import annotations

import json
import signal
import socket
import threading
import time

import httpx
import pytest

from tests.faults import FaultLedger
from tests.servers import RedisServer, Server, WorkerProcess, metric_samples, wait_until

RECLAIM = ("--reclaim-idle-seconds", "2", "--max-deliveries", "3")
CLIENT_TIMEOUT = 180.0  # far above any answer the service should give: a hang shows as "dropped"


def worker_flags(model_dir, *extra: str) -> tuple[str, ...]:
    return ("--model", str(model_dir), "--max-batch-size", "8", "--redis-timeout", "2", *RECLAIM, *extra)


def submit(client: httpx.Client, steps: int, seed: int = 0) -> str:
    response = client.post(
        "/v1/jobs", json={"prompt": str(seed % 10), "steps": steps, "seed": seed, "timeout_seconds": 600}
    )
    assert response.status_code == 202, response.text
    return response.json()["id"]


def status(client: httpx.Client, job_id: str) -> str:
    return client.get(f"/v1/jobs/{job_id}").json()["status"]


def setup_jobs(client: httpx.Client, ledger: FaultLedger, count: int, steps: int) -> tuple[str, str, list[str]]:
    """A finished job (for status/events probes), a cancelled one (for DELETE probes) and ``count`` running."""
    known = submit(client, 2, seed=1)
    wait_until(lambda: status(client, known) == "succeeded", 120)
    cancelled = submit(client, 200, seed=2)
    assert client.delete(f"/v1/jobs/{cancelled}").json()["status"] == "cancelled"
    ids = [submit(client, steps, seed=10 + i) for i in range(count)]
    ledger.accepted |= {known, cancelled, *ids}
    return known, cancelled, ids


def probe_until(
    ledger: FaultLedger,
    client: httpx.Client,
    known: str,
    cancelled: str,
    condition,
    timeout: float = 240,
    min_rounds: int = 2,
) -> None:
    """Probe every route, round after round, until ``condition()`` holds after at least ``min_rounds``."""
    deadline = time.monotonic() + timeout
    rounds = 0
    while rounds < min_rounds or not condition():
        assert time.monotonic() < deadline, f"{ledger.fault}: the fault did not reach its end state"
        ledger.probe_round(client, known, cancelled)
        rounds += 1


def test_a_worker_killed_mid_batch_loses_no_job_and_runs_none_twice(tiny_dit_dir, tmp_path):
    ledger = FaultLedger("worker SIGKILL mid-batch")
    redis_server = RedisServer(data_dir=tmp_path)
    victim = WorkerProcess(redis_server.url, *worker_flags(tiny_dit_dir))
    api = Server("--queue", redis_server.url, "--redis-timeout", "2")
    survivor = None
    try:
        with api.client(timeout=CLIENT_TIMEOUT) as client:
            known, cancelled, ids = setup_jobs(client, ledger, count=6, steps=120)
            wait_until(
                lambda: (
                    metric_samples(victim.metrics(), "fastcache_inflight_requests").get('{model="tiny-dit"}', 0) >= 2
                ),
                60,
            )
            victim.signal(signal.SIGKILL)  # mid-batch, no goodbye
            ledger.injected += 1
            survivor = WorkerProcess(redis_server.url, *worker_flags(tiny_dit_dir), wait_ready=False)

            def reclaimed() -> bool:
                try:
                    return metric_samples(survivor.metrics(), "fastcache_reclaimed_jobs_total").get("", 0) >= 1
                except httpx.HTTPError:  # the survivor is still loading its model
                    return False

            probe_until(ledger, client, known, cancelled, reclaimed)
            ledger.assert_answers_allowed()
            ledger.settle(client, redis_server.client())
        assert ledger.final_statuses["succeeded"] == len(ledger.accepted) - 1  # all but the cancelled one
    finally:
        ledger.record()
        api.stop()
        victim.stop()
        if survivor is not None:
            survivor.stop()
        redis_server.stop()


def test_redis_shut_down_and_restarted_answers_503_then_every_job_finishes_once(tiny_dit_dir, tmp_path):
    ledger = FaultLedger("redis shut down, restarted (append-only)")
    redis_server = RedisServer(data_dir=tmp_path)
    worker = WorkerProcess(redis_server.url, *worker_flags(tiny_dit_dir))
    api = Server("--queue", redis_server.url, "--redis-timeout", "2")
    try:
        with api.client(timeout=CLIENT_TIMEOUT) as client:
            known, cancelled, ids = setup_jobs(client, ledger, count=3, steps=200)
            wait_until(lambda: all(status(client, j) != "queued" for j in ids), 120)  # started
            redis_server.stop()
            ledger.injected += 1

            def worker_sees_the_outage() -> bool:  # the worker says why it is not ready (it keeps denoising)
                answer = httpx.get(f"{worker.url}/readyz", timeout=10)
                return answer.status_code == 503 and "redis" in answer.json().get("reason", "")

            probe_until(ledger, client, known, cancelled, worker_sees_the_outage)
            ready = client.get("/readyz")
            assert ready.status_code == 503 and "redis unreachable" in ready.json()["reason"]
            redis_server = RedisServer(port=redis_server.port, data_dir=tmp_path)
            probe_until(
                ledger, client, known, cancelled, lambda: client.get("/readyz").status_code == 200, min_rounds=1
            )
            ledger.assert_answers_allowed()
            assert ledger.answers["503"] > 0
            ledger.settle(client, redis_server.client())
    finally:
        ledger.record()
        api.stop()
        worker.stop()
        redis_server.stop()


def test_redis_paused_longer_than_a_request_timeout_answers_503_then_recovers(tiny_dit_dir, tmp_path):
    ledger = FaultLedger("redis SIGSTOP longer than the request timeout")
    request_timeout = 3.0
    redis_server = RedisServer(data_dir=tmp_path)
    worker = WorkerProcess(redis_server.url, *worker_flags(tiny_dit_dir))
    api = Server("--queue", redis_server.url, "--redis-timeout", "1", "--request-timeout", str(request_timeout))
    try:
        with api.client(timeout=CLIENT_TIMEOUT) as client:
            known, cancelled, ids = setup_jobs(client, ledger, count=3, steps=120)
            wait_until(lambda: all(status(client, j) != "queued" for j in ids), 120)  # started
            redis_server.pause()
            ledger.injected += 1
            paused_at = time.monotonic()
            try:
                probe_until(
                    ledger, client, known, cancelled, lambda: time.monotonic() - paused_at > 2 * request_timeout
                )
            finally:
                redis_server.resume()
            probe_until(
                ledger, client, known, cancelled, lambda: client.get("/readyz").status_code == 200, min_rounds=1
            )
            ledger.assert_answers_allowed()
            assert ledger.answers["503"] > 0
            ledger.settle(client, redis_server.client())
    finally:
        redis_server.resume()
        ledger.record()
        api.stop()
        worker.stop()
        redis_server.stop()


def test_an_api_restarted_mid_job_loses_nothing(tiny_dit_dir, tmp_path):
    ledger = FaultLedger("API restarted mid-job (SIGTERM, second replica serving)")
    redis_server = RedisServer(data_dir=tmp_path)
    worker = WorkerProcess(redis_server.url, *worker_flags(tiny_dit_dir))
    flags = ("--queue", redis_server.url, "--redis-timeout", "2")
    first, second = Server(*flags), Server(*flags)
    restarted = None
    try:
        with first.client(timeout=CLIENT_TIMEOUT) as client:
            known, cancelled, ids = setup_jobs(client, ledger, count=4, steps=100)
            answers: list[httpx.Response | None] = []
            sync = threading.Thread(
                target=lambda: answers.append(
                    ledger.request(
                        client, "POST", "/generate", json={"prompt": "5", "steps": 200, "timeout_seconds": 600}
                    )
                )
            )
            sync.start()
            r = redis_server.client()

            def held_request_running() -> bool:  # the /generate this API holds has started on the worker
                records = [
                    json.loads(r.get(k) or "{}") for k in r.scan_iter("fastcache:job:*") if not k.endswith(":attempts")
                ]
                return any(rec.get("route") == "generate" and rec.get("status") == "running" for rec in records)

            wait_until(held_request_running, 120)
            first.signal(signal.SIGTERM)  # a rolling update: it drains the request it holds, then exits
            ledger.injected += 1
            with second.client(timeout=CLIENT_TIMEOUT) as other:
                probe_until(ledger, other, known, cancelled, lambda: first.proc.poll() is not None)
            sync.join(CLIENT_TIMEOUT)
            assert first.proc.returncode == 0
            assert answers and answers[0] is not None and answers[0].status_code == 200, "the held request was lost"
            ledger.accepted.add(answers[0].json()["id"])
        restarted = Server(*flags, port=first.port)
        with restarted.client(timeout=CLIENT_TIMEOUT) as client:
            probe_until(ledger, client, known, cancelled, lambda: True, min_rounds=1)
            ledger.assert_answers_allowed()
            ledger.settle(client, redis_server.client())
    finally:
        ledger.record()
        for server in (first, second, restarted):
            if server is not None:
                server.stop()
        worker.stop()
        redis_server.stop()


def test_a_worker_stops_within_its_drain_timeout_while_redis_is_down(tiny_dit_dir, tmp_path):
    ledger = FaultLedger("worker SIGTERM while redis is down")
    drain_timeout = 5
    redis_server = RedisServer(data_dir=tmp_path)
    worker = WorkerProcess(redis_server.url, *worker_flags(tiny_dit_dir, "--drain-timeout", str(drain_timeout)))
    api = Server("--queue", redis_server.url, "--redis-timeout", "2")
    replacement = None
    try:
        with api.client(timeout=CLIENT_TIMEOUT) as client:
            known, cancelled, ids = setup_jobs(client, ledger, count=2, steps=200)
            wait_until(lambda: all(status(client, j) != "queued" for j in ids), 120)  # started
            redis_server.stop()
            ledger.injected += 2
            wait_until(lambda: httpx.get(f"{worker.url}/readyz", timeout=10).status_code == 503, 60)
            worker.signal(signal.SIGTERM)
            # the bound: drain timeout plus a generous margin for one Redis operation in progress
            worker.proc.wait(drain_timeout + 60)
            assert worker.proc.returncode == 0, worker.log()
            probe_until(ledger, client, known, cancelled, lambda: True, min_rounds=1)
            redis_server = RedisServer(port=redis_server.port, data_dir=tmp_path)
            replacement = WorkerProcess(redis_server.url, *worker_flags(tiny_dit_dir))
            ledger.assert_answers_allowed()
            ledger.settle(client, redis_server.client())  # the stopped worker's jobs ran again, stored once
        assert ledger.final_statuses["succeeded"] == len(ledger.accepted) - 1
    finally:
        ledger.record()
        api.stop()
        worker.stop()
        if replacement is not None:
            replacement.stop()
        redis_server.stop()


# ------------------------------------------------------------------------------ client disconnects


@pytest.fixture(scope="module")
def full_batch_server(tiny_dit_dir):
    s = Server("--model", str(tiny_dit_dir), "--max-batch-size", "8")
    yield s
    s.stop()


def in_flight(server: Server) -> float:
    return metric_samples(server.metrics(), "fastcache_inflight_requests").get('{model="tiny-dit"}', 0)


def outcomes(server: Server, route: str, status_code: str) -> float:
    samples = metric_samples(server.metrics(), "fastcache_request_duration_seconds_count")
    return samples.get(f'{{model="tiny-dit",route="{route}",status="{status_code}"}}', 0)


@pytest.mark.parametrize(
    "path,route,body",
    [
        ("/generate", "generate", '{"prompt": "4", "steps": 200, "n": 8}'),
        ("/v1/images/generations", "openai", '{"prompt": "4", "steps": 200, "n": 8, "size": "16x16"}'),
    ],
)
def test_a_client_that_disconnects_cancels_its_job_and_frees_the_slot(full_batch_server, path, route, body):
    server = full_batch_server  # the request fills every slot of the batch
    before = outcomes(server, route, "499")
    request = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n{body}"
    ).encode()
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as connection:
        connection.sendall(request)
        wait_until(lambda: in_flight(server) == 1, 60, lambda: "the request never started")
    # the client is gone: the job is cancelled (outcome 499) and its batch slots free
    wait_until(
        lambda: outcomes(server, route, "499") == before + 1 and in_flight(server) == 0,
        60,
        lambda: "the abandoned job kept its slots",
    )
    response = httpx.post(f"{server.url}/generate", json={"prompt": "1", "steps": 2, "n": 8}, timeout=60)
    assert response.status_code == 200
