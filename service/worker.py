"""``fastcache-worker``: runs the engine on one device and feeds it from the Redis job stream.

The main thread talks to Redis; the engine thread only denoises. Each loop the main thread
1. flushes what the engine produced (progress events, finished jobs: result stored, *then* ``XACK``
   and ``XDEL``; retryable failures stay unacknowledged for redelivery);
2. refreshes the idle time of its in-flight entries (``XCLAIM ... JUSTID``: a heartbeat that does not
   count as a delivery), so only entries of dead workers look idle;
3. reclaims entries idle past ``--reclaim-idle-seconds`` (``XAUTOCLAIM``), dead-lettering those delivered
   more than ``--max-deliveries`` times;
4. reads new jobs with ``XREADGROUP COUNT <free batch slots> BLOCK`` so it admits them at step boundaries;
5. forwards cancellation flags to the engine.
Redis errors back off and retry; nothing the engine finished is dropped while Redis is away.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import signal
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import redis

from service import telemetry
from service.engine.engine import Engine, Job, JobResult
from service.engine.families import InvalidField, validate_spec
from service.queue.base import JobRecord, JobSubmission
from service.queue.redis_streams import LAYOUT, STORE_RESULT_SCRIPT, UPDATE_PROGRESS_SCRIPT, RedisLayout
from service.settings import Settings

logger = logging.getLogger(__name__)

RETRYABLE_MIN_STATUS = 500  # server-side failures are retried on another delivery; client errors are final


@dataclass
class _InFlight:
    entry_id: str
    job_id: str
    job: Job | None = None


class Worker:
    """The Redis side of one worker process."""

    def __init__(self, settings: Settings, engine: Engine, client: redis.Redis, layout: RedisLayout = LAYOUT) -> None:
        self.settings = settings
        self.engine = engine
        self.redis = client
        self.layout = layout
        self.consumer = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.ttl = settings.job_ttl_seconds
        self.outbox: queue.Queue[tuple[str, str, Any]] = queue.Queue()
        self._unflushed: list[tuple[str, str, Any]] = []
        self.in_flight: dict[str, _InFlight] = {}
        self.stopping = False
        self.redis_ok = False
        self._store = self.redis.register_script(STORE_RESULT_SCRIPT)
        self._progress = self.redis.register_script(UPDATE_PROGRESS_SCRIPT)
        self._last_reclaim = 0.0

    # ------------------------------------------------------------------ lifecycle

    def run(self) -> None:
        """Serve until stopped; then drain in-flight jobs and flush their results."""
        self.engine.start(warmup=True)
        while not self.engine.ready:
            if not self.engine.running:
                raise RuntimeError("the engine failed to start; see the log above")
            time.sleep(0.1)
        backoff = 0.2
        while True:
            try:
                if not self.redis_ok:
                    self._register()
                self._flush()
                if self.stopping:
                    if not self.engine.running and not self._unflushed and self.outbox.empty():
                        break
                    time.sleep(0.05)
                    continue
                self._heartbeat()
                self._reclaim()
                self._read()
                self._forward_cancellations()
                backoff = 0.2
            except (redis.ConnectionError, redis.TimeoutError, OSError, redis.ResponseError) as error:
                if isinstance(error, redis.ResponseError) and "NOGROUP" not in str(error):
                    raise
                if self.redis_ok:
                    logger.warning("redis unavailable (%s); retrying", error)
                self.redis_ok = False
                time.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
        logger.info("worker %s drained and stopped", self.consumer)

    def stop(self) -> None:
        """Stop reading; in-flight jobs finish; waiting ones are left to other workers."""
        if self.stopping:
            return
        self.stopping = True
        left = self.engine.shutdown(drain=True, timeout=0, fail_waiting=False)
        for job in left:
            self.in_flight.pop(job.job_id, None)

    def _register(self) -> None:
        """(Re)create the consumer group and publish what the model accepts."""
        try:
            self.redis.xgroup_create(self.layout.stream, self.layout.group, id="0", mkstream=True)
        except redis.ResponseError as error:
            if "BUSYGROUP" not in str(error):
                raise
        self.redis.set(self.layout.model, json.dumps({"name": self.engine.model_name,
                                                       "limits": self.engine.limits.to_dict()}))
        self.redis_ok = True
        logger.info("worker %s registered on %s", self.consumer, self.layout.stream)

    # ------------------------------------------------------------------ reading

    def _read(self) -> None:
        free = self.engine.free_slots
        if free > 0:
            # idle: block on the stream (a new entry wakes us at once); busy: don't block on Redis, so
            # results and progress are flushed as soon as the engine produces them
            block = None if self.in_flight else 100
            response = self.redis.xreadgroup(self.layout.group, self.consumer, {self.layout.stream: ">"},
                                             count=free, block=block)
            for _, entries in response or []:
                for entry_id, fields in entries:
                    self._take(entry_id, fields)
        if self.in_flight:
            self._wait_for_engine(0.01)

    def _reclaim(self) -> None:
        now = time.monotonic()
        if now - self._last_reclaim < min(1.0, self.settings.reclaim_idle_seconds / 2):
            return
        self._last_reclaim = now
        free = self.engine.free_slots
        if free <= 0:
            return
        idle_ms = int(self.settings.reclaim_idle_seconds * 1000)
        _, claimed, _ = self.redis.xautoclaim(self.layout.stream, self.layout.group, self.consumer, idle_ms,
                                              start_id="0-0", count=free)
        for entry_id, fields in claimed:
            if fields is None:  # deleted meanwhile
                self.redis.xack(self.layout.stream, self.layout.group, entry_id)
                continue
            pending = self.redis.xpending_range(self.layout.stream, self.layout.group, min=entry_id,
                                                max=entry_id, count=1)
            deliveries = pending[0]["times_delivered"] if pending else 1
            if deliveries > self.settings.max_deliveries:
                self._dead_letter(entry_id, fields, deliveries)
                continue
            telemetry.RECLAIMED.inc()
            logger.info("reclaimed job %s (delivery %d)", fields.get("job_id"), deliveries)
            self._take(entry_id, fields)

    def _take(self, entry_id: str, fields: dict[str, str]) -> None:
        """Start one stream entry on the engine, or settle it at once."""
        job_id = fields.get("job_id") or f"entry-{entry_id}"
        record = self._record(job_id)
        if record is not None and record.terminal:
            self._ack(entry_id)  # ran before (or cancelled while queued): one result per job
            return
        try:
            submission = JobSubmission.from_json(fields["submission"])
        except Exception as error:  # unreadable payload: retried, then dead-lettered with this error
            self._note_attempt(job_id, f"unreadable job payload: {error!r}")
            return
        if self.redis.exists(self.layout.cancel(job_id)):
            self._settle(job_id, entry_id, JobResult("cancelled"))
            return
        try:
            validate_spec(self.engine.limits, submission.spec)
        except InvalidField as error:
            self._settle(job_id, entry_id, JobResult("failed", error=_client_error(error)))
            return
        now = time.time()
        created = record.created_at if record is not None else now
        job = Job(job_id=job_id, spec=submission.spec, n=submission.n, output_format=submission.output_format,
                  route=submission.route, submitted_at=created, deadline=created + submission.timeout_seconds,
                  on_event=lambda event, j=job_id: self.outbox.put(("event", j, event)),
                  on_done=lambda result, j=job_id: self.outbox.put(("done", j, result)))
        self.in_flight[job_id] = _InFlight(entry_id, job_id, job)
        try:
            self.engine.submit(job)
        except Exception as error:  # full or stopping: stays pending, another delivery takes it
            self.in_flight.pop(job_id, None)
            logger.info("job %s left pending: %s", job_id, error)

    # ------------------------------------------------------------------ results

    def _flush(self) -> None:
        """Write what the engine produced; keep anything Redis refused for the next round."""
        while True:
            try:
                self._unflushed.append(self.outbox.get_nowait())
            except queue.Empty:
                break
        while self._unflushed:
            kind, job_id, payload = self._unflushed[0]
            if kind == "event":
                self._publish_event(job_id, payload)
            else:
                flight = self.in_flight.pop(job_id, None)
                if flight is not None:
                    self._finish(flight, payload)
            self._unflushed.pop(0)

    def _publish_event(self, job_id: str, event: dict[str, Any]) -> None:
        pipe = self.redis.pipeline(transaction=False)
        self._progress(keys=[self.layout.job(job_id)], args=["running", event.get("step", 0), self.ttl], client=pipe)
        pipe.xadd(self.layout.events(job_id), {"event": json.dumps(event)}, maxlen=1000, approximate=True)
        pipe.expire(self.layout.events(job_id), self.ttl)
        pipe.execute()

    def _finish(self, flight: _InFlight, result: JobResult) -> None:
        error = result.error
        if result.status == "failed" and error is not None and error.status >= RETRYABLE_MIN_STATUS \
                and error.code != "deadline_exceeded":
            # leave it unacknowledged: another delivery retries it, up to the dead-letter bound
            self._note_attempt(flight.job_id, f"{error.code}: {error.message}")
            if error.code == "shutting_down":
                return
            logger.warning("job %s failed (%s); left for redelivery", flight.job_id, error.message)
            return
        self._settle(flight.job_id, flight.entry_id, result, flight.job)

    def _settle(self, job_id: str, entry_id: str, result: JobResult, job: Job | None = None) -> None:
        """Store the final record (once per job), then acknowledge and delete the stream entry."""
        record = self._record(job_id) or JobRecord(id=job_id, status="queued")
        record.status = result.status
        record.finished_at = time.time()
        record.images = result.images or None
        if result.error is not None:
            record.error = {"code": result.error.code, "message": result.error.message, "status": result.error.status}
        stored = self._store(keys=[self.layout.job(job_id), self.layout.results_stored],
                             args=[json.dumps(record.to_dict()), self.ttl])
        if stored:
            event = {"type": "result", "job": record.to_dict()}
            pipe = self.redis.pipeline(transaction=False)
            pipe.xadd(self.layout.events(job_id), {"event": json.dumps(event)})
            pipe.expire(self.layout.events(job_id), self.ttl)
            pipe.publish(self.layout.done_channel, job_id)
            pipe.execute()
            telemetry.record_request(record.route, result, self.engine.model_name, record.created_at,
                                     job.admitted_at if job is not None else None)
        self._ack(entry_id)

    def _ack(self, entry_id: str) -> None:
        pipe = self.redis.pipeline(transaction=True)
        pipe.xack(self.layout.stream, self.layout.group, entry_id)
        pipe.xdel(self.layout.stream, entry_id)
        pipe.execute()

    def _dead_letter(self, entry_id: str, fields: dict[str, str], deliveries: int) -> None:
        job_id = fields.get("job_id") or f"entry-{entry_id}"
        last_error = self.redis.hget(self.layout.job(job_id) + ":attempts", "last_error") or "worker lost the job"
        self.redis.xadd(self.layout.dead_letter, {"job_id": job_id, "entry_id": entry_id, "deliveries": deliveries,
                                                  "error": last_error, "submission": fields.get("submission", "")})
        telemetry.DEAD_LETTERED.inc()
        logger.error("job %s dead-lettered after %d deliveries: %s", job_id, deliveries, last_error)
        message = f"failed after {deliveries - 1} attempts: {last_error}"
        self._settle(job_id, entry_id, JobResult("failed", error=_dead_letter_error(message)))

    def _note_attempt(self, job_id: str, message: str) -> None:
        key = self.layout.job(job_id) + ":attempts"
        pipe = self.redis.pipeline(transaction=False)
        pipe.hset(key, mapping={"last_error": message})
        pipe.hincrby(key, "failures", 1)
        pipe.expire(key, self.ttl)
        pipe.execute()

    def _record(self, job_id: str) -> JobRecord | None:
        raw = self.redis.get(self.layout.job(job_id))
        return JobRecord.from_dict(json.loads(raw)) if raw else None

    # ------------------------------------------------------------------ housekeeping

    def _heartbeat(self) -> None:
        ids = [f.entry_id for f in self.in_flight.values()]
        if ids:
            self.redis.xclaim(self.layout.stream, self.layout.group, self.consumer, 0, ids, justid=True)

    def _forward_cancellations(self) -> None:
        ids = list(self.in_flight)
        if not ids:
            return
        flags = self.redis.mget([self.layout.cancel(j) for j in ids])
        for job_id, flag in zip(ids, flags):
            if flag:
                self.engine.cancel(job_id)

    def _wait_for_engine(self, seconds: float) -> None:
        try:
            self._unflushed.append(self.outbox.get(timeout=seconds))
        except queue.Empty:
            pass


def _client_error(error: InvalidField):
    from service.engine.engine import JobError

    return JobError("invalid_request", f"{error.field}: {error.message}", 422)


def _dead_letter_error(message: str):
    from service.engine.engine import JobError

    return JobError("dead_lettered", message, 500)


class _HealthHandler(BaseHTTPRequestHandler):
    holder: dict[str, Any]  # {"settings": Settings, "worker": Worker | None (while the model loads)}

    def do_GET(self) -> None:  # noqa: N802 (http.server API)
        worker = self.holder.get("worker")
        if self.path == "/metrics":
            self._send(200, telemetry.render(self.holder["settings"].resolved_device()), "text/plain; version=0.0.4")
        elif self.path == "/healthz":
            self._send(200, b'{"status": "ok"}', "application/json")
        elif self.path == "/readyz":
            ok = worker is not None and worker.engine.ready and worker.redis_ok and not worker.stopping
            telemetry.READY.set(1 if ok else 0)
            self._send(200 if ok else 503, json.dumps({"status": "ready" if ok else "not ready"}).encode(),
                       "application/json")
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


def serve_operations(holder: dict[str, Any], host: str, port: int) -> ThreadingHTTPServer:
    """/metrics, /healthz and /readyz of a worker, on its own port, up before the model loads."""
    handler = type("Handler", (_HealthHandler,), {"holder": holder})
    server = ThreadingHTTPServer((host, port), handler)
    threading.Thread(target=server.serve_forever, name="worker-metrics", daemon=True).start()
    return server


def run_worker(settings: Settings) -> None:
    """Entry point of ``fastcache-worker``."""
    from service.queue.local import build_engine

    telemetry.configure_logging(settings.log_level)
    url = settings.redis or (settings.queue if settings.queue.startswith("redis") else None)
    if not url:
        raise SystemExit("fastcache-worker needs --redis redis://host:port/db (or FASTCACHE_REDIS)")
    holder: dict[str, Any] = {"settings": settings, "worker": None}
    server = serve_operations(holder, settings.host, settings.metrics_port)  # /healthz answers during the load
    try:
        engine = build_engine(settings)
        engine.max_queue = max(engine.max_queue, settings.max_batch_size)
        client = redis.Redis.from_url(url, decode_responses=True, socket_timeout=5, socket_connect_timeout=2)
        worker = Worker(settings, engine, client)
        holder["worker"] = worker
        signal.signal(signal.SIGTERM, lambda *_: worker.stop())
        signal.signal(signal.SIGINT, lambda *_: worker.stop())
        worker.run()
    finally:
        server.shutdown()


if __name__ == "__main__":
    from service.cli import worker

    worker()
