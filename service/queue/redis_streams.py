"""The Redis Streams job backend (scale-out): API replicas submit, GPU workers pull as many jobs as
they have free image slots. Key layout and scripts: ``service.queue.redis_protocol``.

Every Redis operation of the API is bounded by ``--redis-timeout`` (redis-py retries a lost
connection with backoff first); what still fails raises ``NotReadyError``, which every route
answers with ``503`` and ``Retry-After``. Nothing here needs a restart after an outage.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Awaitable
from typing import Any, TypeVar

from service import telemetry
from service.model_limits import ModelLimits
from service.queue.base import IdempotencyConflict, JobBackend, JobRecord, JobSubmission, NotReadyError, QueueFullError
from service.queue.redis_protocol import (
    EVENTS_AFTER_RESULT_SECONDS,
    EVENTS_MAXLEN,
    LAYOUT,
    STORE_RESULT_SCRIPT,
    SUBMIT_SCRIPT,
    RedisLayout,
    client_options,
    compact_json,
    read_entries,
)
from service.queue.results import open_result_store, result_store_url
from service.settings import Settings

__all__ = ["LAYOUT", "RedisBackend", "RedisLayout", "STORE_RESULT_SCRIPT", "store_result"]

logger = logging.getLogger(__name__)

T = TypeVar("T")
POLL_SECONDS = 1.0  # a waiter re-reads its record at least this often (the done channel wakes it sooner)
PRUNE_INTERVAL_SECONDS = 60.0  # directory result store: how often old image files are deleted


def outage_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean "Redis is unreachable or not serving now" (not a bug in a command)."""
    import redis

    return (
        redis.ConnectionError,
        redis.TimeoutError,
        redis.exceptions.ReadOnlyError,
        redis.exceptions.ClusterDownError,
        OSError,
        asyncio.TimeoutError,
    )


class RedisBackend(JobBackend):
    """API side of the Redis deployment: validation, submission, status, events, cancellation."""

    def __init__(self, settings: Settings, layout: RedisLayout = LAYOUT) -> None:
        import redis.asyncio as aioredis

        self.settings = settings
        self.layout = layout
        self.model_name = settings.model_name or "unknown"
        self.redis = aioredis.Redis.from_url(settings.queue, **client_options(settings.redis_timeout, True))
        self._submit = self.redis.register_script(SUBMIT_SCRIPT)
        self._limits: ModelLimits | None = None
        self._unreachable: str | None = "not connected yet"
        self._tasks: list[asyncio.Task[None]] = []
        self._waiters: dict[str, set[asyncio.Event]] = {}
        self.result_store = open_result_store(
            result_store_url(settings), shared=True, public_endpoint=settings.result_public_endpoint
        )
        secret = settings.result_url_secret
        self._url_key: bytes | None = secret.get_secret_value().encode() if secret else None

    # ------------------------------------------------------------------ lifecycle and health

    async def start(self) -> None:
        self._tasks = [asyncio.create_task(self._refresh_loop()), asyncio.create_task(self._listen_loop())]
        if self.result_store.holds_objects:
            self._tasks.append(asyncio.create_task(self._prune_loop()))
            # boto3 loads in the background: /readyz does not wait for it
            self._tasks.append(asyncio.create_task(asyncio.to_thread(self.result_store.warm)))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        with contextlib.suppress(Exception):  # closing a connection to a Redis that is gone
            await asyncio.wait_for(self.redis.aclose(), 2.0)

    async def _op(self, awaitable: Awaitable[T]) -> T:
        """Run one Redis operation within ``--redis-timeout``; an outage becomes ``NotReadyError``."""
        try:
            result = await asyncio.wait_for(awaitable, self.settings.redis_timeout)
        except outage_errors() as error:
            telemetry.REDIS_ERRORS.inc()
            reason = f"redis unreachable: {error or type(error).__name__}"
            if self._unreachable is None:
                logger.warning(reason)
            self._unreachable = reason
            raise NotReadyError(reason) from error
        self._unreachable = None
        return result

    async def _refresh_loop(self) -> None:
        """Keep reachability and the workers' model limits current (``limits()`` is synchronous)."""
        while True:
            with contextlib.suppress(NotReadyError):
                await self._refresh()
            await asyncio.sleep(1.0)

    async def _refresh(self) -> None:
        raw = await self._op(self.redis.get(self.layout.model))
        if raw:
            data = json.loads(raw)
            self._limits = ModelLimits.from_dict(data["limits"])
            if not self.settings.model_name:
                self.model_name = data["name"]

    async def _prune_loop(self) -> None:
        """Delete image files older than the job TTL (directory store; S3 objects expire by a lifecycle rule)."""
        while True:
            await asyncio.sleep(min(PRUNE_INTERVAL_SECONDS, self.settings.job_ttl_seconds / 4))
            try:
                removed = await asyncio.to_thread(self.result_store.prune, self.settings.job_ttl_seconds)
            except OSError:
                logger.exception("pruning the result store failed")
                continue
            telemetry.RESULT_OBJECTS_PRUNED.inc(removed)

    async def url_signing_key(self) -> bytes:
        """``--result-url-secret``, else the key in Redis that the first replica made (one for all replicas)."""
        if self._url_key is None:
            await self._op(self.redis.set(self.layout.url_secret, secrets.token_hex(32), nx=True))
            value = await self._op(self.redis.get(self.layout.url_secret))
            if not value:
                raise NotReadyError("the URL signing key vanished from redis; retry")
            self._url_key = str(value).encode()
        return self._url_key

    async def _listen_loop(self) -> None:
        """Wake waiters when a worker publishes a finished job (a hint; waiters also poll)."""
        while True:
            pubsub = self.redis.pubsub()
            try:
                await asyncio.wait_for(pubsub.subscribe(self.layout.done_channel), self.settings.redis_timeout)
                while True:
                    message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=POLL_SECONDS)
                    if message and message.get("type") == "message":
                        for event in self._waiters.get(message["data"], ()):
                            event.set()
            except asyncio.CancelledError:
                raise
            except Exception:  # the connection went away: waiters poll meanwhile; subscribe again
                await asyncio.sleep(POLL_SECONDS)
            finally:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(pubsub.aclose(), 1.0)

    def limits(self) -> ModelLimits | None:
        return self._limits if self._unreachable is None else None

    async def ready(self) -> tuple[bool, str]:
        try:
            await self._op(self.redis.ping())
            await self._refresh()
        except NotReadyError as error:
            return False, str(error)
        if self._limits is None:
            return False, "no worker has registered a model yet"
        return True, ""

    async def refresh_metrics(self) -> None:
        try:
            telemetry.STREAM_LENGTH.set(await self._op(self.redis.xlen(self.layout.stream)))
            for group in await self._op(self.redis.xinfo_groups(self.layout.stream)):
                if group["name"] == self.layout.group:
                    telemetry.STREAM_PENDING.set(group["pending"])
                    telemetry.STREAM_LAG.set(group.get("lag") or 0)
        except Exception:  # no stream yet, or redis down: leave the gauges as they were
            pass

    # ------------------------------------------------------------------ jobs

    async def submit(self, submission: JobSubmission, idempotency_key: str | None = None) -> JobRecord:
        ttl = self.settings.job_ttl_seconds
        job_id = uuid.uuid4().hex
        record = JobRecord(
            id=job_id,
            status="queued",
            route=submission.route,
            output_format=submission.output_format,
            response_format=submission.response_format,
        )
        keys = [
            self.layout.stream,
            self.layout.job(job_id),
            self.layout.idempotency(idempotency_key) if idempotency_key is not None else "",
        ]
        args: list[str | int] = [
            submission.fingerprint(),
            job_id,
            compact_json(record.to_dict()),
            submission.to_json(),
            ttl,
            self.settings.max_queue,
            self.settings.max_queue * 10 + 1000,
            self.layout.job_prefix,
        ]
        outcome, known_id, known_record = await self._op(self._submit(keys=keys, args=args))
        if outcome == "conflict":
            raise IdempotencyConflict("Idempotency-Key was used with a different request body")
        if outcome == "existing":
            return JobRecord.from_dict(json.loads(known_record))
        if outcome == "full":
            raise QueueFullError(f"{self.settings.max_queue} jobs are waiting")
        return record

    async def get(self, job_id: str) -> JobRecord | None:
        raw = await self._op(self.redis.get(self.layout.job(job_id)))
        return JobRecord.from_dict(json.loads(raw)) if raw else None

    async def wait(self, job_id: str, timeout: float) -> JobRecord:
        """The record once terminal, or as it is at the deadline; ``NotReadyError`` if Redis is away then."""
        deadline = time.monotonic() + timeout
        wake = asyncio.Event()
        self._waiters.setdefault(job_id, set()).add(wake)
        record: JobRecord | None = None
        outage: NotReadyError | None = None
        try:
            while True:
                wake.clear()
                try:
                    record = await self.get(job_id) or record
                    outage = None
                except NotReadyError as error:  # keep waiting: the job runs on without Redis
                    outage = error
                if record is not None and record.terminal:
                    return record
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(wake.wait(), min(POLL_SECONDS, remaining))
        finally:
            waiters = self._waiters.get(job_id)
            if waiters is not None:
                waiters.discard(wake)
                if not waiters:
                    del self._waiters[job_id]
        if outage is not None or record is None:
            raise NotReadyError(
                f"{outage or 'job record unavailable'}; job {job_id} may still finish: GET /v1/jobs/{job_id}"
            )
        return record

    async def events(self, job_id: str) -> AsyncIterator[dict[str, Any]]:
        last = "0-0"
        while True:
            try:
                response = await self._op(self.redis.xread({self.layout.events(job_id): last}, block=1000, count=100))
                if not response:
                    finished = await self._finished_without_events(job_id)
                    if finished is not None:
                        yield {"type": "result", "job": finished.to_dict()}
                        return
            except NotReadyError:  # the stream resumes where it left off once Redis is back
                await asyncio.sleep(POLL_SECONDS)
                continue
            for entry_id, fields in read_entries(response):
                last = entry_id
                event = json.loads(fields["event"])
                yield event
                if event["type"] == "result":
                    return

    async def _finished_without_events(self, job_id: str) -> JobRecord | None:
        """The record of a finished job whose events stream has expired (the result outlives it), else ``None``."""
        if await self._op(self.redis.exists(self.layout.events(job_id))):
            return None
        record = await self.get(job_id)
        return record if record is not None and record.terminal else None

    async def cancel(self, job_id: str) -> JobRecord | None:
        record = await self._request_cancel(job_id)
        if record is None or record.terminal:
            return record
        return await self.wait(job_id, timeout=30.0)

    async def abandon(self, job_id: str) -> None:
        try:
            await self._request_cancel(job_id)
        except NotReadyError:  # the worker's deadline still bounds the job
            logger.warning("could not cancel abandoned job %s: redis unreachable", job_id)

    async def _request_cancel(self, job_id: str) -> JobRecord | None:
        """Raise the cancel flag; a job nobody started is finished here. The record after that."""
        record = await self.get(job_id)
        if record is None or record.terminal:
            return record
        ttl = self.settings.job_ttl_seconds
        await self._op(self.redis.set(self.layout.cancel(job_id), "1", ex=ttl))
        if record.status == "queued":
            # not started: finish it here; a worker that picks it up finds it finished and skips it
            record.status, record.finished_at = "cancelled", time.time()
            await self._op(store_result(self.redis, self.layout, record, ttl))
            return await self.get(job_id)
        return record


async def store_result(redis_client: Any, layout: RedisLayout, record: JobRecord, ttl: int) -> bool:
    """Store a finished record (unless one exists) with its result event and wake-up, atomically."""
    event = compact_json({"type": "result", "job": record.to_dict()})
    stored = await redis_client.eval(
        STORE_RESULT_SCRIPT,
        4,
        layout.job(record.id),
        layout.results_stored,
        layout.events(record.id),
        layout.results_refused,
        compact_json(record.to_dict()),
        ttl,
        event,
        layout.done_channel,
        record.id,
        EVENTS_MAXLEN,
        EVENTS_AFTER_RESULT_SECONDS,
    )
    return bool(stored)
