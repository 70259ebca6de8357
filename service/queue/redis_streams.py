"""The Redis Streams job backend (scale-out): API replicas submit, GPU workers pull as many jobs as
they have free batch slots.

Layout (prefix ``fastcache:``):

* ``jobs`` - the job stream (``XADD``); workers read it through the consumer group ``fastcache-workers``
  (``XREADGROUP COUNT <free slots>``), acknowledge and delete an entry only after its result is
  stored, and reclaim entries of dead workers (``XAUTOCLAIM``). ``jobs:dead`` is the dead-letter stream.
* ``job:<id>`` - the job record (JSON: status, progress, then images or error), with a TTL. The result
  is written by a script that refuses to overwrite a finished record, so a job run twice stores one
  result.
* ``events:<id>`` - per-step progress then the result, as a stream (SSE replays it from the start).
* ``cancel:<id>`` - cancellation flag; ``idem:<key>`` - Idempotency-Key -> (fingerprint, job id).
* ``model`` - what the workers' model accepts (limits), for request validation on the API.
* channel ``done`` - completion wake-up hint (the API also polls: pub/sub alone is lossy).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from dataclasses import dataclass
from typing import Any, AsyncIterator

from service import telemetry
from service.engine.families import ModelLimits
from service.queue.base import IdempotencyConflict, JobBackend, JobRecord, JobSubmission, NotReadyError, QueueFullError
from service.settings import Settings

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RedisLayout:
    """Key names shared by the API backend and the workers."""

    prefix: str = "fastcache:"
    group: str = "fastcache-workers"

    @property
    def stream(self) -> str:
        return f"{self.prefix}jobs"

    @property
    def dead_letter(self) -> str:
        return f"{self.prefix}jobs:dead"

    @property
    def model(self) -> str:
        return f"{self.prefix}model"

    @property
    def done_channel(self) -> str:
        return f"{self.prefix}done"

    @property
    def results_stored(self) -> str:
        return f"{self.prefix}stats:results_stored"

    def job(self, job_id: str) -> str:
        return f"{self.prefix}job:{job_id}"

    def events(self, job_id: str) -> str:
        return f"{self.prefix}events:{job_id}"

    def cancel(self, job_id: str) -> str:
        return f"{self.prefix}cancel:{job_id}"

    def idempotency(self, key: str) -> str:
        return f"{self.prefix}idem:{key}"


LAYOUT = RedisLayout()

# KEYS[1] job record, KEYS[2] results counter; ARGV[1] new record JSON, ARGV[2] TTL seconds.
# Stores a finished record unless one is already there: one result per job id, however often it ran.
STORE_RESULT_SCRIPT = """
local current = redis.call('GET', KEYS[1])
if current then
  local status = cjson.decode(current)['status']
  if status == 'succeeded' or status == 'failed' or status == 'cancelled' then
    return 0
  end
end
redis.call('SET', KEYS[1], ARGV[1], 'EX', tonumber(ARGV[2]))
redis.call('INCR', KEYS[2])
return 1
"""

# KEYS[1] job record; ARGV[1] status, ARGV[2] steps done, ARGV[3] TTL. Progress never overwrites a result.
UPDATE_PROGRESS_SCRIPT = """
local current = redis.call('GET', KEYS[1])
if not current then return 0 end
local record = cjson.decode(current)
if record['status'] == 'succeeded' or record['status'] == 'failed' or record['status'] == 'cancelled' then
  return 0
end
record['status'] = ARGV[1]
record['steps_done'] = tonumber(ARGV[2])
redis.call('SET', KEYS[1], cjson.encode(record), 'EX', tonumber(ARGV[3]))
return 1
"""


class RedisBackend(JobBackend):
    """API side of the Redis deployment: validation, submission, status, events, cancellation."""

    def __init__(self, settings: Settings, layout: RedisLayout = LAYOUT) -> None:
        import redis.asyncio as aioredis

        self.settings = settings
        self.layout = layout
        self.model_name = settings.model_name or "unknown"
        self.redis = aioredis.Redis.from_url(settings.queue, decode_responses=True, socket_timeout=5,
                                             socket_connect_timeout=2, health_check_interval=10)
        self._limits: ModelLimits | None = None
        self._reachable = False
        self._refresher: asyncio.Task | None = None

    async def start(self) -> None:
        self._refresher = asyncio.create_task(self._refresh_loop())

    async def stop(self) -> None:
        if self._refresher is not None:
            self._refresher.cancel()
        await self.redis.aclose()

    async def _refresh_loop(self) -> None:
        """Keep reachability and the workers' model limits current (``limits()`` is synchronous)."""
        while True:
            await self._refresh()
            await asyncio.sleep(1.0)

    async def _refresh(self) -> None:
        try:
            await self.redis.ping()
            raw = await self.redis.get(self.layout.model)
            if raw:
                data = json.loads(raw)
                self._limits = ModelLimits.from_dict(data["limits"])
                if not self.settings.model_name:
                    self.model_name = data["name"]
            self._reachable = True
        except Exception as error:  # ConnectionError, TimeoutError, ...
            if self._reachable:
                logger.warning("redis unreachable: %s", error)
            self._reachable = False

    def limits(self) -> ModelLimits | None:
        return self._limits if self._reachable else None

    async def ready(self) -> tuple[bool, str]:
        await self._refresh()
        if not self._reachable:
            return False, "redis unreachable"
        if self._limits is None:
            return False, "no worker has registered a model yet"
        return True, ""

    async def refresh_metrics(self) -> None:
        try:
            telemetry.STREAM_LENGTH.set(await self.redis.xlen(self.layout.stream))
            for group in await self.redis.xinfo_groups(self.layout.stream):
                if group["name"] == self.layout.group:
                    telemetry.STREAM_PENDING.set(group["pending"])
                    telemetry.STREAM_LAG.set(group.get("lag") or 0)
        except Exception:  # no stream yet, or redis down: leave the gauges as they were
            pass

    async def submit(self, submission: JobSubmission, idempotency_key: str | None = None) -> JobRecord:
        import redis

        ttl = self.settings.job_ttl_seconds
        try:
            fingerprint = submission.fingerprint()
            job_id = uuid.uuid4().hex
            if idempotency_key is not None:
                claimed = await self.redis.set(self.layout.idempotency(idempotency_key),
                                               json.dumps([fingerprint, job_id]), nx=True, ex=ttl)
                if not claimed:
                    known_fingerprint, known_id = json.loads(await self.redis.get(self.layout.idempotency(idempotency_key)))
                    if known_fingerprint != fingerprint:
                        raise IdempotencyConflict("Idempotency-Key was used with a different request body")
                    record = await self.get(known_id)
                    if record is not None:
                        return record
            # the stream holds only unfinished jobs (workers delete what they acknowledge)
            if await self.redis.xlen(self.layout.stream) >= self.settings.max_queue:
                if idempotency_key is not None:
                    await self.redis.delete(self.layout.idempotency(idempotency_key))
                raise QueueFullError(f"{self.settings.max_queue} jobs are waiting")
            record = JobRecord(id=job_id, status="queued", route=submission.route,
                               output_format=submission.output_format)
            await self.redis.set(self.layout.job(job_id), json.dumps(record.to_dict()), ex=ttl)
            await self.redis.xadd(self.layout.stream, {"job_id": job_id, "submission": submission.to_json()},
                                  maxlen=self.settings.max_queue * 10 + 1000, approximate=True)
            return record
        except (redis.ConnectionError, redis.TimeoutError, OSError) as error:
            self._reachable = False
            raise NotReadyError(f"redis unreachable: {error}") from error

    async def get(self, job_id: str) -> JobRecord | None:
        import redis

        try:
            raw = await self.redis.get(self.layout.job(job_id))
        except (redis.ConnectionError, redis.TimeoutError, OSError) as error:
            raise NotReadyError(f"redis unreachable: {error}") from error
        return JobRecord.from_dict(json.loads(raw)) if raw else None

    async def wait(self, job_id: str, timeout: float) -> JobRecord:
        """Poll the record, waking early on the completion channel; survives Redis restarts."""
        deadline = time.monotonic() + timeout
        pubsub = None
        record = None
        while True:
            try:
                if pubsub is None:
                    pubsub = self.redis.pubsub()
                    await pubsub.subscribe(self.layout.done_channel)
                record = await self.get(job_id) or record
                if record is not None and record.terminal:
                    break
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                await pubsub.get_message(ignore_subscribe_messages=True, timeout=min(0.5, remaining))
            except Exception:  # redis went away: retry until the deadline
                pubsub = None
                await asyncio.sleep(0.5)
                if time.monotonic() >= deadline:
                    break
        if pubsub is not None:
            try:
                await pubsub.aclose()
            except Exception:
                pass
        if record is None:
            raise NotReadyError("job record unavailable")
        return record

    async def events(self, job_id: str) -> AsyncIterator[dict[str, Any]]:
        last = "0-0"
        while True:
            try:
                response = await self.redis.xread({self.layout.events(job_id): last}, block=1000, count=100)
            except Exception:
                await asyncio.sleep(0.5)
                continue
            for _, entries in response:
                for entry_id, fields in entries:
                    last = entry_id
                    event = json.loads(fields["event"])
                    yield event
                    if event["type"] == "result":
                        return

    async def cancel(self, job_id: str) -> JobRecord | None:
        record = await self.get(job_id)
        if record is None or record.terminal:
            return record
        ttl = self.settings.job_ttl_seconds
        await self.redis.set(self.layout.cancel(job_id), "1", ex=ttl)
        if record.status == "queued":
            # not started: finish it here; a worker that picks it up finds it finished and skips it
            record.status, record.finished_at = "cancelled", time.time()
            await store_result(self.redis, self.layout, record, ttl)
            return await self.get(job_id)
        return await self.wait(job_id, timeout=30.0)


async def store_result(redis_client: Any, layout: RedisLayout, record: JobRecord, ttl: int) -> bool:
    """Store a finished record (unless one exists), append the result event and wake waiters."""
    stored = await redis_client.eval(STORE_RESULT_SCRIPT, 2, layout.job(record.id), layout.results_stored,
                                     json.dumps(record.to_dict()), ttl)
    if stored:
        await redis_client.xadd(layout.events(record.id), {"event": json.dumps({"type": "result", "job": record.to_dict()})})
        await redis_client.expire(layout.events(record.id), ttl)
        await redis_client.publish(layout.done_channel, record.id)
    return bool(stored)
