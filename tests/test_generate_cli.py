"""``fastcache-generate``: the console script against real servers (local engine, and Redis without a worker)."""

import json
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from service.generate_cli import MAX_RETRY_WAIT_SECONDS, retry_after_seconds
from tests.servers import RedisServer, Server, WorkerProcess, child_env, decode_image, free_port, wait_until

KEY = "cli-key"
SCRIPT = Path(sys.executable).parent / "fastcache-generate"  # installed by `pip install -e .` (scripts/setup.sh)


@pytest.fixture(scope="module")
def server(tiny_dit_dir):
    s = Server("--model", str(tiny_dit_dir), "--max-batch-size", "4", "--api-key", KEY)
    yield s
    s.stop()


def generate(*args: str, env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    assert SCRIPT.exists(), f"{SCRIPT} missing: the project is not installed (run scripts/setup.sh)"
    return subprocess.run([str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout, env=env or child_env())


def test_writes_the_images_and_prints_their_stats(server, tmp_path):
    out = tmp_path / "out"
    run = generate(
        "seven",
        "-n",
        "2",
        "--steps",
        "4",
        "--tolerance",
        "0.2",
        "--seed",
        "1",
        "-o",
        str(out),
        "--server",
        server.url,
        "--api-key",
        KEY,
    )
    assert run.returncode == 0, run.stderr
    files = sorted(out.iterdir())
    assert [f.name for f in files] == ["seven-seed1.png", "seven-seed2.png"]
    # the files are the images the server generates for the same request
    with server.client(headers={"Authorization": f"Bearer {KEY}"}) as client:
        same = client.post(
            "/generate", json={"prompt": "seven", "n": 2, "steps": 4, "seed": 1, "cache": {"tolerance": 0.2}}
        ).json()
    for path, image in zip(files, same["images"], strict=True):
        assert np.array_equal(np.asarray(Image.open(path).convert("RGB")), decode_image(image["b64_json"]))
    for name in ("seven-seed1.png", "seven-seed2.png"):
        row = next(line for line in run.stdout.splitlines() if name in line)
        assert "fastcache" in row and "%" in row


def test_shows_a_progress_bar_fed_by_the_step_events(server, tmp_path):
    run = generate("3", "--steps", "5", "--seed", "4", "-o", str(tmp_path), "--server", server.url, "--api-key", KEY)
    assert run.returncode == 0, run.stderr
    assert "denoising" in run.stderr and "5/5" in run.stderr


def test_json_output_carries_every_stat_and_the_request_fields(server, tmp_path):
    run = generate(
        "two",
        "-n",
        "2",
        "--steps",
        "6",
        "--seed",
        "9",
        "--method",
        "none",
        "--guidance",
        "2.0",
        "--json",
        "--no-progress",
        "-o",
        str(tmp_path),
        "--server",
        server.url,
        "--api-key",
        KEY,
    )
    assert run.returncode == 0, run.stderr
    lines = [json.loads(line) for line in run.stdout.splitlines()]
    assert [line["seed"] for line in lines] == [9, 10]
    for line in lines:
        assert Path(line["file"]).is_file()
        assert line["stats"]["steps"] == 6 and line["stats"]["method"] == "none"
        assert line["stats"]["mac_fraction"] == 1.0 and line["stats"]["cache_hit_rate"] == 0.0


def test_the_key_comes_from_the_environment_too(server, tmp_path):
    run = generate(
        "1", "--steps", "3", "-o", str(tmp_path), "--server", server.url, env=child_env(FASTCACHE_API_KEY=KEY)
    )
    assert run.returncode == 0, run.stderr
    assert len(list(tmp_path.glob("1-seed*.png"))) == 1


def test_a_missing_key_is_a_clear_401(server, tmp_path):
    run = generate(
        "seven", "--steps", "3", "-o", str(tmp_path), "--server", server.url, env=child_env(FASTCACHE_API_KEY="")
    )
    assert run.returncode == 2
    assert "HTTP 401 unauthorized" in run.stderr and "API key" in run.stderr
    assert not list(tmp_path.iterdir())


def test_a_rejected_request_names_the_field_and_exits_2(server, tmp_path):
    run = generate("banana", "--steps", "3", "-o", str(tmp_path), "--server", server.url, "--api-key", KEY)
    assert run.returncode == 2
    assert "HTTP 422 invalid_request" in run.stderr and "prompt:" in run.stderr and "not one of" in run.stderr
    run = generate("seven", "--tolerance", "3", "-o", str(tmp_path), "--server", server.url, "--api-key", KEY)
    assert run.returncode == 2 and "cache.tolerance" in run.stderr


def test_an_unreachable_server_exits_1_with_a_message(tmp_path):
    url = f"http://127.0.0.1:{free_port()}"
    run = generate("seven", "-o", str(tmp_path), "--server", url)
    assert run.returncode == 1
    assert f"cannot reach the server at {url}" in run.stderr


# --------------------------------------------------------------------------- 503 with Retry-After


@pytest.fixture
def api_without_worker():
    """An API over Redis before any worker registered a model: it answers 503 with Retry-After."""
    redis_server = RedisServer()
    api = Server("--queue", redis_server.url, wait_ready=False)
    wait_until(
        lambda: httpx.get(f"{api.url}/healthz", timeout=2).status_code == 200,
        120,
        lambda: f"api did not start:\n{api.log()}",
        process=api.proc,
    )
    yield redis_server, api
    api.stop()
    redis_server.stop()


def test_a_server_that_stays_unavailable_is_retried_then_given_up(api_without_worker, tmp_path):
    _, api = api_without_worker
    assert httpx.post(f"{api.url}/v1/jobs", json={"prompt": "1"}).status_code == 503
    run = generate("seven", "--retries", "1", "-o", str(tmp_path), "--server", api.url)
    assert run.returncode == 3
    assert "retrying in 5 s (1/1)" in run.stderr  # the server's Retry-After: 5
    assert "gave up after 1 retries" in run.stderr and "HTTP 503 not_ready" in run.stderr


def test_a_server_that_becomes_available_is_retried_until_it_serves(api_without_worker, tiny_dit_dir, tmp_path):
    redis_server, api = api_without_worker
    log = tmp_path / "stderr.txt"
    out = tmp_path / "out"
    with open(log, "w") as stderr:
        process = subprocess.Popen(
            [
                str(SCRIPT),
                "five",
                "--steps",
                "3",
                "--seed",
                "7",
                "--retries",
                "60",
                "-o",
                str(out),
                "--server",
                api.url,
            ],
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
            env=child_env(),
        )
        try:
            wait_until(lambda: "retrying in" in log.read_text(), 120, lambda: log.read_text(), process=process)
            worker = WorkerProcess(redis_server.url, "--model", str(tiny_dit_dir))
            try:
                stdout, _ = process.communicate(timeout=600)
            finally:
                worker.stop()
        finally:
            if process.poll() is None:
                process.kill()
    assert process.returncode == 0, log.read_text()
    assert (out / "five-seed7.png").is_file()
    assert "five-seed7.png" in stdout


def test_retry_after_reads_seconds_and_http_dates_and_is_capped():
    assert retry_after_seconds(httpx.Response(429, headers={"Retry-After": "7"})) == 7
    assert retry_after_seconds(httpx.Response(503)) == 2.0  # absent: a short default
    assert retry_after_seconds(httpx.Response(503, headers={"Retry-After": "86400"})) == MAX_RETRY_WAIT_SECONDS
    past = "Wed, 21 Oct 2015 07:28:00 GMT"
    assert retry_after_seconds(httpx.Response(503, headers={"Retry-After": past})) == 0.0
