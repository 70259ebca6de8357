"""What the engine works on: a ``Job`` (one request of ``n`` images), its result and its error."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from service.engine.families import GenerationSpec

if TYPE_CHECKING:  # the queue's wire type; the engine itself never needs the queue
    from service.queue.base import JobSubmission

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
    """A finished job: ``succeeded`` with its images, or ``failed`` / ``cancelled`` (with an error)."""

    status: str  # succeeded | failed | cancelled
    images: list[dict[str, Any]] = field(default_factory=list)
    error: JobError | None = None


@dataclass(eq=False)
class Job:
    """One request: ``n`` images of one spec, plus callbacks for progress and completion.

    ``on_event`` and ``on_done`` are called from the engine's threads (the model thread, or the
    output thread that encodes images); they must only hand the data over, never block.
    """

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
    # set once by the engine at submission: jobs with equal keys share a transformer forward
    key: Hashable = None
    # the scheduler's alone: times a later job with fewer steps was admitted while this one waited
    passed: int = 0
    # the engine's record of the job's life, read by the output processor (images in flight: the step runner's)
    admitted_at: float | None = None
    first_step_at: float | None = None
    batch_sizes: list[int] = field(default_factory=list)
    finished: bool = False
    _finish_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def finish(self, result: JobResult) -> bool:
        """Deliver ``result`` once (later calls are ignored); returns whether this call delivered it."""
        with self._finish_lock:
            if self.finished:
                return False
            self.finished = True
        if self.on_done is not None:
            try:
                self.on_done(result)
            except Exception:  # a broken callback must not take the engine down
                logger.exception("completion callback of job %s failed", self.job_id)
        return True

    def emit(self, event: dict[str, Any]) -> None:
        """Hand a progress event to ``on_event`` (errors logged, never raised)."""
        if self.on_event is not None:
            try:
                self.on_event(event)
            except Exception:
                logger.exception("event callback of job %s failed", self.job_id)


def failed(code: str, message: str, status: int = 500) -> JobResult:
    """A failed result with its error."""
    return JobResult("failed", error=JobError(code, message, status))


def job_from_submission(
    job_id: str,
    submission: JobSubmission,
    submitted_at: float,
    on_event: Callable[[dict[str, Any]], None],
    on_done: Callable[[JobResult], None],
) -> Job:
    """The engine's ``Job`` for a queued submission (in-process backend and Redis worker alike).

    ``submitted_at`` is when the client's request was accepted; the deadline counts from it.
    """
    return Job(
        job_id=job_id,
        spec=submission.spec,
        n=submission.n,
        output_format=submission.output_format,
        route=submission.route,
        submitted_at=submitted_at,
        deadline=submitted_at + submission.timeout_seconds,
        on_event=on_event,
        on_done=on_done,
    )
