"""An API replica in Redis mode is a small process: no torch, no diffusers; the model's limits come from the workers."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.objectstore import BUCKET, MotoServer
from tests.servers import REPO, RedisServer, Server, WorkerProcess, child_env

BUILD_APP = """
import sys
from service.settings import Settings
from service.api.app import build_backend, create_app
settings = Settings(queue="redis://127.0.0.1:1/0", result_store={store!r})
create_app(settings, build_backend(settings))
heavy = sorted(name for name in ("torch", "diffusers", "transformers") if name in sys.modules)
print("heavy modules:", heavy)
sys.exit(1 if heavy else 0)
"""


@pytest.mark.parametrize("store", ["redis", "s3://bucket/prefix", "file:///tmp/fastcache-results"])
def test_building_the_api_app_in_redis_mode_imports_no_torch(store):
    done = subprocess.run(
        [sys.executable, "-c", BUILD_APP.format(store=store)],
        cwd=REPO,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def mapped_libraries(pid: int) -> set[str]:
    return {Path(line.split()[-1]).name for line in Path(f"/proc/{pid}/maps").read_text().splitlines() if "/" in line}


def test_a_redis_mode_api_replica_serves_a_generation_without_loading_torch(tiny_dit_dir):
    moto = MotoServer()
    redis_server = RedisServer()
    store = ("--result-store", f"s3://{BUCKET}/light")
    worker = WorkerProcess(redis_server.url, "--model", str(tiny_dit_dir), *store, env=moto.env())
    api = Server("--queue", redis_server.url, *store, env=moto.env())
    try:
        with api.client() as client:
            serving = client.get("/v1/models/tiny-dit").json()["serving"]  # the worker's limits, through Redis
            assert serving["labels"][7] == "seven" and serving["default_steps"] == 50
            response = client.post("/generate", json={"prompt": "seven", "steps": 2, "response_format": "url"})
            assert response.status_code == 200, response.text
            assert client.get("/metrics").status_code == 200
        libraries = mapped_libraries(api.proc.pid)
        assert not any(name.startswith(("libtorch", "libc10")) for name in libraries), sorted(libraries)
    finally:
        api.stop()
        worker.stop()
        redis_server.stop()
        moto.stop()
