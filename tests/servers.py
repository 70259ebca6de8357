"""Real processes for tests: ``fastcache-serve`` / ``fastcache-worker`` on loopback, and ``redis-server``."""

from __future__ import annotations

import base64
import io
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        {
            "FASTCACHE_THREADS": "1",
            "OMP_NUM_THREADS": "1",
            "PYTHONUNBUFFERED": "1",
            "HF_HUB_OFFLINE": "1",
            "PYTHONPATH": str(REPO),
        }
    )
    env.update(extra)
    return env


class Process:
    """A child process whose output goes to a log file (shown when a test fails)."""

    def __init__(self, args: list[str], name: str, env: dict[str, str] | None = None) -> None:
        self.name = name
        fd, path = tempfile.mkstemp(prefix=f"{name}-", suffix=".log")
        self.log_path = Path(path)
        # the child writes through its own copy of the descriptor; ours can close once it has started
        with os.fdopen(fd, "wb") as log:
            self.proc = subprocess.Popen(
                args, stdout=log, stderr=subprocess.STDOUT, env=env or child_env(), cwd=REPO, start_new_session=True
            )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-6000:]

    def signal(self, sig: int) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, sig) if sig == signal.SIGKILL else self.proc.send_signal(sig)

    def stop(self, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        return self.proc.returncode


class Server(Process):
    """``python -m service`` on a free loopback port."""

    def __init__(
        self, *flags: str, env: dict[str, str] | None = None, wait_ready: bool = True, port: int | None = None
    ) -> None:
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        super().__init__(
            [sys.executable, "-m", "service", "--host", "127.0.0.1", "--port", str(self.port), *flags], "server", env
        )
        if wait_ready:
            self.wait_ready()

    def wait_ready(self, timeout: float = 120.0) -> None:
        wait_until(
            lambda: _ok(f"{self.url}/readyz"), timeout, lambda: f"server not ready:\n{self.log()}", process=self.proc
        )

    def client(self, **kwargs) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=kwargs.pop("timeout", 120.0), **kwargs)

    def metrics(self) -> str:
        return httpx.get(f"{self.url}/metrics", timeout=10).text


class WorkerProcess(Process):
    """``python -m service.worker_process`` feeding from ``redis_url``, metrics on a free loopback port."""

    def __init__(self, redis_url: str, *flags: str, wait_ready: bool = True, env: dict[str, str] | None = None) -> None:
        self.metrics_port = free_port()
        self.url = f"http://127.0.0.1:{self.metrics_port}"
        super().__init__(
            [
                sys.executable,
                "-m",
                "service.worker_process",
                "--redis",
                redis_url,
                "--host",
                "127.0.0.1",
                "--metrics-port",
                str(self.metrics_port),
                *flags,
            ],
            "worker",
            env,
        )
        if wait_ready:
            wait_until(
                lambda: _ok(f"{self.url}/readyz"), 120, lambda: f"worker not ready:\n{self.log()}", process=self.proc
            )

    def metrics(self) -> str:
        return httpx.get(f"{self.url}/metrics", timeout=10).text


class RedisServer(Process):
    """A throwaway ``redis-server`` on a free port, no persistence."""

    def __init__(self, port: int | None = None, data_dir: Path | None = None) -> None:
        self.port = port or free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        binary = shutil.which("redis-server") or "/usr/bin/redis-server"
        persistence = ["--save", "", "--appendonly", "no"]
        if data_dir is not None:  # an append-only file: data survives a restart, as in production
            persistence = ["--save", "", "--appendonly", "yes", "--appendfsync", "always", "--dir", str(data_dir)]
        super().__init__(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--protected-mode", "no", *persistence], "redis"
        )
        wait_until(self.ping, 20, lambda: f"redis did not start:\n{self.log()}", process=self.proc)

    def client(self):
        import redis

        return redis.Redis.from_url(self.url, decode_responses=True)

    def pause(self) -> None:
        """SIGSTOP: the server keeps its connections but answers nothing (a hung Redis)."""
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        self.proc.send_signal(signal.SIGCONT)

    def ping(self) -> bool:
        import redis

        try:
            return bool(redis.Redis.from_url(self.url, socket_timeout=1).ping())
        except Exception:
            return False


def _ok(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def wait_until(
    condition,
    timeout: float,
    message=lambda: "timed out",
    process: subprocess.Popen | None = None,
    interval: float = 0.1,
) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if condition():
                return
        except httpx.TransportError:  # the server is not listening yet
            pass
        if process is not None and process.poll() is not None:
            raise AssertionError(f"process exited with {process.returncode}: {message()}")
        time.sleep(interval)
    raise AssertionError(message())


def decode_image(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB")).astype(np.int16)


def metric_samples(text: str, name: str) -> dict[str, float]:
    """``{label-string: value}`` for every sample of metric ``name`` (exact name, e.g. ``..._count``)."""
    values = {}
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            key, _, value = line.rpartition(" ")
            values[key[len(name) :]] = float(value)
    return values
