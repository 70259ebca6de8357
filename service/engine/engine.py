"""The serving engine: step-level continuous batching over one pipeline on one device.

The engine is split by role, the way vLLM splits engine, scheduler and worker:

* ``scheduler.Scheduler`` - the policy: which waiting jobs join (admission) and which running batch
  steps next (one batch per compatibility key, one step each per round). Its docstring has the
  fairness bound.
* ``step_runner.StepRunner`` - the model work: preparing a job, one batched denoising step, decoding,
  each isolated per job.
* ``outputs.OutputProcessor`` - encoding images and delivering results, on its own thread.
* ``Engine`` (here) - the loop that ties them together on the model thread, and the thread-safe API
  (``submit``, ``cancel``, ``shutdown``) the queues use.

One thread owns the model. At every step boundary it asks the scheduler for its decision
(``SchedulerOutput``: which jobs join, which are refused, which leave, which group steps) and acts on
it: it drops cancelled and expired jobs, prepares the jobs that join when a round starts, runs one
transformer forward for the group whose turn it is (each image at its own timestep, with its own
scheduler, seed, guidance scale and cache settings) and hands finished jobs to the output processor.
FastCache decides per image, so an image does not depend on who shares its batch.
"""

from __future__ import annotations

import logging
import threading
import time

import torch

from fastcache_core import FastCache, FastCacheConfig, apply_fastcache
from service import telemetry
from service.engine.families import FamilyRunner, GenerationSpec, ModelLimits
from service.engine.job import Job, JobError, JobResult, NotAccepting, QueueFull, failed
from service.engine.outputs import OutputProcessor, encode_image
from service.engine.scheduler import LeaveReason, Scheduler
from service.engine.step_runner import StepRunner

__all__ = ["Engine", "Job", "JobError", "JobResult", "NotAccepting", "QueueFull", "encode_image"]

logger = logging.getLogger(__name__)

IDLE_POLL_SECONDS = 0.5


def leave_result(job: Job, reason: LeaveReason) -> JobResult:
    """The result of a job the scheduler took out (``job`` says whether it was still waiting)."""
    if reason == "cancelled":
        return JobResult("cancelled")
    where = "ran" if job.admitted_at is not None else "waited"
    return failed("deadline_exceeded", f"the request {where} past its deadline", 504)


class Engine:
    """Continuous batching of ``Job``s over one ``FamilyRunner`` with FastCache attached."""

    def __init__(
        self,
        runner: FamilyRunner,
        model_name: str,
        max_batch_size: int = 8,
        max_queue: int = 64,
        cache_config: FastCacheConfig | None = None,
        idle_release_seconds: float | None = 60.0,
    ) -> None:
        self.runner = runner
        self.model_name = model_name
        self.cache: FastCache = apply_fastcache(runner.transformer, cache_config or FastCacheConfig())
        self.limits: ModelLimits = runner.limits()
        self.scheduler = Scheduler(max_batch_size, max_queue)
        self.steps = StepRunner(runner, self.cache)
        self.outputs = OutputProcessor(model_name)
        self.idle_release_seconds = idle_release_seconds
        self.memory_released_bytes = 0
        self._lock = threading.Condition()
        self._thread: threading.Thread | None = None
        self._accepting = False
        self._stop = False
        self._drain = False
        self.ready = False
        self.startup_error: str | None = None
        self.steps_run = 0

    # ------------------------------------------------------------------ control

    @property
    def max_batch_size(self) -> int:
        return self.scheduler.max_batch_size

    @property
    def max_queue(self) -> int:
        return self.scheduler.max_queue

    @max_queue.setter
    def max_queue(self, value: int) -> None:
        self.scheduler.max_queue = value

    @property
    def started(self) -> bool:
        return self._thread is not None

    def start(self, warmup: bool = True) -> None:
        """Start the model thread; with ``warmup`` run one short generation first (``ready`` after it)."""
        self._thread = threading.Thread(target=self._run, args=(warmup,), name=f"engine-{self.model_name}", daemon=True)
        self._thread.start()

    def shutdown(self, drain: bool = True, timeout: float | None = None, fail_waiting: bool = True) -> list[Job]:
        """Stop admitting; with ``drain`` finish in-flight jobs first, else stop at the next step.

        Waiting jobs fail with 503, or with ``fail_waiting=False`` are returned untouched (a Redis worker
        hands them back for another worker). Blocks until the loop ends or ``timeout`` (0: not at all).
        """
        with self._lock:
            self._accepting = False
            self._drain = drain
            waiting = self.scheduler.take_waiting()
            if not drain:
                self._stop = True
            self._lock.notify_all()
        telemetry.QUEUE_DEPTH.labels(model=self.model_name).set(0)
        if fail_waiting:
            for job in waiting:
                job.finish(failed("shutting_down", "the server is shutting down", 503))
        if self._thread is not None and timeout != 0:
            self._thread.join(timeout)
        return [] if fail_waiting else waiting

    def stop_now(self) -> None:
        """Stop at the next step boundary (a drain that ran out of time); running jobs fail with 503."""
        with self._lock:
            self._accepting = False
            self._stop = True
            self._lock.notify_all()

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the model thread to end; whether it has."""
        if self._thread is not None:
            self._thread.join(timeout)
        return not self.running

    @property
    def running(self) -> bool:
        """Whether the model thread is still alive (draining counts)."""
        return self._thread is not None and self._thread.is_alive()

    @property
    def free_slots(self) -> int:
        """Images that could join the batch now, minus those already waiting."""
        with self._lock:
            return self.scheduler.free_slots if self._accepting else 0

    @property
    def queue_depth(self) -> int:
        with self._lock:
            return len(self.scheduler.waiting)

    @property
    def in_flight(self) -> int:
        with self._lock:
            return len(self.scheduler.running())

    def submit(self, job: Job) -> None:
        """Queue a job; raises ``NotAccepting`` before warm-up or during shutdown, ``QueueFull`` at the bound."""
        job.key = self.steps.compat_key(job)
        with self._lock:
            if not self._accepting:
                raise NotAccepting("the model is not ready" if not self.ready else "the server is shutting down")
            self.scheduler.enqueue(job)
            telemetry.QUEUE_DEPTH.labels(model=self.model_name).set(len(self.scheduler.waiting))
            self._lock.notify_all()

    def cancel(self, job_id: str) -> bool:
        """Cancel a waiting or running job; it leaves at the next step boundary, freeing its slots."""
        with self._lock:
            job = self.scheduler.find(job_id)
            if job is None or job.finished:
                return False
            job.cancelled = True
            self._lock.notify_all()
            return True

    # ------------------------------------------------------------------ the loop

    def _run(self, warmup: bool) -> None:
        try:
            if warmup:
                self._warmup()
        except Exception as error:  # a model that cannot run one step must not look ready
            logger.exception("engine warm-up failed")
            self.startup_error = f"warm-up failed: {error}"
            self.outputs.close()
            return
        with self._lock:
            self.ready = True
            self._accepting = not self._drain and not self._stop
        idle_since: float | None = None
        try:
            while True:
                with self._lock:
                    dropped = [(job, leave_result(job, reason)) for job, reason in self._drop_waiting_locked()]
                    busy = bool(self.scheduler.running() or self.scheduler.waiting)
                    stop = self._stop or (self._drain and not busy)
                for job, result in dropped:
                    job.finish(result)
                if stop:
                    break
                if not busy:
                    idle_since = idle_since or time.monotonic()
                    self._idle(idle_since)
                    continue
                idle_since = None
                try:
                    self._iteration()
                except Exception as error:  # a bug in the loop itself: fail what runs rather than hang it
                    logger.exception("engine loop error")
                    for job in self._running():
                        self._leave(job, failed("engine_error", str(error), 500))
        finally:
            for job in self._running():  # stopped without draining
                self._leave(job, failed("shutting_down", "the server stopped before the job finished", 503))
            self.outputs.close()
            self.ready = False

    def _warmup(self) -> None:
        limits = self.limits
        prompt = "0" if limits.family == "dit" else "warm-up"
        # the smallest size: proves the model runs end to end without paying for a full-size image
        self.steps.warmup(
            GenerationSpec(
                prompt,
                None,
                2,
                limits.default_guidance_scale,
                0,
                limits.min_size,
                limits.min_size,
                self.cache.default_params,
            )
        )

    def _idle(self, idle_since: float) -> None:
        """Nothing to do: release pooled cache memory once idle long enough, then wait for work."""
        timeout = IDLE_POLL_SECONDS
        if self.idle_release_seconds is not None:
            remaining = idle_since + self.idle_release_seconds - time.monotonic()
            if remaining <= 0:
                released = self.cache.release_idle_memory()
                if released:
                    if str(self.runner.device).startswith("cuda"):
                        torch.cuda.empty_cache()
                    self.memory_released_bytes += released
                    logger.info("idle: released %d bytes of cached activations", released)
            else:
                timeout = min(timeout, remaining)
        with self._lock:
            if not (self.scheduler.waiting or self._stop or self._drain):
                self._lock.wait(timeout=timeout)

    def _iteration(self) -> None:
        """One step boundary: act on the scheduler's decision (refuse, prepare, retire, step)."""
        with self._lock:
            decision = self.scheduler.schedule(time.time())
            telemetry.QUEUE_DEPTH.labels(model=self.model_name).set(len(self.scheduler.waiting))
            telemetry.IN_FLIGHT.labels(model=self.model_name).set(len(self.scheduler.running()))
            telemetry.RUNNING_GROUPS.labels(model=self.model_name).set(len(self.scheduler.groups))
        for job in decision.refused:
            job.finish(
                failed("invalid_n", f"n={job.n} exceeds this worker's max batch size {self.max_batch_size}", 422)
            )
        leaving = {id(job) for job, _ in decision.leaving}
        unprepared: set[int] = set()
        for job in decision.joined:
            job.admitted_at = decision.now
            if id(job) in leaving:  # cancelled or expired as it joined: it leaves below, unprepared
                continue
            error = self.steps.prepare(job)
            if error is not None:
                unprepared.add(id(job))
                self._leave(job, JobResult("failed", error=error))
        for job, reason in decision.leaving:
            self._leave(job, leave_result(job, reason), scheduled=True)
        group = [job for job in decision.group if id(job) not in unprepared]
        if group:
            self._step(group)

    def _drop_waiting_locked(self) -> list[tuple[Job, LeaveReason]]:
        dropped = self.scheduler.drop_waiting(time.time())
        if dropped:
            telemetry.QUEUE_DEPTH.labels(model=self.model_name).set(len(self.scheduler.waiting))
        return dropped

    def _step(self, group: list[Job]) -> None:
        start = time.perf_counter()
        errors = self.steps.step(group)
        duration = time.perf_counter() - start
        size = sum(job.n for job in group)
        self.steps_run += 1
        telemetry.STEP_DURATION.labels(model=self.model_name).observe(duration)
        telemetry.BATCH_SIZE.labels(model=self.model_name).observe(size)
        now = time.time()
        for job in group:
            error = errors.get(job.job_id)
            if error is not None:
                self._leave(job, JobResult("failed", error=error))
                continue
            job.first_step_at = job.first_step_at or (now - duration)
            job.batch_sizes.append(size)
            job.emit({"type": "step", "step": self.steps.steps_done(job), "steps": job.spec.steps, "batch_size": size})
            if self.steps.done_denoising(job):
                self._complete(job)

    def _complete(self, job: Job) -> None:
        """Decode on the model thread; encoding and delivery go to the output processor."""
        try:
            images = self.steps.decode(job)
        except Exception as error:
            logger.exception("decoding job %s failed", job.job_id)
            self._leave(job, failed("decode_failed", f"decoding the image failed: {error}", 500))
            return
        seeds = self.steps.seeds(job)
        stats = self.steps.release(job)
        self._remove(job)
        self.outputs.submit(job, images, seeds, stats)

    def _leave(self, job: Job, result: JobResult, scheduled: bool = False) -> None:
        """The job leaves the batch with ``result``; ``scheduled``: the scheduler already took it out."""
        self.steps.release(job)
        if not scheduled:
            self._remove(job)
        job.finish(result)

    def _remove(self, job: Job) -> None:
        with self._lock:
            self.scheduler.remove(job)
            telemetry.IN_FLIGHT.labels(model=self.model_name).set(len(self.scheduler.running()))

    def _running(self) -> list[Job]:
        with self._lock:
            return self.scheduler.running()
