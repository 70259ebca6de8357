"""What the engine works on: a ``Job`` (one request of ``n`` images), its result and its error."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any

from service.engine.families import GenerationSpec

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
