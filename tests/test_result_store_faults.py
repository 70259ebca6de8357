"""Object-store faults with real processes: API, worker, ``redis-server`` (append-only) and moto's S3 server.

While jobs run the store goes down (a TCP relay in front of it refuses and cuts connections) or hangs
(SIGSTOP). The worker retries the uploads with backoff and takes no new work meanwhile; nothing is
lost or stored twice; clients get 503 + Retry-After only where they must wait for the store (an
inline image to read), while submits, statuses of running jobs, URLs and readiness keep answering.
"""

from __future__ import annotations

import json
import signal
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.faults import FaultLedger
from tests.objectstore import BUCKET, MotoServer, TcpGate
from tests.servers import RedisServer, Server, WorkerProcess, metric_samples, wait_until

CLIENT_TIMEOUT = 180.0
STORE = ("--result-store", f"s3://{BUCKET}/faults")
WORKER_FLAGS = ("--max-batch-size", "8", "--redis-timeout", "2", "--reclaim-idle-seconds", "2", "--max-deliveries", "3")


@pytest.fixture
def stack(tiny_dit_dir, tmp_path) -> Iterator[tuple[MotoServer, TcpGate, RedisServer, Server, WorkerProcess]]:
    moto = MotoServer()
    gate = TcpGate(moto.port)
    redis_server = RedisServer(data_dir=tmp_path)
    env = moto.env(endpoint=gate.endpoint)
    worker = WorkerProcess(redis_server.url, "--model", str(tiny_dit_dir), *WORKER_FLAGS, *STORE, env=env)
    api = Server("--queue", redis_server.url, "--redis-timeout", "2", *STORE, env=env)
    yield moto, gate, redis_server, api, worker
    api.stop()
    worker.stop()
    redis_server.stop()
    gate.close()
    moto.signal(signal.SIGCONT)
    moto.stop()


def submit(client: httpx.Client, steps: int, seed: int, **extra) -> str:
    body = {"prompt": str(seed % 10), "steps": steps, "seed": seed, "timeout_seconds": 600, **extra}
    response = client.post("/v1/jobs", json=body)
    assert response.status_code == 202, response.text
    return response.json()["id"]


def status(client: httpx.Client, job_id: str) -> str:
    return client.get(f"/v1/jobs/{job_id}").json()["status"]


def upload_errors(worker: WorkerProcess) -> float:
    return metric_samples(worker.metrics(), "fastcache_result_uploads_total").get('{outcome="error"}', 0)


def run_fault(
    ledger: FaultLedger,
    stack,
    inject: Callable[[], None],
    repair: Callable[[], None],
) -> None:
    """Jobs running, then the fault; every route probed until the worker has failed uploads; then the repair."""
    moto, _, redis_server, api, worker = stack
    with api.client(timeout=CLIENT_TIMEOUT) as client, ThreadPoolExecutor(4) as waiting:
        known = submit(client, 2, seed=1)
        linked = submit(client, 2, seed=2, response_format="url")
        wait_until(lambda: status(client, known) == "succeeded" and status(client, linked) == "succeeded", 120)
        cancelled = submit(client, 200, seed=3)
        assert client.delete(f"/v1/jobs/{cancelled}").json()["status"] == "cancelled"
        running = [submit(client, 40, seed=10 + i) for i in range(3)]
        ledger.accepted |= {known, linked, cancelled, *running}
        wait_until(lambda: all(status(client, j) != "queued" for j in running), 120)
        inject()
        ledger.injected += 1
        # the waiting routes (they answer once the store is back), sent while the store is away
        synchronous = [
            waiting.submit(ledger.request, client, "POST", "/generate", json={"prompt": "2", "steps": 2}),
            waiting.submit(
                ledger.request, client, "POST", "/v1/images/generations", json={"prompt": "3", "size": "16x16"}
            ),
        ]
        store_waits = 0
        while store_waits < 1 or upload_errors(worker) < 2:
            accepted = ledger.request(client, "POST", "/v1/jobs", json={"prompt": "1", "steps": 3})
            if accepted is not None and accepted.status_code == 202:
                ledger.accepted.add(accepted.json()["id"])
            inline = ledger.request(client, "GET", f"/v1/jobs/{known}")  # its image must be read from the store
            store_waits += inline is not None and inline.status_code == 503
            url = ledger.request(client, "GET", f"/v1/jobs/{linked}")  # a presigned URL needs no store
            assert url is not None and url.status_code == 200
            for job_id in running:
                ledger.request(client, "GET", f"/v1/jobs/{job_id}")
            ledger.request(client, "DELETE", f"/v1/jobs/{cancelled}")
            ledger.request(client, "GET", "/readyz")
        wait_until(lambda: "result store unavailable" in httpx.get(f"{worker.url}/readyz").text, 30)
        repair()
        for future in synchronous:
            answer = future.result()
            assert answer is not None and answer.status_code == 200, answer and answer.text
            if answer.url.path == "/generate":
                ledger.accepted.add(answer.json()["id"])
            else:
                ledger.openai_accepted += 1
        ledger.assert_answers_allowed()
        ledger.settle(client, redis_server.client())
        assert ledger.final_statuses["succeeded"] == len(ledger.accepted) - 1  # all but the cancelled one
        assert client.get(f"/v1/jobs/{known}").status_code == 200
    # every image of every succeeded job is in the bucket, once, and nothing else is
    records = [json.loads(redis_server.client().get(key)) for key in redis_server.client().scan_iter("fastcache:job:*")]
    keys = sorted(f"faults/{image['key']}" for r in records if r.get("status") == "succeeded" for image in r["images"])
    assert keys and moto.keys("faults/") == keys
    assert all("b64_json" not in image for r in records for image in r.get("images") or [])


def test_an_object_store_down_while_jobs_run_delays_their_results_and_loses_none(stack):
    _, gate, *_ = stack
    ledger = FaultLedger("object store down (connections refused), then back")
    try:
        run_fault(ledger, stack, inject=gate.close, repair=gate.open)
    finally:
        ledger.record()


def test_an_object_store_hung_past_the_upload_timeout_delays_results_and_loses_none(stack):
    moto, *_ = stack
    ledger = FaultLedger("object store hung (SIGSTOP) past the upload timeout")
    try:
        run_fault(ledger, stack, inject=lambda: moto.signal(signal.SIGSTOP), repair=lambda: moto.signal(signal.SIGCONT))
    finally:
        ledger.record()
