"""``JobLedger``: what a worker writes about its jobs in Redis.

Progress events; a job's final record, stored once per job atomically with its result event (the
``STORE_RESULT_SCRIPT``) and only then the stream entry acknowledged; failed attempts (for the
dead-letter message); dead letters. The worker loop (``worker.py``) decides when; this says how.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

import redis

from service import telemetry
from service.engine.engine import Job, JobResult
from service.engine.job import JobError
from service.queue.base import JobRecord
from service.queue.redis_protocol import (
    EVENTS_AFTER_RESULT_SECONDS,
    EVENTS_MAXLEN,
    STORE_RESULT_SCRIPT,
    UPDATE_PROGRESS_SCRIPT,
    RedisLayout,
    as_text,
    compact_json,
)

logger = logging.getLogger("service.worker")


class JobLedger:
    """Job records, events and attempts in Redis for one worker (see the module docstring)."""

    def __init__(
        self, client: redis.Redis, layout: RedisLayout, ttl: int, dead_letter_maxlen: int, model_name: str
    ) -> None:
        self.redis = client
        self.layout = layout
        self.ttl = ttl
        self.dead_letter_maxlen = dead_letter_maxlen
        self.model_name = model_name
        self._store = client.register_script(STORE_RESULT_SCRIPT)
        self._progress = client.register_script(UPDATE_PROGRESS_SCRIPT)

    def publish_event(self, job_id: str, event: dict[str, Any]) -> None:
        pipe = self.redis.pipeline(transaction=False)
        self._progress(keys=[self.layout.job(job_id)], args=["running", event.get("step", 0), self.ttl], client=pipe)
        pipe.xadd(self.layout.events(job_id), {"event": compact_json(event)}, maxlen=EVENTS_MAXLEN, approximate=True)
        pipe.expire(self.layout.events(job_id), self.ttl)
        pipe.execute()

    def settle(self, job_id: str, entry_id: str, result: JobResult, job: Job | None = None) -> None:
        """Store the final record (once per job, atomically with its event), then acknowledge the entry."""
        record = self.record(job_id) or JobRecord(id=job_id, status="queued")
        record.status = result.status
        record.finished_at = time.time()
        record.images = result.images or None
        if result.error is not None:
            record.error = {"code": result.error.code, "message": result.error.message, "status": result.error.status}
        event = compact_json({"type": "result", "job": record.to_dict()})
        stored = self._store(
            keys=[
                self.layout.job(job_id),
                self.layout.results_stored,
                self.layout.events(job_id),
                self.layout.results_refused,
            ],
            args=[
                compact_json(record.to_dict()),
                self.ttl,
                event,
                self.layout.done_channel,
                job_id,
                EVENTS_MAXLEN,
                EVENTS_AFTER_RESULT_SECONDS,
            ],
        )
        if stored:
            telemetry.record_request(
                record.route,
                result,
                self.model_name,
                record.created_at,
                job.admitted_at if job is not None else None,
            )
        self.ack(entry_id)

    def ack(self, entry_id: str) -> None:
        pipe = self.redis.pipeline(transaction=True)
        pipe.xack(self.layout.stream, self.layout.group, entry_id)
        pipe.xdel(self.layout.stream, entry_id)
        pipe.execute()

    def dead_letter(self, entry_id: str, fields: dict[str, str], deliveries: int) -> None:
        job_id = fields.get("job_id") or f"entry-{entry_id}"
        last_error = as_text(self.redis.hget(self.layout.attempts(job_id), "last_error") or "worker lost the job")
        self.redis.xadd(
            self.layout.dead_letter,
            {
                "job_id": job_id,
                "entry_id": entry_id,
                "deliveries": deliveries,
                "error": last_error,
                "submission": fields.get("submission", ""),
            },
            maxlen=self.dead_letter_maxlen,
            approximate=True,
        )
        telemetry.DEAD_LETTERED.inc()
        logger.error("job %s dead-lettered after %d deliveries: %s", job_id, deliveries, last_error)
        message = f"failed after {deliveries - 1} attempts: {last_error}"
        self.settle(job_id, entry_id, JobResult("failed", error=JobError("dead_lettered", message, 500)))

    def note_attempt(self, job_id: str, message: str) -> None:
        key = self.layout.attempts(job_id)
        pipe = self.redis.pipeline(transaction=False)
        pipe.hset(key, mapping={"last_error": message})
        pipe.hincrby(key, "failures", 1)
        pipe.expire(key, self.ttl)
        pipe.execute()

    def record(self, job_id: str) -> JobRecord | None:
        raw = self.redis.get(self.layout.job(job_id))
        return JobRecord.from_dict(json.loads(raw)) if raw else None
