"""Scale-out over Redis Streams: API + worker processes + a real redis-server."""

import json
import signal
import time

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

    wait_until(done, timeout, lambda: "jobs did not finish: " + str(
        [client.get(f"/v1/jobs/{i}").json()["status"] for i in ids]))
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
        ids = [submit(client, {"prompt": str(i % 10), "steps": 30, "seed": i,
                               "cache": {"tolerance": tolerances[i % 4], "method": "teacache" if i == 5 else None}})
               for i in range(16)]
        jobs = wait_all(client, ids)
    assert [j["status"] for j in jobs] == ["succeeded"] * 16
    for job, i in zip(jobs, range(16)):
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
                    names.append(line[len("event: "):])
        assert names == ["step"] * 5 + ["result"]
        sync = client.post("/generate", json={"prompt": "seven", "steps": 4, "n": 2})
        assert sync.status_code == 200 and len(sync.json()["images"]) == 2


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


def test_a_killed_worker_leaves_no_job_lost_or_run_twice(tiny_dit_dir):
    redis_server = RedisServer()
    victim = WorkerProcess(redis_server.url, *worker_flags(tiny_dit_dir))
    api = Server("--queue", redis_server.url)
    survivor = None
    try:
        with api.client() as client:
            ids = [submit(client, {"prompt": str(i), "steps": 120, "seed": i}) for i in range(6)]
            wait_until(lambda: metric_samples(victim.metrics(), "fastcache_inflight_requests")
                       .get('{model="tiny-dit"}', 0) >= 2, 60)
            victim.signal(signal.SIGKILL)  # mid-batch, no goodbye
            survivor = WorkerProcess(redis_server.url, *worker_flags(tiny_dit_dir))
            jobs = wait_all(client, ids)
        assert [j["status"] for j in jobs] == ["succeeded"] * 6
        assert int(redis_server.client().get("fastcache:stats:results_stored")) == 6  # each job stored once
        assert metric_samples(survivor.metrics(), "fastcache_reclaimed_jobs_total")[""] >= 1
        assert redis_server.client().xlen("fastcache:jobs") == 0
    finally:
        api.stop()
        victim.stop()
        if survivor is not None:
            survivor.stop()
        redis_server.stop()


def test_redis_restart_makes_the_api_unready_then_serve_again_without_losing_results(tiny_dit_dir, tmp_path):
    redis_server = RedisServer(data_dir=tmp_path)
    worker = WorkerProcess(redis_server.url, *worker_flags(tiny_dit_dir))
    api = Server("--queue", redis_server.url)
    try:
        with api.client() as client:
            job_id = submit(client, {"prompt": "8", "steps": 150, "seed": 3})
            wait_until(lambda: client.get(f"/v1/jobs/{job_id}").json()["status"] == "running", 60)
            redis_server.stop()
            wait_until(lambda: client.get("/readyz").status_code == 503, 30)
            refused = client.post("/generate", json={"prompt": "1", "steps": 2})
            assert refused.status_code == 503 and "retry-after" in refused.headers
            time.sleep(1.0)  # the worker keeps denoising without Redis
            redis_server = RedisServer(port=redis_server.port, data_dir=tmp_path)
            wait_until(lambda: client.get("/readyz").status_code == 200, 60)
            # the job in flight during the outage finishes and its result is stored after all
            wait_until(lambda: client.get(f"/v1/jobs/{job_id}").json()["status"] == "succeeded", 120)
            after = client.post("/generate", json={"prompt": "1", "steps": 2})
            assert after.status_code == 200
    finally:
        api.stop()
        worker.stop()
        redis_server.stop()


def test_a_poison_job_lands_in_the_dead_letter_stream_with_its_error(cluster):
    redis_server, api, _ = cluster
    r = redis_server.client()
    record = {"id": "poison-1", "status": "queued", "route": "jobs", "output_format": "png",
              "created_at": time.time(), "finished_at": None, "images": None, "error": None, "steps_done": 0}
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
