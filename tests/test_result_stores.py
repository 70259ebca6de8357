"""Result stores against real backends: a directory, and moto's S3 server as a process; signed URLs."""

from __future__ import annotations

import base64
import os
import time

import httpx
import pytest

from service.api.signed_urls import signed_path, verify
from service.queue.results import ImageMissing, StoreUnavailable, object_key, open_result_store, parse_object_key
from service.queue.results.directory import DirectoryStore
from tests.objectstore import BUCKET, MotoServer, aws_environment

PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(256))
IMAGES = [{"b64_json": base64.b64encode(PNG).decode(), "seed": 7, "stats": {"steps": 2}}]


@pytest.fixture(scope="module")
def moto():
    server = MotoServer()
    yield server
    server.stop()


def test_an_object_store_keeps_keys_and_stats_in_the_record_not_the_image(tmp_path):
    store = DirectoryStore(tmp_path)
    [entry] = store.keep("job1", IMAGES, "png")
    assert entry == {"key": "job1/0.png", "bytes": len(PNG), "seed": 7, "stats": {"steps": 2}}
    assert (tmp_path / "job1" / "0.png").read_bytes() == PNG
    assert store.read(entry) == PNG


def test_the_directory_store_prunes_files_older_than_the_ttl_and_keeps_newer_ones(tmp_path):
    store = DirectoryStore(tmp_path)
    store.put("old/0.png", PNG)
    store.put("new/0.png", PNG)
    past = time.time() - 7200
    os.utime(tmp_path / "old" / "0.png", (past, past))
    assert store.prune(3600) == 1
    assert not (tmp_path / "old").exists()
    assert store.get("new/0.png") == PNG


def test_the_directory_store_refuses_keys_that_are_not_image_keys(tmp_path):
    with pytest.raises(ImageMissing):
        DirectoryStore(tmp_path).get("../../etc/passwd")


def test_an_unwritable_directory_is_an_unavailable_store(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(StoreUnavailable):
        DirectoryStore(blocker).put("job/0.png", PNG)


def test_the_s3_store_uploads_under_its_prefix_and_presigns_a_url_that_downloads_the_bytes(moto):
    with aws_environment(moto.endpoint):
        store = open_result_store(f"s3://{BUCKET}/results/run1", shared=True)
        [entry] = store.keep("job2", IMAGES, "png")
        url = store.presigned_url(entry["key"], 60)
    assert moto.keys("results/run1/") == ["results/run1/job2/0.png"]
    assert store.read(entry) == PNG
    assert url is not None and "Signature" in url
    response = httpx.get(url)
    assert response.status_code == 200 and response.content == PNG
    assert response.headers["content-type"] == "image/png"


def test_the_s3_store_reports_a_missing_object_as_missing(moto):
    with aws_environment(moto.endpoint):
        store = open_result_store(f"s3://{BUCKET}/results", shared=True)
        store.warm()  # the clients read the credentials when they are made
    with pytest.raises(ImageMissing):
        store.read({"key": "nojob/0.png"})


def test_the_s3_store_reports_an_unreachable_endpoint_as_unavailable():
    with aws_environment("http://127.0.0.1:9"):  # nothing listens on the discard port
        store = open_result_store(f"s3://{BUCKET}/results", shared=True)
        store.warm()
    with pytest.raises(StoreUnavailable):
        store.keep("job3", IMAGES, "png")


@pytest.mark.parametrize(
    ("value", "shared", "message"),
    [
        ("memory", True, "one process"),
        ("redis", False, "--queue redis"),
        ("file://relative/dir", False, "absolute path"),
        ("s3://", True, "needs a bucket"),
        ("ftp://host/dir", False, "must be memory, redis"),
    ],
)
def test_a_result_store_that_cannot_work_is_refused_naming_the_flag(value, shared, message):
    with pytest.raises(ValueError, match="--result-store") as error:
        open_result_store(value, shared=shared)
    assert message in str(error.value)


def test_object_keys_name_the_job_and_the_image_and_nothing_else_parses():
    assert object_key("abc", 2, "jpeg") == "abc/2.jpg"
    assert parse_object_key("abc/2.jpg") == ("abc", 2)
    assert parse_object_key("abc/../x.png") is None


def test_a_signed_url_is_refused_when_tampered_expired_or_moved_to_another_key():
    secret = b"k" * 32
    path = signed_path(secret, "job/0.png", 60, now=1000)
    query = dict(part.split("=") for part in path.split("?")[1].split("&"))
    assert verify(secret, "job/0.png", query["expires"], query["signature"], now=1000) is None
    assert "signature" in verify(secret, "job/0.png", query["expires"], "0" * 64, now=1000)
    assert "signature" in verify(secret, "other/0.png", query["expires"], query["signature"], now=1000)
    assert "signature" in verify(secret, "job/0.png", str(int(query["expires"]) + 60), query["signature"], now=1000)
    assert "expired" in verify(secret, "job/0.png", query["expires"], query["signature"], now=1061)
    assert "no valid" in verify(secret, "job/0.png", None, None)


def test_presigned_urls_name_the_public_endpoint_when_one_is_given(moto):
    with aws_environment(moto.endpoint):
        store = open_result_store(f"s3://{BUCKET}/results", shared=True, public_endpoint="http://localhost:9000")
        store.warm()
    url = store.presigned_url("job/0.png", 60)
    assert url is not None and url.startswith(f"http://localhost:9000/{BUCKET}/results/job/0.png?")
