"""The ``fastcache-worker`` process around a ``Worker``: its operations endpoints (``/metrics``,
``/healthz``, ``/readyz``, up before the model loads), signal handling and entry point."""

from __future__ import annotations

import json
import signal
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import redis

from service import telemetry
from service.queue.redis_protocol import client_options
from service.queue.results import open_result_store, result_store_url
from service.settings import WORKER_FLAGS, Settings, parse_settings
from service.worker import IDLE_BLOCK_MS, Worker


class _HealthHandler(BaseHTTPRequestHandler):
    holder: dict[str, Any]  # {"settings": Settings, "worker": Worker | None (while the model loads)}

    def do_GET(self) -> None:  # noqa: N802 (http.server API)
        worker = self.holder.get("worker")
        if self.path == "/metrics":
            self._send(200, telemetry.render(self.holder["settings"].resolved_device()), "text/plain; version=0.0.4")
        elif self.path == "/healthz":
            self._send(200, b'{"status": "ok"}', "application/json")
        elif self.path == "/readyz":
            reason = _unready_reason(worker)
            telemetry.READY.set(0 if reason else 1)
            body = {"status": "not ready", "reason": reason} if reason else {"status": "ready"}
            self._send(503 if reason else 200, json.dumps(body).encode(), "application/json")
        else:
            self._send(404, b'{"status": "not found"}', "application/json")

    def _send(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


def _unready_reason(worker: Worker | None) -> str | None:
    """Why the worker cannot take work now, or ``None`` when it can."""
    if worker is None:
        return "model loading"
    if worker.engine.startup_error:
        return worker.engine.startup_error
    if not worker.engine.ready:
        return "model warming up"
    if worker.stopping or worker.stop_requested:
        return "shutting down"
    if not worker.redis_ok:
        return worker.redis_error or "redis unreachable"
    if worker.uploader is not None and worker.uploader.stalled:
        return worker.uploader.stalled
    return None


def serve_operations(holder: dict[str, Any], host: str, port: int) -> ThreadingHTTPServer:
    """/metrics, /healthz and /readyz of a worker, on its own port, up before the model loads."""
    handler = type("Handler", (_HealthHandler,), {"holder": holder})
    server = ThreadingHTTPServer((host, port), handler)
    threading.Thread(target=server.serve_forever, name="worker-metrics", daemon=True).start()
    return server


def run_worker(settings: Settings) -> None:
    """Load the model, connect to Redis and serve until SIGTERM/SIGINT."""
    from service.engine.loading import build_engine

    telemetry.configure_logging(settings.log_level)
    url = settings.redis or (settings.queue if settings.queue.startswith("redis") else None)
    if not url:
        raise SystemExit("fastcache-worker needs --redis redis://host:port/db (or FASTCACHE_REDIS)")
    try:
        result_store = open_result_store(result_store_url(settings), shared=True)
    except ValueError as error:
        raise SystemExit(f"fastcache-worker: {error}") from error
    holder: dict[str, Any] = {"settings": settings, "worker": None}
    server = serve_operations(holder, settings.host, settings.metrics_port)  # /healthz answers during the load
    stop_early = threading.Event()  # a signal while the model loads
    signal.signal(signal.SIGTERM, lambda *_: stop_early.set())
    signal.signal(signal.SIGINT, lambda *_: stop_early.set())
    try:
        engine = build_engine(settings)
        engine.max_queue = max(engine.max_queue, settings.max_batch_size)
        # the socket timeout must outlast the idle XREADGROUP block
        timeout = max(settings.redis_timeout, IDLE_BLOCK_MS / 1000 + 1.0)
        client = redis.Redis.from_url(url, **client_options(timeout, asynchronous=False))
        worker = Worker(settings, engine, client, result_store=result_store)
        holder["worker"] = worker
        signal.signal(signal.SIGTERM, lambda *_: worker.request_stop())
        signal.signal(signal.SIGINT, lambda *_: worker.request_stop())
        if stop_early.is_set():
            worker.request_stop()
        worker.run()
    finally:
        server.shutdown()


def main(argv: list[str] | None = None) -> None:
    """Entry point of ``fastcache-worker`` and ``python -m service.worker_process``."""
    run_worker(parse_settings(WORKER_FLAGS, "FastCache worker: runs jobs from a Redis stream.", argv))


if __name__ == "__main__":
    main()
