"""Scale-out over Redis Streams: API + worker processes + a real redis-server."""

import json
import signal
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.servers import RedisServer, Server, WorkerProcess, metric_samples, wait_until

FAST_RECLAIM = ("--reclaim-idle-seconds", "2", "--max-deliveries", "2")


def worker_flags(model_dir, *extra):
    return ("--model", str(model_dir), "--max-batch-size", "8", *FAST_RECLAIM, *extra)


def submit(client, body, headers=None):
    response = client.post("/v1/jobs", json=body, headers=headers or {})
    assert response.status_code == 202, response.text
    return response.json()["id"]


def wait_all(client, ids, timeout=180):
    def done():
        return all(client.get(f"/v1/jobs/{i}").json()["status"] in ("succeeded", "failed", "cancelled") for i in ids)

    wait_until(
        done,
        timeout,
        lambda: "jobs did not finish: " + str([client.get(f"/v1/jobs/{i}").json()["status"] for i in ids]),
    )
    return [client.get(f"/v1/jobs/{i}").json() for i in ids]


def batch_sizes_above_one(text):
    buckets = metric_samples(text, "fastcache_batch_size_bucket")
    total = sum(v for k, v in buckets.items() if 'le="+Inf"' in k)
    singles = sum(v for k, v in buckets.items() if 'le="1.0"' in k)
    return total - singles


@pytest.fixture(scope="module")
def cluster(tiny_dit_dir):
    redis_server = RedisServer()
    workers = [WorkerProcess(redis_server.url, *worker_flags(tiny_dit_dir)) for _ in range(2)]
    api = Server("--queue", redis_server.url, "--max-queue", "64")
    yield redis_server, api, workers
    api.stop()
    for w in workers:
        w.stop()
    redis_server.stop()


def test_sixteen_mixed_jobs_complete_across_two_workers_with_batching(cluster):
    redis_server, api, workers = cluster
    tolerances = [0.0, 0.2, 0.5, 1.0]
    with api.client() as client:
        ids = [
            submit(
                client,
                {
                    "prompt": str(i % 10),
                    "steps": 30,
                    "seed": i,
                    "cache": {"tolerance": tolerances[i % 4], "method": "teacache" if i == 5 else None},
                },
            )
            for i in range(16)
        ]
        jobs = wait_all(client, ids)
    assert [j["status"] for j in jobs] == ["succeeded"] * 16
    for i, job in enumerate(jobs):
        stats = job["result"]["images"][0]["stats"]
        assert stats["steps"] == 30 and stats["cache"]["tolerance"] == tolerances[i % 4]
    assert sum(batch_sizes_above_one(w.metrics()) for w in workers) > 0, "no worker batched two jobs"
    assert int(redis_server.client().get("fastcache:stats:results_stored")) >= 16


def test_events_and_results_reach_the_api_through_redis(cluster):
    _, api, _ = cluster
    with api.client() as client:
        job_id = submit(client, {"prompt": "4", "steps": 5})
        names = []
        with client.stream("GET", f"/v1/jobs/{job_id}/events") as stream:
            for line in stream.iter_lines():
                if line.startswith("event: "):
                    names.append(line[len("event: ") :])
        assert names == ["step"] * 5 + ["result"]
        sync = client.post("/generate", json={"prompt": "seven", "steps": 4, "n": 2})
        assert sync.status_code == 200 and len(sync.json()["images"]) == 2


def test_concurrent_retries_with_one_idempotency_key_create_one_job(cluster):
    redis_server, api, _ = cluster
    body = {"prompt": "6", "steps": 3, "seed": 4}
    before = redis_server.client().get("fastcache:stats:results_stored")
    with ThreadPoolExecutor(8) as pool:
        responses = list(
            pool.map(
                lambda _: httpx.post(
                    f"{api.url}/v1/jobs", json=body, timeout=60, headers={"Idempotency-Key": "burst-1"}
                ),
                range(8),
            )
        )
    assert [r.status_code for r in responses] == [202] * 8
    assert len({r.json()["id"] for r in responses}) == 1, "one key created several jobs"
    with api.client() as client:
        wait_all(client, [responses[0].json()["id"]])
    assert int(redis_server.client().get("fastcache:stats:results_stored")) == int(before or 0) + 1


def test_an_idempotency_key_outliving_its_job_starts_a_new_job_not_a_500(cluster):
    redis_server, api, _ = cluster
    with api.client() as client:
        first = submit(client, {"prompt": "1", "steps": 2}, {"Idempotency-Key": "order-expired"})
        wait_all(client, [first])
        redis_server.client().delete(f"fastcache:job:{first}")  # the record's TTL ran out before the key's
        again = client.post("/v1/jobs", json={"prompt": "1", "steps": 2}, headers={"Idempotency-Key": "order-expired"})
        assert again.status_code == 202 and again.json()["id"] != first
        assert client.get("/v1/jobs/unknown-id").status_code == 404


def test_a_disconnected_generate_client_cancels_its_job_on_the_worker(cluster):
    redis_server, api, workers = cluster
    r = redis_server.client()
    body = '{"prompt": "4", "steps": 200, "n": 8}'
    request = (
        f"POST /generate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n{body}"
    ).encode()

    def generate_jobs(status):
        records = [json.loads(r.get(k)) for k in r.scan_iter("fastcache:job:*") if not k.endswith(":attempts")]
        return [rec for rec in records if rec["route"] == "generate" and rec["status"] == status]

    cancelled_before = len(generate_jobs("cancelled"))
    with socket.create_connection(("127.0.0.1", api.port), timeout=30) as connection:
        connection.sendall(request)
        wait_until(lambda: generate_jobs("running"), 60, lambda: "the request never started")
    wait_until(
        lambda: len(generate_jobs("cancelled")) == cancelled_before + 1,
        60,
        lambda: "the abandoned job was not cancelled",
    )


def test_idempotency_key_replays_the_same_job_and_rejects_a_different_body(cluster):
    _, api, _ = cluster
    with api.client() as client:
        body = {"prompt": "3", "steps": 3, "seed": 9}
        first = submit(client, body, {"Idempotency-Key": "order-17"})
        again = submit(client, body, {"Idempotency-Key": "order-17"})
        assert again == first
        conflict = client.post("/v1/jobs", json={**body, "seed": 10}, headers={"Idempotency-Key": "order-17"})
        assert conflict.status_code == 422
        assert "Idempotency-Key" in conflict.json()["detail"]


def test_cancelling_a_running_job_through_redis(cluster):
    _, api, _ = cluster
    with api.client() as client:
        job_id = submit(client, {"prompt": "2", "steps": 200})
        wait_until(lambda: client.get(f"/v1/jobs/{job_id}").json()["status"] == "running", 60)
        cancelled = client.delete(f"/v1/jobs/{job_id}").json()
        assert cancelled["status"] == "cancelled" and cancelled["steps_done"] < 200


def test_bad_input_is_rejected_by_the_api_with_the_workers_model_limits(cluster):
    _, api, _ = cluster
    with api.client() as client:
        response = client.post("/generate", json={"prompt": "eleven"})
        assert response.status_code == 422 and "prompt" in response.json()["detail"]


def test_a_poison_job_lands_in_the_dead_letter_stream_with_its_error(cluster):
    redis_server, api, _ = cluster
    r = redis_server.client()
    record = {
        "id": "poison-1",
        "status": "queued",
        "route": "jobs",
        "output_format": "png",
        "created_at": time.time(),
        "finished_at": None,
        "images": None,
        "error": None,
        "steps_done": 0,
    }
    r.set("fastcache:job:poison-1", json.dumps(record), ex=600)
    r.xadd("fastcache:jobs", {"job_id": "poison-1", "submission": "{this is not a job"})
    wait_until(lambda: r.xlen("fastcache:jobs:dead") >= 1, 60)
    dead = r.xrange("fastcache:jobs:dead")[-1][1]
    assert dead["job_id"] == "poison-1"
    assert int(dead["deliveries"]) == 3  # --max-deliveries 2: two failed tries, then dead-lettered
    assert "unreadable job payload" in dead["error"]
    with api.client() as client:
        job = client.get("/v1/jobs/poison-1").json()
    assert job["status"] == "failed" and job["error"]["code"] == "dead_lettered"
    assert "unreadable" in job["error"]["message"]


def test_worker_sigterm_finishes_in_flight_jobs_then_exits(tiny_dit_dir):
    redis_server = RedisServer()
    worker = WorkerProcess(redis_server.url, *worker_flags(tiny_dit_dir))
    api = Server("--queue", redis_server.url)
    try:
        with api.client() as client:
            job_id = submit(client, {"prompt": "6", "steps": 150})
            wait_until(lambda: client.get(f"/v1/jobs/{job_id}").json()["status"] == "running", 60)
            worker.signal(signal.SIGTERM)
            worker.proc.wait(120)
            assert worker.proc.returncode == 0
            assert client.get(f"/v1/jobs/{job_id}").json()["status"] == "succeeded"
        assert redis_server.client().xlen("fastcache:jobs") == 0
    finally:
        api.stop()
        worker.stop()
        redis_server.stop()


def test_api_metrics_report_the_stream(cluster):
    _, api, _ = cluster
    text = api.metrics()
    for name in ("fastcache_stream_length", "fastcache_stream_pending_entries", "fastcache_stream_lag_entries"):
        assert "" in metric_samples(text, name), f"{name} missing from the API's /metrics"
    assert httpx.get(f"{api.url}/readyz").status_code == 200
