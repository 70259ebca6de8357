"""The in-process job backend: the API and the engine share one process (the default)."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

from service import telemetry
from service.engine.engine import Engine, Job, JobResult, NotAccepting, QueueFull
from service.engine.families import ModelLimits
from service.queue.base import IdempotencyConflict, JobBackend, JobRecord, JobSubmission, NotReadyError, QueueFullError
from service.settings import Settings

logger = logging.getLogger(__name__)

@dataclass
class _TrackedJob:
    record: JobRecord
    engine_job: Job
    events: list[dict[str, Any]] = field(default_factory=list)
    changed: asyncio.Condition = field(default_factory=asyncio.Condition)


class LocalBackend(JobBackend):
    """Runs jobs on an ``Engine`` in this process; job records live in memory for ``job_ttl_seconds``."""

    def __init__(self, settings: Settings, engine: Engine | None = None) -> None:
        self.settings = settings
        self.model_name = settings.served_model_name
        self.engine = engine
        self._jobs: dict[str, _TrackedJob] = {}
        self._idempotency: dict[str, tuple[str, str]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._load_task: asyncio.Task | None = None
        self._load_error: str | None = None

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        if self.engine is None:
            self._load_task = asyncio.create_task(self._load())
        elif self.engine._thread is None:
            self.engine.start()

    async def _load(self) -> None:
        try:
            self.engine = await asyncio.to_thread(build_engine, self.settings)
            self.engine.start(warmup=True)
        except Exception as error:  # reported by /readyz; the process stays up for diagnosis
            logger.exception("loading model %s failed", self.settings.model)
            self._load_error = f"model failed to load: {error}"

    async def stop(self) -> None:
        if self._load_task is not None and not self._load_task.done():
            self._load_task.cancel()
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
        self._prune()
        fingerprint = submission.fingerprint()
        if idempotency_key is not None and idempotency_key in self._idempotency:
            known_fingerprint, job_id = self._idempotency[idempotency_key]
            if known_fingerprint != fingerprint:
                raise IdempotencyConflict("Idempotency-Key was used with a different request body")
            if job_id in self._jobs:
                return self._jobs[job_id].record
        ok, reason = await self.ready()
        if not ok:
            raise NotReadyError(reason)
        job_id = uuid.uuid4().hex
        record = JobRecord(id=job_id, status="queued", route=submission.route, output_format=submission.output_format)
        now = time.time()
        engine_job = Job(
            job_id=job_id, spec=submission.spec, n=submission.n, output_format=submission.output_format,
            route=submission.route, submitted_at=now, deadline=now + submission.timeout_seconds,
            on_event=lambda event, j=job_id: self._threadsafe(self._on_event, j, event),
            on_done=lambda result, j=job_id: self._threadsafe(self._on_done, j, result),
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
            self._idempotency[idempotency_key] = (fingerprint, job_id)
        return record

    async def get(self, job_id: str) -> JobRecord | None:
        tracked = self._jobs.get(job_id)
        return tracked.record if tracked else None

    async def wait(self, job_id: str, timeout: float) -> JobRecord:
        tracked = self._jobs[job_id]
        async with tracked.changed:
            try:
                await asyncio.wait_for(tracked.changed.wait_for(lambda: tracked.record.terminal), timeout)
            except asyncio.TimeoutError:
                pass
        return tracked.record

    async def events(self, job_id: str) -> AsyncIterator[dict[str, Any]]:
        tracked = self._jobs[job_id]
        index = 0
        while True:
            async with tracked.changed:
                await tracked.changed.wait_for(lambda: len(tracked.events) > index)
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
        if not tracked.record.terminal:
            self.engine.cancel(job_id)
            await self.wait(job_id, timeout=30.0)
        return tracked.record

    # -- engine callbacks, run on the event loop

    def _threadsafe(self, callback: Any, *args: Any) -> None:
        if self._loop is not None and not self._loop.is_closed():
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
        async with tracked.changed:
            record.status = result.status
            record.finished_at = time.time()
            record.images = result.images or None
            if result.error is not None:
                record.error = {"code": result.error.code, "message": result.error.message,
                                "status": result.error.status}
            tracked.events.append({"type": "result", "job": record.to_dict()})
            tracked.changed.notify_all()
        job = tracked.engine_job
        telemetry.record_request(record.route, result, self.model_name, job.submitted_at, job.admitted_at)

    def _prune(self) -> None:
        horizon = time.time() - self.settings.job_ttl_seconds
        for job_id in [j for j, t in self._jobs.items() if t.record.finished_at and t.record.finished_at < horizon]:
            del self._jobs[job_id]
        for key in [k for k, (_, j) in self._idempotency.items() if j not in self._jobs]:
            del self._idempotency[key]


def build_engine(settings: Settings) -> Engine:
    """Load the configured pipeline and wrap it in an engine (not started)."""
    import torch

    from service.engine.engine import load_pipeline
    from service.engine.families import runner_for

    if settings.threads:
        torch.set_num_threads(settings.threads)
    device = settings.resolved_device()
    pipe = load_pipeline(settings.model, device, settings.resolved_dtype())
    runner = runner_for(pipe, torch.device(device), pipe.transformer.dtype)
    return Engine(runner, settings.served_model_name, settings.max_batch_size, settings.max_queue)
