"""The serving engine: step-level continuous batching over one pipeline on one device.

One thread owns the model. At every denoising step it retires finished, cancelled and expired jobs,
admits compatible waiting jobs (same resolution and model, FIFO without overtaking), runs one
transformer forward for every in-flight image (each at its own timestep, with its own scheduler,
seed, guidance scale and cache settings) and steps each image's scheduler. FastCache decides per
image, so an image does not depend on who shares its batch.

Jobs come from ``submit`` (the in-process queue) or from a feeder such as the Redis worker; results
and per-step progress go back through the job's callbacks.
"""

from __future__ import annotations

import base64
import io
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from fastcache_core import FastCache, FastCacheConfig, apply_fastcache
from service.engine.families import FamilyRunner, GenerationSpec, ModelLimits, Sample
from service.engine.image_stats import ImageStats
from service import telemetry

logger = logging.getLogger(__name__)


class QueueFull(Exception):
    """The waiting queue is at its bound; the caller should retry later."""


class NotAccepting(Exception):
    """The engine is not ready or is shutting down."""


@dataclass
class JobError:
    """Why a job failed: a stable code, a message and the HTTP status it maps to."""

    code: str
    message: str
    status: int = 500


@dataclass
class JobResult:
    status: str  # succeeded | failed | cancelled
    images: list[dict[str, Any]] = field(default_factory=list)
    error: JobError | None = None


@dataclass
class Job:
    """One request: ``n`` images of one spec, plus callbacks for progress and completion."""

    job_id: str
    spec: GenerationSpec
    n: int = 1
    output_format: str = "png"
    route: str = "generate"
    submitted_at: float = field(default_factory=time.time)
    deadline: float | None = None
    on_event: Callable[[dict[str, Any]], None] | None = None
    on_done: Callable[[JobResult], None] | None = None
    cancelled: bool = False
    # filled by the engine
    samples: list[Sample] = field(default_factory=list)
    admitted_at: float | None = None
    first_step_at: float | None = None
    batch_sizes: list[int] = field(default_factory=list)
    finished: bool = False


class Engine:
    """Continuous batching of ``Job``s over one ``FamilyRunner`` with FastCache attached."""

    def __init__(
        self,
        runner: FamilyRunner,
        model_name: str,
        max_batch_size: int = 8,
        max_queue: int = 64,
        cache_config: FastCacheConfig | None = None,
    ) -> None:
        self.runner = runner
        self.model_name = model_name
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self.cache: FastCache = apply_fastcache(runner.transformer, cache_config or FastCacheConfig())
        self.limits: ModelLimits = runner.limits()
        self._waiting: deque[Job] = deque()
        self._active: list[Job] = []
        self._lock = threading.Condition()
        self._thread: threading.Thread | None = None
        self._accepting = False
        self._stop = False
        self._drain = False
        self.ready = False
        self.startup_error: str | None = None
        self.steps_run = 0

    # ------------------------------------------------------------------ control

    def start(self, warmup: bool = True) -> None:
        """Start the model thread; with ``warmup`` run one short generation first (``ready`` after it)."""
        self._thread = threading.Thread(target=self._run, args=(warmup,), name=f"engine-{self.model_name}", daemon=True)
        self._thread.start()

    def shutdown(self, drain: bool = True, timeout: float | None = None, fail_waiting: bool = True) -> list[Job]:
        """Stop admitting; with ``drain`` finish in-flight jobs first, else stop at the next step.

        Waiting jobs fail with 503, or with ``fail_waiting=False`` are returned untouched (a Redis worker
        leaves them unacknowledged for another worker). Blocks until the loop ends or ``timeout``.
        """
        with self._lock:
            self._accepting = False
            self._drain = drain
            waiting = list(self._waiting)
            self._waiting.clear()
            if not drain:
                self._stop = True
            self._lock.notify_all()
        if fail_waiting:
            for job in waiting:
                self._finish(job, JobResult("failed", error=JobError("shutting_down", "the server is shutting down", 503)))
        if self._thread is not None and timeout != 0:
            self._thread.join(timeout)
        return [] if fail_waiting else waiting

    @property
    def running(self) -> bool:
        """Whether the model thread is still alive (draining counts)."""
        return self._thread is not None and self._thread.is_alive()

    @property
    def free_slots(self) -> int:
        """Images that could join the batch now, minus those already waiting."""
        with self._lock:
            in_flight = sum(j.n for j in self._active) + sum(j.n for j in self._waiting)
            return max(0, self.max_batch_size - in_flight)

    @property
    def queue_depth(self) -> int:
        with self._lock:
            return len(self._waiting)

    @property
    def in_flight(self) -> int:
        with self._lock:
            return len(self._active)

    def submit(self, job: Job) -> None:
        """Queue a job; raises ``NotAccepting`` before warm-up or during shutdown, ``QueueFull`` at the bound."""
        with self._lock:
            if not self._accepting:
                raise NotAccepting("the model is not ready" if not self.ready else "the server is shutting down")
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(f"queue is full ({self.max_queue} waiting)")
            self._waiting.append(job)
            telemetry.QUEUE_DEPTH.labels(model=self.model_name).set(len(self._waiting))
            self._lock.notify_all()

    def cancel(self, job_id: str) -> bool:
        """Cancel a waiting or running job; it leaves the batch at the next step boundary."""
        with self._lock:
            for job in list(self._waiting) + self._active:
                if job.job_id == job_id and not job.finished:
                    job.cancelled = True
                    self._lock.notify_all()
                    return True
        return False

    # ------------------------------------------------------------------ the loop

    def _run(self, warmup: bool) -> None:
        try:
            if warmup:
                self._warmup()
        except Exception as error:  # a model that cannot run one step must not look ready
            logger.exception("engine warm-up failed")
            self.startup_error = f"warm-up failed: {error}"
            return
        with self._lock:
            self.ready = True
            self._accepting = not self._drain and not self._stop
        while True:
            with self._lock:
                self._retire_waiting_locked()
                if self._stop or (self._drain and not self._active):
                    break
                if not self._active and not self._waiting:
                    self._lock.wait(timeout=0.5)
                    continue
            try:
                self._retire()
                self._admit()
                if self._active:
                    self._step()
            except Exception as error:  # keep serving: fail what was in flight rather than hang it
                logger.exception("engine loop error")
                for job in list(self._active):
                    self._leave(job, JobResult("failed", error=JobError("engine_error", str(error), 500)))
        self.ready = False

    def _warmup(self) -> None:
        limits = self.limits
        prompt = "0" if limits.family == "dit" else "warm-up"
        # the smallest size: proves the model runs end to end without paying for a full-size image
        spec = GenerationSpec(prompt, None, 2, limits.default_guidance_scale, 0, limits.min_size,
                              limits.min_size, self.cache.default_params)
        self.cache.add_sample("__warmup__", spec.cache, spec.steps)
        try:
            sample = self.runner.prepare("__warmup__", spec)
            while not sample.done:
                self.runner.step(sample, self.runner.forward([sample], self.cache)[0])
            self.runner.decode([sample])
        finally:
            self.cache.remove_sample("__warmup__")

    def _retire_waiting_locked(self) -> None:
        now = time.time()
        for job in list(self._waiting):
            if job.cancelled:
                self._waiting.remove(job)
                self._finish(job, JobResult("cancelled"))
            elif job.deadline is not None and now > job.deadline:
                self._waiting.remove(job)
                self._finish(job, JobResult("failed", error=JobError(
                    "deadline_exceeded", "the request waited past its deadline", 504)))
        telemetry.QUEUE_DEPTH.labels(model=self.model_name).set(len(self._waiting))

    def _retire(self) -> None:
        """Remove cancelled and expired jobs from the batch, freeing their slots."""
        now = time.time()
        for job in list(self._active):
            if job.cancelled:
                self._leave(job, JobResult("cancelled"))
            elif job.deadline is not None and now > job.deadline:
                self._leave(job, JobResult("failed", error=JobError(
                    "deadline_exceeded", "the request ran past its deadline", 504)))

    def _admit(self) -> None:
        """Admit waiting jobs in FIFO order while they fit and match the running batch's key."""
        with self._lock:
            used = sum(j.n for j in self._active)
            key = self.runner.compat_key(self._active[0].spec) if self._active else None
            admitted = []
            while self._waiting:
                job = self._waiting[0]
                job_key = self.runner.compat_key(job.spec)
                if key is not None and job_key != key:
                    break  # no overtaking: the batch drains, then this job's key runs
                if job.n > self.max_batch_size:  # can never fit (a feeder that skipped validation)
                    self._waiting.popleft()
                    self._finish(job, JobResult("failed", error=JobError(
                        "invalid_n", f"n={job.n} exceeds this worker's max batch size {self.max_batch_size}", 422)))
                    continue
                if used + job.n > self.max_batch_size:
                    break
                self._waiting.popleft()
                key = job_key
                used += job.n
                admitted.append(job)
            telemetry.QUEUE_DEPTH.labels(model=self.model_name).set(len(self._waiting))
        for job in admitted:
            try:
                self._prepare(job)
            except Exception as error:  # bad input the API could not see, or encoder failure
                logger.exception("preparing job %s failed", job.job_id)
                for s in job.samples:
                    self.cache.remove_sample(s.sample_id)
                self._finish(job, JobResult("failed", error=JobError("prepare_failed", str(error), 500)))
                continue
            with self._lock:
                self._active.append(job)
        telemetry.IN_FLIGHT.labels(model=self.model_name).set(len(self._active))

    def _prepare(self, job: Job) -> None:
        job.admitted_at = time.time()
        for i in range(job.n):
            spec = GenerationSpec(**{**job.spec.__dict__, "seed": job.spec.seed + i})
            sample_id = (job.job_id, i)
            self.cache.add_sample(sample_id, spec.cache, spec.steps)
            job.samples.append(self.runner.prepare(sample_id, spec))

    def _step(self) -> None:
        samples = [s for job in self._active for s in job.samples]
        start = time.perf_counter()
        try:
            outputs = self.runner.forward(samples, self.cache)
            for sample, output in zip(samples, outputs):
                self.runner.step(sample, output)
        except Exception as error:
            logger.exception("denoising step failed; failing the %d jobs in the batch", len(self._active))
            for job in list(self._active):
                self._leave(job, JobResult("failed", error=JobError("step_failed", f"model step failed: {error}", 500)))
            return
        duration = time.perf_counter() - start
        self.steps_run += 1
        telemetry.STEP_DURATION.labels(model=self.model_name).observe(duration)
        telemetry.BATCH_SIZE.labels(model=self.model_name).observe(len(samples))
        now = time.time()
        for job in list(self._active):
            job.first_step_at = job.first_step_at or (now - duration)
            job.batch_sizes.append(len(samples))
            step = job.samples[0].step
            if job.on_event is not None:
                job.on_event({"type": "step", "step": step, "steps": job.spec.steps, "batch_size": len(samples)})
            if all(s.done for s in job.samples):
                self._complete(job)

    def _complete(self, job: Job) -> None:
        try:
            images = self.runner.decode(job.samples)
            encoded = [encode_image(image, job.output_format) for image in images]
        except Exception as error:
            logger.exception("decoding job %s failed", job.job_id)
            self._leave(job, JobResult("failed", error=JobError("decode_failed", str(error), 500)))
            return
        done = time.time()
        results = []
        for sample, data in zip(job.samples, encoded):
            stats = self.cache.remove_sample(sample.sample_id)
            results.append({
                "b64_json": data,
                "seed": sample.spec.seed,
                "stats": ImageStats.from_sample(
                    stats,
                    queue_wait_seconds=(job.admitted_at or done) - job.submitted_at,
                    compute_seconds=done - (job.first_step_at or done),
                    batch_sizes=job.batch_sizes,
                ).model_dump(),
            })
            telemetry.record_image(self.model_name, stats)
        job.samples = []
        self._remove_active(job)
        self._finish(job, JobResult("succeeded", images=results))

    def _leave(self, job: Job, result: JobResult) -> None:
        for sample in job.samples:
            try:
                self.cache.remove_sample(sample.sample_id)
            except KeyError:
                pass
        job.samples = []
        self._remove_active(job)
        self._finish(job, result)

    def _remove_active(self, job: Job) -> None:
        with self._lock:
            if job in self._active:
                self._active.remove(job)
        telemetry.IN_FLIGHT.labels(model=self.model_name).set(len(self._active))

    def _finish(self, job: Job, result: JobResult) -> None:
        if job.finished:
            return
        job.finished = True
        if job.on_done is not None:
            try:
                job.on_done(result)
            except Exception:
                logger.exception("completion callback of job %s failed", job.job_id)


def encode_image(image: Any, output_format: str) -> str:
    """Base64 of the image in ``png``, ``jpeg`` or ``webp``."""
    buffer = io.BytesIO()
    fmt = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}[output_format]
    if fmt == "JPEG" and image.mode not in ("RGB", "L"):
        image = image.convert("RGB")
    image.save(buffer, format=fmt)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def load_pipeline(model: str, device: str, dtype: str) -> Any:
    """Load a diffusers pipeline from a local directory or hub id (``from_pretrained``), on ``device``."""
    from diffusers import DiffusionPipeline

    torch_dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[dtype]
    # components saved as absent (e.g. SD3 without its T5 encoder) must be passed as None explicitly
    index = DiffusionPipeline.load_config(model)
    absent = {name: None for name, value in index.items()
              if isinstance(value, (list, tuple)) and len(value) == 2 and value[0] is None and value[1] is None}
    pipe = DiffusionPipeline.from_pretrained(model, dtype=torch_dtype, **absent)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)
