"""``fastcache-worker``: runs the engine on one device and feeds it from the Redis job stream.

The main thread talks to Redis; the engine's threads only denoise and encode. With an object store
(``--result-store file://`` or ``s3://``) a finished job's images are first uploaded by the uploader
thread, retried with backoff until the store takes them; only then does the job reach the main thread,
which stores its record (object keys, no image data). Each loop the main thread
1. flushes what the engine produced: progress, then finished jobs (result stored by one script, *then*
   ``XACK`` + ``XDEL``; a job leaves ``in_flight`` only once both happened, so a Redis blip only delays
   it; retryable failures are handed back for another delivery);
2. refreshes the idle time of the entries it still owns (a heartbeat that is not a delivery); an entry
   another worker has reclaimed meanwhile is cancelled here and its result discarded;
3. reclaims entries idle past ``--reclaim-idle-seconds`` (``XAUTOCLAIM``), dead-lettering those
   delivered more than ``--max-deliveries`` times;
4. reads new entries with ``XREADGROUP COUNT <free image slots>``; an entry whose images do not fit
   is handed back at once without costing a delivery, so no worker hoards work;
5. forwards cancellation flags to the engine.

While uploads to the object store fail, steps 3 and 4 pause (no new work whose result could not be
stored either) and ``/readyz`` says why; heartbeats go on, so no other worker reclaims the jobs.

Redis errors are retried by redis-py (``Retry`` with backoff); a longer outage only pauses steps 1-5
while the engine keeps denoising. SIGTERM (or SIGINT) only sets a flag; the loop then stops reading,
hands back what it has not started, lets running jobs finish for up to ``--drain-timeout`` seconds,
stores their results, and exits - also when Redis is unreachable, leaving unstored jobs pending for
another worker.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import socket
import time
import uuid
from dataclasses import dataclass
from typing import Any

import redis

from service import telemetry
from service.engine.engine import Engine, Job, JobResult
from service.engine.job import JobError, job_from_submission
from service.model_limits import InvalidField, validate_spec
from service.queue.base import JobSubmission
from service.queue.redis_protocol import (
    HAND_BACK_IDLE_MS,
    HAND_BACK_SCRIPT,
    HEARTBEAT_SCRIPT,
    LAYOUT,
    RedisLayout,
    read_entries,
)
from service.queue.results import ResultStore, open_result_store, result_store_url
from service.queue.results.upload import Uploader
from service.settings import Settings
from service.worker_ledger import JobLedger

logger = logging.getLogger(__name__)

RETRYABLE_MIN_STATUS = 500  # server-side failures are retried on another delivery; client errors are final
IDLE_BLOCK_MS = 1000  # an idle worker blocks this long on the stream (a new entry wakes it at once)
OUTAGE_PAUSE_SECONDS = 0.5  # after a failed Redis round, collect engine output this long before trying again
STOP_GRACE_SECONDS = 5.0  # after the drain deadline: time for the engine to stop at a step boundary
PRUNE_INTERVAL_SECONDS = 60.0  # directory result store: how often old image files are deleted


def redis_outage_errors() -> tuple[type[BaseException], ...]:
    return (redis.ConnectionError, redis.TimeoutError, redis.exceptions.ReadOnlyError, OSError)


@dataclass
class _InFlight:
    entry_id: str
    job_id: str
    job: Job
    lost: bool = False  # another worker owns the entry now: discard whatever this run produces


class Worker:
    """The Redis side of one worker process."""

    def __init__(
        self,
        settings: Settings,
        engine: Engine,
        client: redis.Redis,
        layout: RedisLayout = LAYOUT,
        result_store: ResultStore | None = None,
    ) -> None:
        self.settings = settings
        self.engine = engine
        self.redis = client
        self.layout = layout
        self.consumer = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.ttl = settings.job_ttl_seconds
        self.outbox: queue.Queue[tuple[str, str, Any]] = queue.Queue()
        self._unflushed: list[tuple[str, str, Any]] = []
        self.in_flight: dict[str, _InFlight] = {}
        self._hand_back: dict[str, bool] = {}  # entry id -> refund the delivery (never started)
        self.stop_requested = False  # set by the signal handler: a plain flag, nothing else happens there
        self.stopping = False
        self.redis_ok = False
        self.redis_error: str | None = "not connected yet"
        self._drain_deadline: float | None = None
        self._stopped_engine = False
        self.ledger = JobLedger(client, layout, self.ttl, settings.dead_letter_maxlen, engine.model_name)
        self._heartbeat_script = self.redis.register_script(HEARTBEAT_SCRIPT)
        self._hand_back_script = self.redis.register_script(HAND_BACK_SCRIPT)
        self._next = {"heartbeat": 0.0, "reclaim": 0.0, "cancellations": 0.0, "register": 0.0, "prune": 0.0}
        self.result_store = result_store or open_result_store(result_store_url(settings), shared=True)
        # object stores: images are uploaded off the main thread (which keeps heartbeats and progress going)
        # before the result is stored in Redis and the entry acknowledged
        self.uploader = Uploader(self.result_store) if self.result_store.holds_objects else None

    # ------------------------------------------------------------------ lifecycle

    def request_stop(self) -> None:
        """Ask the worker to stop (signal-safe: only sets a flag the main loop acts on)."""
        self.stop_requested = True

    def run(self) -> None:
        """Serve until stopped; then drain in-flight jobs (up to the drain timeout) and flush their results."""
        self.engine.start(warmup=True)
        while not self.engine.ready:
            if not self.engine.running:
                raise RuntimeError("the engine failed to start; see the log above")
            if self.stop_requested:
                self.engine.stop_now()
                return
            time.sleep(0.1)
        while True:
            if self.stop_requested and not self.stopping:
                self._begin_stop()
            if self.stopping and self._stop_progress():
                break
            try:
                self._round()
                self._set_redis_ok()
            except redis_outage_errors() as error:
                self._note_outage(error)
                self._collect_engine_output(OUTAGE_PAUSE_SECONDS)
            except redis.ResponseError as error:
                if "NOGROUP" not in str(error):
                    raise
                self._note_outage(error)  # Redis came back empty (no persistence): register again
        logger.info("worker %s stopped", self.consumer)

    def _round(self) -> None:
        if not self.redis_ok or time.monotonic() >= self._next["register"]:
            self._register()
        self._flush()
        self._hand_back_pending()
        self._heartbeat()
        if self.stopping:
            self._collect_engine_output(0.05)
            return
        self._prune_objects()
        if self.uploader is not None and self.uploader.stalled:
            # the object store is down: take no new work (its results could not be stored either); what is
            # running finishes and waits for the store, its entries kept fresh by the heartbeat
            self._collect_engine_output(OUTAGE_PAUSE_SECONDS)
        else:
            self._reclaim()
            self._read()
        self._forward_cancellations()

    def _begin_stop(self) -> None:
        """Stop reading; hand back what has not started; running jobs finish until the drain deadline."""
        self.stopping = True
        self._drain_deadline = time.monotonic() + self.settings.resolved_drain_timeout
        telemetry.READY.set(0)
        for job in self.engine.shutdown(drain=True, timeout=0, fail_waiting=False):
            flight = self.in_flight.pop(job.job_id, None)
            if flight is not None:
                self._hand_back[flight.entry_id] = True
        logger.info(
            "worker %s stopping: %d jobs running, %d handed back",
            self.consumer,
            len(self.in_flight),
            len(self._hand_back),
        )

    def _stop_progress(self) -> bool:
        """While stopping: whether the worker may exit now."""
        uploads_done = self.uploader is None or self.uploader.idle
        settled = (
            not self.engine.running
            and uploads_done
            and self.outbox.empty()
            and not self._unflushed
            and not self._hand_back
        )
        if settled:
            return True
        if self._drain_deadline is None or time.monotonic() < self._drain_deadline:  # set by _begin_stop
            return False
        if not self._stopped_engine:  # out of time: stop at the next step; running jobs are handed back
            logger.warning("drain timeout: stopping %d running jobs", len(self.in_flight))
            self._stopped_engine = True
            self.engine.stop_now()
            self.engine.join(STOP_GRACE_SECONDS)
            return False
        if self.uploader is not None:  # results still waiting for the store stay pending for another worker
            self.uploader.abandon()
        # one last attempt at Redis is over: whatever is not stored stays pending for another worker
        if self._unflushed or not self.outbox.empty() or self._hand_back:
            logger.warning(
                "exiting with %d results unstored and %d entries not handed back (redis: %s); "
                "other workers reclaim them",
                len(self._unflushed) + self.outbox.qsize(),
                len(self._hand_back),
                self.redis_error or "ok",
            )
        return True

    def _set_redis_ok(self) -> None:
        if not self.redis_ok:
            logger.info("worker %s connected to redis", self.consumer)
        self.redis_ok = True
        self.redis_error = None

    def _note_outage(self, error: BaseException) -> None:
        telemetry.REDIS_ERRORS.inc()
        if self.redis_ok:
            logger.warning("redis unavailable (%s); the engine keeps running, results wait", error)
        self.redis_ok = False
        self.redis_error = f"redis unreachable: {error}"

    def _register(self) -> None:
        """(Re)create the consumer group and publish what the model accepts."""
        try:
            self.redis.xgroup_create(self.layout.stream, self.layout.group, id="0", mkstream=True)
        except redis.ResponseError as error:
            if "BUSYGROUP" not in str(error):
                raise
        self.redis.set(
            self.layout.model, json.dumps({"name": self.engine.model_name, "limits": self.engine.limits.to_dict()})
        )
        self._next["register"] = time.monotonic() + 30.0

    def _due(self, name: str, every: float) -> bool:
        now = time.monotonic()
        if now < self._next[name]:
            return False
        self._next[name] = now + every
        return True

    # ------------------------------------------------------------------ reading

    def _read(self) -> None:
        free = self.engine.free_slots
        idle = not self.in_flight and self.outbox.empty() and not self._unflushed
        if free > 0:
            # idle: block on the stream (a new entry wakes us at once); busy: don't block on Redis, so
            # results and progress are flushed as soon as the engine produces them
            response = self.redis.xreadgroup(
                self.layout.group,
                self.consumer,
                {self.layout.stream: ">"},
                count=free,
                block=IDLE_BLOCK_MS if idle else None,
            )
            self._take_all(read_entries(response), free)
            if idle:
                return
        self._collect_engine_output(0.05)

    def _reclaim(self) -> None:
        if not self._due("reclaim", min(1.0, self.settings.reclaim_idle_seconds / 2)):
            return
        free = self.engine.free_slots
        if free <= 0:
            return
        idle_ms = int(self.settings.reclaim_idle_seconds * 1000)
        _, claimed, _ = self.redis.xautoclaim(
            self.layout.stream, self.layout.group, self.consumer, idle_ms, start_id="0-0", count=free
        )
        entries = []
        for entry_id, fields in claimed:
            if fields is None:  # deleted meanwhile
                self.redis.xack(self.layout.stream, self.layout.group, entry_id)
                continue
            pending = self.redis.xpending_range(
                self.layout.stream, self.layout.group, min=entry_id, max=entry_id, count=1
            )
            deliveries = int(pending[0]["times_delivered"]) if pending else 1
            if deliveries > self.settings.max_deliveries:
                self.ledger.dead_letter(entry_id, fields, deliveries)
                continue
            if deliveries > 1:
                telemetry.RECLAIMED.inc()
                logger.info("reclaimed job %s (delivery %d)", fields.get("job_id"), deliveries)
            entries.append((entry_id, fields))
        self._take_all(entries, free)

    def _take_all(self, entries: list[tuple[str, dict[str, str]]], free: int) -> None:
        """Start entries while their images fit in ``free`` slots; hand the rest back at once."""
        for index, (entry_id, fields) in enumerate(entries):
            try:
                free -= self._take(entry_id, fields, free)
            except Exception:
                # Redis failed mid-way: what this worker has not started goes back, at no cost
                for later_id, _ in entries[index:]:
                    self._hand_back.setdefault(later_id, True)
                raise

    def _take(self, entry_id: str, fields: dict[str, str], free: int) -> int:
        """Start one stream entry on the engine, settle it at once, or hand it back; image slots used."""
        job_id = fields.get("job_id") or f"entry-{entry_id}"
        if job_id in self.in_flight:  # already running here (a duplicate entry for the same job)
            return 0
        record = self.ledger.record(job_id)
        if record is not None and record.terminal:
            self.ledger.ack(entry_id)  # ran before (or cancelled while queued): one result per job
            return 0
        try:
            submission = JobSubmission.from_json(fields["submission"])
        except Exception as error:  # unreadable payload: retried, then dead-lettered with this error
            self.ledger.note_attempt(job_id, f"unreadable job payload: {error!r}")
            self._give_back(entry_id, refund=False)
            return 0
        if self.redis.exists(self.layout.cancel(job_id)):
            self.ledger.settle(job_id, entry_id, JobResult("cancelled"))
            return 0
        try:
            validate_spec(self.engine.limits, submission.spec)
        except InvalidField as error:
            self.ledger.settle(job_id, entry_id, JobResult("failed", error=_client_error(error)))
            return 0
        if submission.n > free:  # not enough free image slots here now: another worker (or we, later)
            self._give_back(entry_id, refund=True)
            return 0
        created = record.created_at if record is not None else time.time()
        job = job_from_submission(
            job_id,
            submission,
            created,
            on_event=lambda event: self.outbox.put(("event", job_id, event)),
            on_done=lambda result: self._on_done(job_id, submission.output_format, result),
        )
        try:
            self.engine.submit(job)
        except Exception as error:  # full or stopping: hand it back for another worker at no cost
            logger.info("job %s handed back: %s", job_id, error)
            self._give_back(entry_id, refund=True)
            return 0
        self.in_flight[job_id] = _InFlight(entry_id, job_id, job)
        return submission.n

    def _on_done(self, job_id: str, output_format: str, result: JobResult) -> None:
        """A finished job (on an engine thread): to the uploader first when its images go to an object store."""
        if self.uploader is None or not result.images:
            self.outbox.put(("done", job_id, result))
            return

        def uploaded(images: list[dict[str, Any]]) -> None:
            self.outbox.put(("done", job_id, JobResult(result.status, images, result.error)))

        self.uploader.submit(job_id, result.images, output_format, uploaded)

    def _prune_objects(self) -> None:
        """Delete image files older than the job TTL (directory store) every ``PRUNE_INTERVAL_SECONDS``."""
        if self.uploader is None or not self._due("prune", min(PRUNE_INTERVAL_SECONDS, self.ttl / 4)):
            return
        try:
            telemetry.RESULT_OBJECTS_PRUNED.inc(self.result_store.prune(self.ttl))
        except OSError as error:
            logger.warning("pruning the result store failed: %s", error)

    def _give_back(self, entry_id: str, refund: bool) -> None:
        """Queue an entry for handing back (done at the start of the next round, retried until Redis takes it)."""
        self._hand_back[entry_id] = self._hand_back.get(entry_id, True) and refund

    def _hand_back_pending(self) -> None:
        """Hand entries back to the group (``XCLAIM ... IDLE``), refunding the delivery of unstarted ones."""
        for refund in (True, False):
            ids = [entry_id for entry_id, r in self._hand_back.items() if r is refund]
            if ids:
                self._hand_back_script(
                    keys=[self.layout.stream],
                    args=[self.layout.group, self.consumer, HAND_BACK_IDLE_MS, "1" if refund else "0", *ids],
                )
                telemetry.HANDED_BACK.inc(len(ids))
                for entry_id in ids:
                    del self._hand_back[entry_id]

    # ------------------------------------------------------------------ results

    def _flush(self) -> None:
        """Write what the engine produced, in order; whatever Redis refused is retried next round."""
        self._collect_engine_output(0)
        while self._unflushed:
            kind, job_id, payload = self._unflushed[0]
            flight = self.in_flight.get(job_id)
            if kind == "event":
                if flight is not None and not flight.lost:
                    self.ledger.publish_event(job_id, payload)
            elif flight is not None:
                if not flight.lost:
                    self._finish(flight, payload)
                # only now, with the result stored and acknowledged, does the job leave in_flight
                del self.in_flight[job_id]
            self._unflushed.pop(0)

    def _collect_engine_output(self, seconds: float) -> None:
        """Move what the engine produced to the unflushed list, waiting up to ``seconds`` for the first."""
        try:
            if seconds > 0:
                self._unflushed.append(self.outbox.get(timeout=seconds))
            while True:
                self._unflushed.append(self.outbox.get_nowait())
        except queue.Empty:
            pass

    def _finish(self, flight: _InFlight, result: JobResult) -> None:
        error = result.error
        if (
            result.status == "failed"
            and error is not None
            and error.status >= RETRYABLE_MIN_STATUS
            and error.code != "deadline_exceeded"
        ):
            # a server-side failure (or a drain that ran out of time): another delivery retries it,
            # up to the dead-letter bound
            self._give_back(flight.entry_id, refund=False)
            self.ledger.note_attempt(flight.job_id, f"{error.code}: {error.message}")
            if error.code != "shutting_down":
                logger.warning("job %s failed (%s); handed back for another delivery", flight.job_id, error.message)
            return
        self.ledger.settle(flight.job_id, flight.entry_id, result, flight.job)

    # ------------------------------------------------------------------ housekeeping

    def _heartbeat(self) -> None:
        """Keep owned entries from looking idle; cancel runs whose entry another worker has taken."""
        flights = {f.entry_id: f for f in self.in_flight.values() if not f.lost}
        if not flights or not self._due("heartbeat", min(1.0, self.settings.reclaim_idle_seconds / 4)):
            return
        lost = self._heartbeat_script(keys=[self.layout.stream], args=[self.layout.group, self.consumer, *flights])
        for entry_id in lost or []:
            flight = flights[entry_id]
            flight.lost = True
            self.engine.cancel(flight.job_id)
            logger.warning(
                "job %s: entry %s is no longer ours (reclaimed or settled elsewhere); run cancelled",
                flight.job_id,
                entry_id,
            )

    def _forward_cancellations(self) -> None:
        ids = [job_id for job_id, f in self.in_flight.items() if not f.lost]
        if not ids or not self._due("cancellations", 0.25):
            return
        flags = self.redis.mget([self.layout.cancel(j) for j in ids])
        for job_id, flag in zip(ids, flags, strict=True):
            if flag:
                self.engine.cancel(job_id)


def _client_error(error: InvalidField) -> JobError:
    return JobError("invalid_request", f"{error.field}: {error.message}", 422)
