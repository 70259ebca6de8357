"""The HTTP API: jobs, events, cancellation, overload, validation, auth, OpenAI compatibility, metrics."""

import json
import signal
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.servers import Server, decode_image, metric_samples, wait_until


@pytest.fixture(scope="module")
def server(tiny_dit_dir):
    s = Server("--model", str(tiny_dit_dir), "--max-batch-size", "4", "--max-body-bytes", "4096")
    yield s
    s.stop()


@pytest.fixture
def client(server):
    with server.client() as c:
        yield c


# --------------------------------------------------------------------------- jobs and events


def test_job_is_accepted_with_location_then_succeeds(client):
    response = client.post("/v1/jobs", json={"prompt": "seven", "steps": 5, "seed": 1})
    assert response.status_code == 202
    job = response.json()
    assert response.headers["location"] == f"/v1/jobs/{job['id']}"
    assert job["status"] in ("queued", "running")
    wait_until(lambda: client.get(response.headers["location"]).json()["status"] == "succeeded", 60)
    status = client.get(response.headers["location"]).json()
    assert status["steps_done"] == 5
    assert len(status["result"]["images"]) == 1


def test_events_stream_one_event_per_step_then_the_result(client):
    job = client.post("/v1/jobs", json={"prompt": "2", "steps": 6, "seed": 3}).json()
    events = []
    with client.stream("GET", f"/v1/jobs/{job['id']}/events") as stream:
        assert stream.headers["content-type"].startswith("text/event-stream")
        name = None
        for line in stream.iter_lines():
            if line.startswith("event: "):
                name = line[len("event: ") :]
            elif line.startswith("data: "):
                events.append((name, json.loads(line[len("data: ") :])))
    steps = [data["step"] for name, data in events if name == "step"]
    assert steps == [1, 2, 3, 4, 5, 6]
    assert events[-1][0] == "result" and events[-1][1]["status"] == "succeeded"
    assert len(events) == 7


def test_cancel_frees_the_batch_slot_for_a_waiting_job(tiny_dit_dir):
    s = Server("--model", str(tiny_dit_dir), "--max-batch-size", "1")
    try:
        with s.client() as c:
            running = c.post("/v1/jobs", json={"prompt": "1", "steps": 200}).json()
            # posted only once the long job holds the slot: two jobs waiting together are admitted fewer steps first
            wait_until(lambda: c.get(f"/v1/jobs/{running['id']}").json()["status"] == "running", 30)
            waiting = c.post("/v1/jobs", json={"prompt": "2", "steps": 5}).json()
            assert c.get(f"/v1/jobs/{waiting['id']}").json()["status"] == "queued"
            cancelled = c.delete(f"/v1/jobs/{running['id']}")
            assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
            assert cancelled.json()["steps_done"] < 200
            wait_until(lambda: c.get(f"/v1/jobs/{waiting['id']}").json()["status"] == "succeeded", 30)
            assert c.delete(f"/v1/jobs/{waiting['id']}").status_code == 409
    finally:
        s.stop()


def test_a_retry_with_the_same_idempotency_key_and_no_seed_returns_the_same_job(client):
    body = {"prompt": "three", "steps": 2}  # no seed: the server draws one, the retry must still match
    first = client.post("/v1/jobs", json=body, headers={"Idempotency-Key": "retry-no-seed"})
    again = client.post("/v1/jobs", json=body, headers={"Idempotency-Key": "retry-no-seed"})
    assert first.status_code == again.status_code == 202
    assert again.json()["id"] == first.json()["id"]
    other = client.post("/v1/jobs", json={**body, "steps": 3}, headers={"Idempotency-Key": "retry-no-seed"})
    assert other.status_code == 422


def test_unknown_job_is_404_problem(client):
    response = client.get("/v1/jobs/nope")
    assert response.status_code == 404
    assert response.headers["content-type"].startswith("application/problem+json")


# --------------------------------------------------------------------------- overload and deadlines


def test_overload_gets_429_with_retry_after_and_nothing_is_lost_or_hangs(tiny_dit_dir):
    s = Server("--model", str(tiny_dit_dir), "--max-batch-size", "1", "--max-queue", "1")
    try:
        body = {"prompt": "4", "steps": 40}
        with ThreadPoolExecutor(10) as pool:
            responses = list(pool.map(lambda _: httpx.post(f"{s.url}/generate", json=body, timeout=60), range(10)))
        codes = sorted(r.status_code for r in responses)
        assert set(codes) <= {200, 429}, codes
        assert codes.count(429) >= 1 and codes.count(200) >= 2
        for r in responses:
            if r.status_code == 429:
                assert int(r.headers["retry-after"]) > 0
                assert r.json()["code"] == "queue_full"
        rejected = metric_samples(s.metrics(), "fastcache_rejected_requests_total")
        assert rejected['{reason="queue_full"}'] == codes.count(429)
    finally:
        s.stop()


def test_a_request_past_its_deadline_gets_504(client):
    response = client.post("/generate", json={"prompt": "6", "steps": 200, "timeout_seconds": 0.05})
    assert response.status_code == 504
    assert response.json()["code"] == "deadline_exceeded"


# --------------------------------------------------------------------------- validation

BAD_BODIES = [
    ({"prompt": 7}, "prompt"),
    ({"prompt": ""}, "prompt"),
    ({"prompt": "seven", "n": 9}, "n"),
    ({"prompt": "seven", "n": "2"}, "n"),
    ({"prompt": "seven", "steps": 0}, "steps"),
    ({"prompt": "seven", "steps": 201}, "steps"),
    ({"prompt": "seven", "steps": 2.5}, "steps"),
    ({"prompt": "seven", "guidance_scale": -1}, "guidance_scale"),
    ({"prompt": "seven", "seed": -3}, "seed"),
    ({"prompt": "seven", "width": 18}, "width"),
    ({"prompt": "seven", "height": 400}, "height"),
    ({"prompt": "seven", "output_format": "gif"}, "output_format"),
    ({"prompt": "seven", "cache": {"tolerance": 1.5}}, "cache.tolerance"),
    ({"prompt": "seven", "cache": {"significance": 0}}, "cache.significance"),
    ({"prompt": "seven", "cache": {"method": "magic"}}, "cache.method"),
    ({"prompt": "seven", "cache": {"merge_ratio": 0.95}}, "cache.merge_ratio"),
    ({"prompt": "seven", "cache": {"tolerance": "high"}}, "cache.tolerance"),
    ({"prompt": "seven", "cache": {"unknown": 1}}, "cache.unknown"),
    ({"prompt": "seven", "colour": "red"}, "colour"),
    ({"prompt": "eleven"}, "prompt"),
    ({"prompt": "seven", "negative_prompt": "blurry"}, "negative_prompt"),
    ({"steps": 5}, "prompt"),
]


@pytest.mark.parametrize("body,field", BAD_BODIES, ids=[f for _, f in BAD_BODIES])
def test_bad_input_gets_422_naming_the_field(client, body, field):
    response = client.post("/generate", json=body)
    assert response.status_code == 422, response.text
    problem = response.json()
    assert response.headers["content-type"].startswith("application/problem+json")
    assert field in problem["detail"]
    assert any(e["field"] == field for e in problem["errors"])


def test_invalid_json_gets_422(client):
    response = client.post("/generate", content=b"{not json", headers={"content-type": "application/json"})
    assert response.status_code == 422
    assert "JSON" in response.json()["detail"]


def test_oversized_body_gets_413(client):
    response = client.post("/generate", json={"prompt": "x" * 10_000})
    assert response.status_code == 413
    assert response.json()["code"] == "body_too_large"


def test_wrong_method_is_405_not_500(client):
    assert client.get("/generate").status_code == 405


# --------------------------------------------------------------------------- OpenAI compatibility


def test_the_openai_client_generates_images(server):
    from openai import OpenAI

    client = OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    result = client.images.generate(
        prompt="seven",
        n=2,
        size="16x16",
        response_format="b64_json",
        extra_body={"steps": 4, "seed": 5, "cache": {"tolerance": 0.2}},
    )
    assert len(result.data) == 2
    image = decode_image(result.data[0].b64_json)
    assert image.shape == (16, 16, 3)


def test_openai_route_errors_use_the_openai_error_object(server):
    import openai
    from openai import OpenAI

    client = OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.BadRequestError) as raised:
        client.images.generate(prompt="seven", n=9)
    body = raised.value.body
    assert body["type"] == "invalid_request_error" and body["param"] == "n"
    with pytest.raises(openai.NotFoundError):
        client.images.generate(prompt="seven", model="dall-e-3")


# --------------------------------------------------------------------------- operations


def test_health_and_readiness(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["status"] == "ready"


def test_openapi_docs_are_served(client):
    assert client.get("/docs").status_code == 200
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/generate", "/v1/images/generations", "/v1/jobs", "/v1/jobs/{job_id}", "/v1/jobs/{job_id}/events"} <= set(
        paths
    )


EXPECTED_METRICS = [
    "fastcache_request_duration_seconds_count",
    "fastcache_queue_wait_seconds_count",
    "fastcache_queue_depth",
    "fastcache_inflight_requests",
    "fastcache_batch_size_count",
    "fastcache_step_duration_seconds_count",
    "fastcache_block_decisions_total",
    "fastcache_tokens_computed_fraction_count",
    "fastcache_cache_hit_ratio_count",
    "fastcache_device_memory_allocated_bytes",
    "fastcache_device_memory_peak_bytes",
    "fastcache_rejected_requests_total",
]


def test_metrics_expose_every_metric_with_observed_values(server, client):
    client.post("/generate", json={"prompt": "1", "steps": 8, "cache": {"tolerance": 0.8}})
    client.post("/generate", json={"prompt": "1", "n": 99})
    text = server.metrics()
    for name in EXPECTED_METRICS:
        samples = metric_samples(text, name)
        assert samples, f"{name} missing"
        if name not in ("fastcache_queue_depth", "fastcache_inflight_requests"):
            assert max(samples.values()) > 0, f"{name} has no observed value"
    decisions = metric_samples(text, "fastcache_block_decisions_total")
    assert decisions['{model="tiny-dit",result="computed"}'] > 0
    assert decisions['{model="tiny-dit",result="approximated"}'] > 0


def test_api_key_is_required_when_configured(tiny_dit_dir):
    s = Server("--model", str(tiny_dit_dir), "--api-key", "s3cret")
    try:
        body = {"prompt": "1", "steps": 2}
        assert httpx.post(f"{s.url}/generate", json=body).status_code == 401
        wrong = httpx.post(f"{s.url}/generate", json=body, headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401 and wrong.headers["www-authenticate"] == "Bearer"
        ok = httpx.post(f"{s.url}/generate", json=body, headers={"Authorization": "Bearer s3cret"}, timeout=60)
        assert ok.status_code == 200
        assert httpx.get(f"{s.url}/healthz").status_code == 200
    finally:
        s.stop()


def test_sigterm_finishes_in_flight_requests_then_exits(tiny_dit_dir):
    s = Server("--model", str(tiny_dit_dir))
    try:
        with ThreadPoolExecutor(1) as pool:
            pending = pool.submit(httpx.post, f"{s.url}/generate", json={"prompt": "9", "steps": 150}, timeout=120)
            wait_until(
                lambda: metric_samples(s.metrics(), "fastcache_inflight_requests").get('{model="tiny-dit"}', 0) >= 1, 30
            )
            s.signal(signal.SIGTERM)
            response = pending.result()
        assert response.status_code == 200
        assert response.json()["images"][0]["stats"]["steps"] == 150
        s.proc.wait(60)
        assert s.proc.returncode == 0
    finally:
        s.stop()


def test_a_model_that_cannot_load_is_reported_not_ready(tmp_path):
    s = Server("--model", str(tmp_path / "missing"), wait_ready=False)
    try:
        wait_until(lambda: "failed" in httpx.get(f"{s.url}/readyz").json().get("reason", ""), 60, s.log)
        assert httpx.get(f"{s.url}/readyz").status_code == 503
        response = httpx.post(f"{s.url}/generate", json={"prompt": "1"})
        assert response.status_code == 503 and "retry-after" in response.headers
    finally:
        s.stop()
