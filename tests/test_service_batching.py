"""The HTTP service batches concurrent requests per step and each image equals its solo run."""

import json

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


def wait_job(client, job_id, timeout=180):
    wait_until(
        lambda: client.get(f"/v1/jobs/{job_id}").json()["status"] in ("succeeded", "failed", "cancelled"), timeout
    )
    return client.get(f"/v1/jobs/{job_id}").json()


def test_concurrent_requests_share_batches_and_each_equals_its_solo_run(server):
    bodies = [
        {
            "prompt": str(i % 10),
            "seed": 100 + i,
            "steps": 30,
            "guidance_scale": 2.0,
            "cache": {"tolerance": TOLERANCES[i % 4]},
        }
        for i in range(8)
    ]
    with httpx.Client(base_url=server.url, timeout=120) as client:
        # a holder fills the batch while the eight queue; when it leaves, all eight join at one step boundary,
        # however fast the machine is
        holder = client.post("/v1/jobs", json={"prompt": "0", "n": 8, "steps": 200}).json()["id"]
        wait_until(lambda: client.get(f"/v1/jobs/{holder}").json()["status"] == "running", 60)
        ids = [client.post("/v1/jobs", json=body).json()["id"] for body in bodies]
        assert [client.get(f"/v1/jobs/{i}").json()["status"] for i in ids] == ["queued"] * 8
        assert client.delete(f"/v1/jobs/{holder}").json()["status"] == "cancelled"
        batched = [wait_job(client, i)["result"] for i in ids]
    assert [r["images"][0]["stats"]["batch_sizes"] for r in batched] == [[8] * 30] * 8
    batch_sizes = metric_samples(server.metrics(), "fastcache_batch_size_bucket")
    total = sum(v for k, v in batch_sizes.items() if 'le="+Inf"' in k)
    singles = sum(v for k, v in batch_sizes.items() if 'le="1.0"' in k)
    assert total > singles, "the batch-size metric never saw a batch above 1"
    for body, result in zip(bodies, batched, strict=True):
        solo = generate(server, body)
        assert max(solo["images"][0]["stats"]["batch_sizes"]) == 1
        difference = abs(decode_image(result["images"][0]["b64_json"]) - decode_image(solo["images"][0]["b64_json"]))
        assert difference.max() <= 1, f"tolerance {body['cache']['tolerance']}: batched image differs from solo"
        assert result["images"][0]["stats"]["cache"]["tolerance"] == body["cache"]["tolerance"]
    # different tolerances really did different amounts of work
    approximated = {
        b["cache"]["tolerance"]: r["images"][0]["stats"]["blocks_approximated"]
        for b, r in zip(bodies, batched, strict=True)
    }
    assert approximated[0.0] == 0 and approximated[1.0] > 0


def test_a_request_joining_mid_denoising_enters_at_a_step_boundary(server):
    long_body = {"prompt": "3", "seed": 7, "steps": 200, "guidance_scale": 2.0}
    short_body = {"prompt": "8", "seed": 8, "steps": 10, "guidance_scale": 2.0, "cache": {"tolerance": 0.5}}
    long_sizes = []
    with httpx.Client(base_url=server.url, timeout=120) as client:
        long_id = client.post("/v1/jobs", json=long_body).json()["id"]
        short_id = None
        with client.stream("GET", f"/v1/jobs/{long_id}/events") as events:
            for line in events.iter_lines():
                if not line.startswith("data: "):
                    continue
                data = json.loads(line[len("data: ") :])
                if "batch_size" not in data:
                    break  # the result
                long_sizes.append(data["batch_size"])
                if short_id is None:  # the long job has run its first step: join it now
                    short_id = client.post("/v1/jobs", json=short_body).json()["id"]
        joined = wait_job(client, short_id)["result"]
    late = joined["images"][0]["stats"]["batch_sizes"]
    assert late == [2] * 10, "the joining request did not share the running batch at every step"
    assert long_sizes[0] == 1 and 2 in long_sizes and long_sizes[-1] == 1, "the running request never saw it join"
    solo = generate(server, short_body)
    difference = abs(decode_image(joined["images"][0]["b64_json"]) - decode_image(solo["images"][0]["b64_json"]))
    assert difference.max() <= 1


def test_n_images_use_consecutive_seeds(server):
    result = generate(server, {"prompt": "five", "n": 3, "seed": 40, "steps": 6})
    assert [image["seed"] for image in result["images"]] == [40, 41, 42]
    single = generate(server, {"prompt": "five", "n": 1, "seed": 41, "steps": 6})
    difference = abs(decode_image(result["images"][1]["b64_json"]) - decode_image(single["images"][0]["b64_json"]))
    assert difference.max() <= 1
