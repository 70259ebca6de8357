"""URL delivery end to end: ``response_format: "url"`` with a directory store (signed /v1/files URLs) in one
process, and with an S3 store (moto's server) behind Redis, API and worker processes."""

from __future__ import annotations

import base64
import io
import json
from urllib.parse import parse_qs, urlparse

import httpx
import pytest
from openai import OpenAI
from PIL import Image

from service.api.signed_urls import signature
from tests.objectstore import BUCKET, MotoServer
from tests.servers import RedisServer, Server, WorkerProcess

SECRET = "test-url-secret"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def file_server(tiny_dit_dir, tmp_path_factory):
    results = tmp_path_factory.mktemp("results")
    server = Server(
        "--model",
        str(tiny_dit_dir),
        "--max-batch-size",
        "4",
        "--result-store",
        f"file://{results}",
        "--result-url-secret",
        SECRET,
    )
    server.results = results
    yield server
    server.stop()


def generate(client: httpx.Client, **fields) -> dict:
    response = client.post("/generate", json={"prompt": "seven", "steps": 4, **fields})
    assert response.status_code == 200, response.text
    return response.json()


def test_an_image_fetched_by_url_is_byte_identical_to_its_b64_answer(file_server):
    with file_server.client() as client:
        inline = generate(client, seed=11, response_format="b64_json")["images"][0]
        linked = generate(client, seed=11, response_format="url")["images"][0]
    assert "url" not in inline and "b64_json" not in linked
    download = httpx.get(linked["url"])  # no API key, no client: the signed URL is enough
    assert download.status_code == 200 and download.headers["content-type"] == "image/png"
    assert download.content == base64.b64decode(inline["b64_json"])
    assert linked["seed"] == 11 and linked["stats"]["steps"] == 4


def test_the_directory_store_holds_the_images_as_files_under_the_job_id(file_server):
    with file_server.client() as client:
        answer = generate(client, seed=3, n=2)
    files = sorted(p.name for p in (file_server.results / answer["id"]).iterdir())
    assert files == ["0.png", "1.png"]
    assert (file_server.results / answer["id"] / "1.png").read_bytes() == base64.b64decode(
        answer["images"][1]["b64_json"]
    )


def _signed(url: str) -> tuple[str, str, str]:
    parsed = urlparse(url)
    query = parse_qs(parsed.query)
    return parsed.path[len("/v1/files/") :], query["expires"][0], query["signature"][0]


def test_a_tampered_signature_gets_403(file_server):
    with file_server.client() as client:
        url = generate(client, seed=1, response_format="url")["images"][0]["url"]
        key, expires, _ = _signed(url)
        response = client.get(f"/v1/files/{key}", params={"expires": expires, "signature": "0" * 64})
    assert response.status_code == 403
    assert response.headers["content-type"].startswith("application/problem+json")


def test_an_expired_url_gets_403(file_server):
    with file_server.client() as client:
        url = generate(client, seed=2, response_format="url")["images"][0]["url"]
        key, _, _ = _signed(url)
        past = 1_000_000  # a correctly signed URL whose time is up
        response = client.get(
            f"/v1/files/{key}", params={"expires": past, "signature": signature(SECRET.encode(), key, past)}
        )
    assert response.status_code == 403 and "expired" in response.json()["detail"]


def test_a_signature_used_for_another_jobs_key_gets_403(file_server):
    with file_server.client() as client:
        first = generate(client, seed=4, response_format="url")
        second = generate(client, seed=5, response_format="url")
        _, expires, sig = _signed(first["images"][0]["url"])
        other_key, _, _ = _signed(second["images"][0]["url"])
        response = client.get(f"/v1/files/{other_key}", params={"expires": expires, "signature": sig})
        assert response.status_code == 403
        assert httpx.get(second["images"][0]["url"]).status_code == 200  # its own URL works


def test_a_job_asked_for_urls_reports_urls_in_its_status(file_server):
    with file_server.client() as client:
        job = client.post("/v1/jobs", json={"prompt": "3", "steps": 3, "seed": 9, "response_format": "url"}).json()
        result = client.get(f"/v1/jobs/{job['id']}/events").text
        status = client.get(f"/v1/jobs/{job['id']}").json()
    assert status["status"] == "succeeded"
    assert httpx.get(status["result"]["images"][0]["url"]).content.startswith(PNG_MAGIC)
    assert '"url": "http' in result.split("event: result")[1]


def test_response_format_other_than_b64_json_or_url_is_rejected_naming_the_field(file_server):
    with file_server.client() as client:
        response = client.post("/generate", json={"prompt": "3", "steps": 2, "response_format": "png"})
    assert response.status_code == 422
    assert response.json()["errors"][0]["field"] == "response_format"


def test_an_unmodified_openai_client_gets_urls_that_httpx_downloads_as_png(file_server):
    client = OpenAI(base_url=f"{file_server.url}/v1", api_key="unused", max_retries=0)
    result = client.images.generate(
        prompt="three", n=2, size="32x32", response_format="url", extra_body={"seed": 1, "steps": 3}
    )
    for image in result.data:
        assert image.b64_json is None
        download = httpx.get(image.url)
        assert download.status_code == 200
        assert Image.open(io.BytesIO(download.content)).format == "PNG"
    inline = client.images.generate(prompt="three", n=1, size="32x32", extra_body={"seed": 1, "steps": 3})
    assert base64.b64decode(inline.data[0].b64_json) == httpx.get(result.data[0].url).content


# --------------------------------------------------------------------------- S3 behind Redis


@pytest.fixture(scope="module")
def s3_cluster(tiny_dit_dir):
    moto = MotoServer()
    redis_server = RedisServer()
    store = ("--result-store", f"s3://{BUCKET}/images")
    worker = WorkerProcess(
        redis_server.url, "--model", str(tiny_dit_dir), "--max-batch-size", "4", *store, env=moto.env()
    )
    api = Server("--queue", redis_server.url, *store, env=moto.env())
    yield moto, redis_server, api, worker
    api.stop()
    worker.stop()
    redis_server.stop()
    moto.stop()


def test_with_s3_redis_holds_the_object_keys_and_the_bucket_holds_the_images(s3_cluster):
    moto, redis_server, api, _ = s3_cluster
    with api.client() as client:
        answer = generate(client, seed=21, n=2)
    record = json.loads(redis_server.client().get(f"fastcache:job:{answer['id']}"))
    assert [image["key"] for image in record["images"]] == [f"{answer['id']}/0.png", f"{answer['id']}/1.png"]
    assert all("b64_json" not in image for image in record["images"])
    assert moto.keys(f"images/{answer['id']}/") == [f"images/{answer['id']}/0.png", f"images/{answer['id']}/1.png"]
    body = moto.client().get_object(Bucket=BUCKET, Key=f"images/{answer['id']}/1.png")["Body"].read()
    assert body == base64.b64decode(answer["images"][1]["b64_json"])


def test_with_s3_a_presigned_url_downloads_the_same_bytes_as_the_b64_answer(s3_cluster):
    moto, _, api, _ = s3_cluster
    with api.client() as client:
        inline = generate(client, seed=22)["images"][0]
        linked = generate(client, seed=22, response_format="url")["images"][0]
    assert linked["url"].startswith(moto.endpoint + f"/{BUCKET}/images/")
    assert "X-Amz-Expires=3600" in linked["url"]
    download = httpx.get(linked["url"])
    assert download.status_code == 200 and download.content == base64.b64decode(inline["b64_json"])


def test_a_finished_jobs_events_outlive_its_result_briefly_and_a_late_subscriber_gets_the_result(s3_cluster):
    _, redis_server, api, _ = s3_cluster
    with api.client() as client:
        answer = generate(client, seed=23)
        events_key = f"fastcache:events:{answer['id']}"
        assert 0 < redis_server.client().ttl(events_key) <= 60  # the record keeps the result for the job TTL
        assert redis_server.client().ttl(f"fastcache:job:{answer['id']}") > 60
        redis_server.client().delete(events_key)  # as when it has expired
        late = client.get(f"/v1/jobs/{answer['id']}/events").text
    assert late.startswith("event: result") and '"status": "succeeded"' in late


def test_the_default_memory_store_serves_urls_from_the_job_record(tiny_dit_dir):
    server = Server("--model", str(tiny_dit_dir))
    try:
        with server.client() as client:
            inline = generate(client, seed=31)["images"][0]
            linked = generate(client, seed=31, response_format="url")["images"][0]
        assert urlparse(linked["url"]).path.startswith("/v1/files/")
        assert httpx.get(linked["url"]).content == base64.b64decode(inline["b64_json"])
    finally:
        server.stop()
