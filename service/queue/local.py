"""The in-process job backend: the API and the engine share one process (the default).

Finished results stay readable for ``--job-ttl-seconds`` and are pruned on a timer; their images
count against ``--max-result-bytes``, past which the oldest finished results are dropped first.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import secrets
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from service import telemetry
from service.engine.engine import Engine, Job, JobResult, NotAccepting, QueueFull
from service.engine.job import job_from_submission
from service.model_limits import ModelLimits
from service.queue.base import IdempotencyConflict, JobBackend, JobRecord, JobSubmission, NotReadyError, QueueFullError
from service.queue.results import StoreUnavailable, open_result_store, result_store_url
from service.queue.results.upload import BACKOFF, keep_once
from service.settings import Settings

logger = logging.getLogger(__name__)

PRUNE_INTERVAL_SECONDS = 30.0


@dataclass
class _TrackedJob:
    record: JobRecord
    engine_job: Job
    events: list[dict[str, Any]] = field(default_factory=list)
    changed: asyncio.Condition = field(default_factory=asyncio.Condition)
    result_bytes: int = 0

    def has_events_after(self, seen: int) -> bool:
        return len(self.events) > seen


class LocalBackend(JobBackend):
    """Runs jobs on an ``Engine`` in this process; job records live in memory, bounded in time and bytes."""

    def __init__(self, settings: Settings, engine: Engine | None = None) -> None:
        self.settings = settings
        self.model_name = settings.served_model_name
        self.engine = engine
        self._jobs: dict[str, _TrackedJob] = {}
        self._idempotency: dict[str, tuple[str, str]] = {}
        self._result_bytes = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._load_task: asyncio.Task[None] | None = None
        self._prune_task: asyncio.Task[None] | None = None
        self._load_error: str | None = None
        self.result_store = open_result_store(
            result_store_url(settings), shared=False, public_endpoint=settings.result_public_endpoint
        )
        secret = settings.result_url_secret
        self._url_key = secret.get_secret_value().encode() if secret else secrets.token_bytes(32)

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        if self.engine is None:
            self._load_task = asyncio.create_task(self._load())
        elif not self.engine.started:
            self.engine.start()
        self._prune_task = asyncio.create_task(self._prune_loop())

    async def _load(self) -> None:
        from service.engine.loading import build_engine

        try:
            self.engine = await asyncio.to_thread(build_engine, self.settings)
            self.engine.start(warmup=True)
        except Exception as error:  # reported by /readyz; the process stays up for diagnosis
            logger.exception("loading model %s failed", self.settings.model)
            self._load_error = f"model failed to load: {error}"

    async def stop(self) -> None:
        for task in (self._load_task, self._prune_task):
            if task is not None and not task.done():
                task.cancel()
        if self.engine is not None:
            await asyncio.to_thread(self.engine.shutdown, True)

    def limits(self) -> ModelLimits | None:
        return self.engine.limits if self.engine is not None else None

    async def ready(self) -> tuple[bool, str]:
        if self._load_error:
            return False, self._load_error
        if self.engine is None:
            return False, "model loading"
        if self.engine.startup_error:
            return False, self.engine.startup_error
        if not self.engine.ready:
            return False, "model warming up"
        return True, ""

    async def submit(self, submission: JobSubmission, idempotency_key: str | None = None) -> JobRecord:
        fingerprint = submission.fingerprint()
        if idempotency_key is not None and idempotency_key in self._idempotency:
            known_fingerprint, job_id = self._idempotency[idempotency_key]
            if known_fingerprint != fingerprint:
                raise IdempotencyConflict("Idempotency-Key was used with a different request body")
            if job_id in self._jobs:
                return self._jobs[job_id].record
        ok, reason = await self.ready()
        if not ok or self.engine is None:
            raise NotReadyError(reason)
        job_id = uuid.uuid4().hex
        record = JobRecord(
            id=job_id,
            status="queued",
            route=submission.route,
            output_format=submission.output_format,
            response_format=submission.response_format,
        )
        engine_job = job_from_submission(
            job_id,
            submission,
            time.time(),
            on_event=functools.partial(self._threadsafe, self._on_event, job_id),
            on_done=functools.partial(self._threadsafe, self._on_done, job_id),
        )
        tracked = _TrackedJob(record, engine_job)
        self._jobs[job_id] = tracked
        try:
            self.engine.submit(engine_job)
        except QueueFull as error:
            del self._jobs[job_id]
            raise QueueFullError(str(error)) from error
        except NotAccepting as error:
            del self._jobs[job_id]
            raise NotReadyError(str(error)) from error
        if idempotency_key is not None:
            # the check above and this write run without an await between them: atomic on the event loop
            self._idempotency[idempotency_key] = (fingerprint, job_id)
        return record

    async def get(self, job_id: str) -> JobRecord | None:
        tracked = self._jobs.get(job_id)
        return tracked.record if tracked else None

    async def wait(self, job_id: str, timeout: float) -> JobRecord:
        tracked = self._jobs.get(job_id)
        if tracked is None:
            raise NotReadyError(f"job {job_id} is no longer stored")
        async with tracked.changed:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(tracked.changed.wait_for(lambda: tracked.record.terminal), timeout)
        return tracked.record

    async def events(self, job_id: str) -> AsyncIterator[dict[str, Any]]:
        tracked = self._jobs[job_id]
        index = 0
        while True:
            async with tracked.changed:
                await tracked.changed.wait_for(functools.partial(tracked.has_events_after, index))
                pending = tracked.events[index:]
            for event in pending:
                index += 1
                yield event
                if event["type"] == "result":
                    return

    async def cancel(self, job_id: str) -> JobRecord | None:
        tracked = self._jobs.get(job_id)
        if tracked is None:
            return None
        if not tracked.record.terminal and self.engine is not None:  # a tracked job implies an engine
            self.engine.cancel(job_id)
            await self.wait(job_id, timeout=30.0)
        return tracked.record

    async def abandon(self, job_id: str) -> None:
        if self.engine is not None:
            self.engine.cancel(job_id)

    async def url_signing_key(self) -> bytes:
        return self._url_key

    # -- engine callbacks, run on the event loop

    def _threadsafe(self, callback: Any, *args: Any) -> None:
        if self._loop is not None and not self._loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile (process exit)
                self._loop.call_soon_threadsafe(lambda: asyncio.ensure_future(callback(*args)))

    async def _on_event(self, job_id: str, event: dict[str, Any]) -> None:
        tracked = self._jobs.get(job_id)
        if tracked is None:
            return
        async with tracked.changed:
            if not tracked.record.terminal:
                tracked.record.status = "running"
                tracked.record.steps_done = event.get("step", tracked.record.steps_done)
                tracked.events.append(event)
                tracked.changed.notify_all()

    async def _on_done(self, job_id: str, result: JobResult) -> None:
        tracked = self._jobs.get(job_id)
        if tracked is None:
            return
        record = tracked.record
        images = result.images or None
        if images and self.result_store.holds_objects:
            images = await self._keep(job_id, images, record.output_format)
        async with tracked.changed:
            record.status = result.status
            record.finished_at = time.time()
            record.images = images
            if result.error is not None:
                record.error = {
                    "code": result.error.code,
                    "message": result.error.message,
                    "status": result.error.status,
                }
            tracked.events.append({"type": "result", "job": record.to_dict()})
            tracked.changed.notify_all()
        tracked.result_bytes = sum(len(image.get("b64_json", "")) for image in record.images or [])
        self._result_bytes += tracked.result_bytes
        job = tracked.engine_job
        telemetry.record_request(record.route, result, self.model_name, job.submitted_at, job.admitted_at)
        self._enforce_byte_cap(keep=job_id)

    async def _keep(self, job_id: str, images: list[dict[str, Any]], output_format: str) -> list[dict[str, Any]]:
        """Upload a finished job's images to the object store, retrying with backoff until it takes them.

        The job stays ``running`` meanwhile: its result exists only once its images are stored.
        """
        attempt = 0
        while True:
            try:
                return await asyncio.to_thread(keep_once, self.result_store, job_id, images, output_format)
            except StoreUnavailable as error:
                logger.warning("job %s: %s; retrying", job_id, error)
                await asyncio.sleep(BACKOFF.delay(attempt))
                attempt += 1

    # -- bounded memory

    async def _prune_loop(self) -> None:
        interval = min(PRUNE_INTERVAL_SECONDS, self.settings.job_ttl_seconds / 4)
        while True:
            await asyncio.sleep(interval)
            self.prune()
            await self.prune_objects()

    async def prune_objects(self) -> None:
        """Delete image objects older than the job TTL (directory store; S3 objects expire by a lifecycle rule)."""
        try:
            removed = await asyncio.to_thread(self.result_store.prune, self.settings.job_ttl_seconds)
        except OSError:
            logger.exception("pruning the result store failed")
            return
        telemetry.RESULT_OBJECTS_PRUNED.inc(removed)

    def prune(self, now: float | None = None) -> int:
        """Drop finished jobs older than the TTL (and idempotency keys of dropped jobs); how many dropped."""
        horizon = (now or time.time()) - self.settings.job_ttl_seconds
        expired = [j for j, t in self._jobs.items() if t.record.finished_at and t.record.finished_at < horizon]
        for job_id in expired:
            self._drop(job_id, "expired")
        return len(expired)

    def _enforce_byte_cap(self, keep: str) -> None:
        """Drop the oldest finished results until the stored images fit ``--max-result-bytes``."""
        if self._result_bytes <= self.settings.max_result_bytes:
            return
        finished = sorted(
            (t.record.finished_at, j)
            for j, t in self._jobs.items()
            if t.record.finished_at and t.result_bytes and j != keep
        )
        for _, job_id in finished:
            if self._result_bytes <= self.settings.max_result_bytes:
                break
            self._drop(job_id, "bytes")

    @property
    def stored_result_bytes(self) -> int:
        """Bytes of base64 images held for finished jobs."""
        return self._result_bytes

    def _drop(self, job_id: str, reason: str) -> None:
        tracked = self._jobs.pop(job_id, None)
        if tracked is None:
            return
        self._result_bytes -= tracked.result_bytes
        telemetry.RESULTS_PRUNED.labels(reason=reason).inc()
        for key in [k for k, (_, j) in self._idempotency.items() if j == job_id]:
            del self._idempotency[key]
