"""The HTTP service batches concurrent requests per step and each image equals its solo run."""

from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.servers import Server, decode_image, metric_samples, wait_until

TOLERANCES = [0.0, 0.3, 0.6, 1.0]


@pytest.fixture(scope="module")
def server(tiny_dit_dir):
    s = Server("--model", str(tiny_dit_dir), "--max-batch-size", "8")
    yield s
    s.stop()


def generate(server, body, timeout=120.0):
    response = httpx.post(f"{server.url}/generate", json=body, timeout=timeout)
    assert response.status_code == 200, response.text
    return response.json()


def test_concurrent_requests_share_batches_and_each_equals_its_solo_run(server):
    bodies = [{"prompt": str(i % 10), "seed": 100 + i, "steps": 30, "guidance_scale": 2.0,
               "cache": {"tolerance": TOLERANCES[i % 4]}} for i in range(8)]
    with ThreadPoolExecutor(8) as pool:
        batched = list(pool.map(lambda b: generate(server, b), bodies))
    shared = [max(r["images"][0]["stats"]["batch_sizes"]) for r in batched]
    assert max(shared) > 1, f"no request shared a batch: {shared}"
    batch_sizes = metric_samples(server.metrics(), "fastcache_batch_size_bucket")
    total = sum(v for k, v in batch_sizes.items() if 'le="+Inf"' in k)
    singles = sum(v for k, v in batch_sizes.items() if 'le="1.0"' in k)
    assert total > singles, "the batch-size metric never saw a batch above 1"
    for body, result in zip(bodies, batched):
        solo = generate(server, body)
        assert max(solo["images"][0]["stats"]["batch_sizes"]) == 1
        difference = abs(decode_image(result["images"][0]["b64_json"]) - decode_image(solo["images"][0]["b64_json"]))
        assert difference.max() <= 1, f"tolerance {body['cache']['tolerance']}: batched image differs from solo"
        assert result["images"][0]["stats"]["cache"]["tolerance"] == body["cache"]["tolerance"]
    # different tolerances really did different amounts of work
    approximated = {b["cache"]["tolerance"]: r["images"][0]["stats"]["blocks_approximated"]
                    for b, r in zip(bodies, batched)}
    assert approximated[0.0] == 0 and approximated[1.0] > 0


def test_a_request_joining_mid_denoising_enters_at_a_step_boundary(server):
    long_body = {"prompt": "3", "seed": 7, "steps": 150, "guidance_scale": 2.0}
    short_body = {"prompt": "8", "seed": 8, "steps": 10, "guidance_scale": 2.0, "cache": {"tolerance": 0.5}}
    with httpx.Client(base_url=server.url, timeout=120) as client:
        job = client.post("/v1/jobs", json=long_body).json()
        wait_until(lambda: client.get(f"/v1/jobs/{job['id']}").json()["steps_done"] >= 5, 60)
        joined = client.post("/generate", json=short_body).json()
        wait_until(lambda: client.get(f"/v1/jobs/{job['id']}").json()["status"] == "succeeded", 120)
        first = client.get(f"/v1/jobs/{job['id']}").json()["result"]["images"][0]["stats"]["batch_sizes"]
    late = joined["images"][0]["stats"]["batch_sizes"]
    assert late[0] == 2, "the joining request did not share the running batch from its first step"
    assert first[0] == 1 and 2 in first, "the running request never saw the newcomer join"
    solo = generate(server, short_body)
    difference = abs(decode_image(joined["images"][0]["b64_json"]) - decode_image(solo["images"][0]["b64_json"]))
    assert difference.max() <= 1


def test_n_images_use_consecutive_seeds(server):
    result = generate(server, {"prompt": "five", "n": 3, "seed": 40, "steps": 6})
    assert [image["seed"] for image in result["images"]] == [40, 41, 42]
    single = generate(server, {"prompt": "five", "n": 1, "seed": 41, "steps": 6})
    difference = abs(decode_image(result["images"][1]["b64_json"]) - decode_image(single["images"][0]["b64_json"]))
    assert difference.max() <= 1
