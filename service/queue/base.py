"""What the API needs from a job backend (in-process engine or Redis Streams), and job records."""

from __future__ import annotations

import hashlib
import json
import time
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass, field, fields
from typing import TYPE_CHECKING, Any

from service.model_limits import GenerationSpec, ModelLimits

if TYPE_CHECKING:
    from service.queue.results import ResultStore

TERMINAL = ("succeeded", "failed", "cancelled")


class QueueFullError(Exception):
    """The queue is at its bound (429)."""


class NotReadyError(Exception):
    """The backend cannot serve now (503 with Retry-After): model loading, queue unreachable, shutting down."""


class IdempotencyConflict(Exception):
    """An Idempotency-Key was reused with a different request body (422)."""


@dataclass
class JobSubmission:
    """Everything a worker needs to run a request."""

    spec: GenerationSpec
    n: int
    output_format: str
    route: str
    timeout_seconds: float
    # hash of the request as the client sent it (before defaults and a random seed are filled in), for
    # Idempotency-Key conflict detection; not sent to workers
    request_fingerprint: str = field(default="", compare=False)
    # how the API hands the images back (b64_json inline, or url); the API's business, not sent to workers
    response_format: str = field(default="b64_json", compare=False)

    def to_json(self) -> str:
        data = asdict(self)
        data.pop("request_fingerprint")
        data.pop("response_format")
        data["spec"]["cache"] = self.spec.cache.to_dict()
        return json.dumps(data, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> JobSubmission:
        from fastcache_core.config import CacheParams

        data = json.loads(text)
        spec = data.pop("spec")
        spec["cache"] = CacheParams.from_dict(spec["cache"])
        return cls(spec=GenerationSpec(**spec), **data)

    def fingerprint(self) -> str:
        """Hash of the request, for Idempotency-Key conflict detection (a retry must send the same body)."""
        return self.request_fingerprint or hashlib.sha256(self.to_json().encode()).hexdigest()


@dataclass
class JobRecord:
    """A job as the API reports it."""

    id: str
    status: str  # queued | running | succeeded | failed | cancelled
    route: str = "jobs"
    output_format: str = "png"
    response_format: str = "b64_json"  # b64_json | url: how the API answers with the images
    created_at: float = field(default_factory=time.time)
    finished_at: float | None = None
    # each image: its seed and stats, and either ``b64_json`` (memory and Redis result stores) or the object
    # ``key`` and its ``bytes`` (directory and S3 stores)
    images: list[dict[str, Any]] | None = None
    error: dict[str, Any] | None = None  # {code, message, status}
    steps_done: int = 0

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> JobRecord:
        known = {f.name for f in fields(cls)}
        # fields this version does not know (a newer replica wrote the record) are ignored, not an error
        return cls(**{k: v for k, v in data.items() if k in known})


class JobBackend(ABC):
    """The API's view of where jobs run."""

    model_name: str
    result_store: ResultStore  # where the finished images rest (``--result-store``)

    @abstractmethod
    async def start(self) -> None: ...

    @abstractmethod
    async def stop(self) -> None:
        """Stop admitting; finish what runs; release resources."""

    @abstractmethod
    def limits(self) -> ModelLimits | None:
        """What the served model accepts (``None`` while unknown: not ready)."""

    @abstractmethod
    async def ready(self) -> tuple[bool, str]:
        """(ready, reason when not)."""

    @abstractmethod
    async def submit(self, submission: JobSubmission, idempotency_key: str | None = None) -> JobRecord: ...

    @abstractmethod
    async def get(self, job_id: str) -> JobRecord | None: ...

    @abstractmethod
    async def wait(self, job_id: str, timeout: float) -> JobRecord:
        """The job once terminal, or as it is when ``timeout`` passes."""

    @abstractmethod
    def events(self, job_id: str) -> AsyncIterator[dict[str, Any]]:
        """Progress events (``{"type": "step", ...}``) then one ``result`` event."""

    @abstractmethod
    async def cancel(self, job_id: str) -> JobRecord | None:
        """Cancel a job and wait (bounded) until it has left the batch; the record after that."""

    @abstractmethod
    async def abandon(self, job_id: str) -> None:
        """The client waiting for the job went away: cancel it without waiting, freeing its batch slot."""

    @abstractmethod
    async def url_signing_key(self) -> bytes:
        """The HMAC key of signed ``/v1/files`` URLs (the same on every replica that serves the same jobs)."""

    async def refresh_metrics(self) -> None:  # noqa: B027 (an optional hook: backends without gauges keep this no-op)
        """Update backend gauges (stream length, pending entries) before a scrape."""
