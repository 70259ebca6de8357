"""Uploading a finished job's images with retries: exponential backoff with jitter, until the store takes them."""

from __future__ import annotations

import logging
import random
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from service import telemetry
from service.queue.results.base import ResultStore, StoreUnavailable

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Backoff:
    """Waits between upload attempts: ``first * 2**attempt`` seconds, at most ``cap``, with jitter."""

    first: float = 0.2
    cap: float = 5.0

    def delay(self, attempt: int) -> float:
        delay: float = min(self.cap, self.first * 2.0 ** min(attempt, 16)) * random.uniform(0.5, 1.0)
        return delay


BACKOFF = Backoff()
Deliver = Callable[[list[dict[str, Any]]], None]


Images = list[dict[str, Any]]


def keep_once(store: ResultStore, job_id: str, images: Images, output_format: str) -> Images:
    """One attempt of ``store.keep``, counted in ``fastcache_result_uploads_total``."""
    try:
        kept = store.keep(job_id, images, output_format)
    except StoreUnavailable:
        telemetry.RESULT_UPLOADS.labels(outcome="error").inc()
        raise
    if store.holds_objects:
        telemetry.RESULT_UPLOADS.labels(outcome="ok").inc()
    return kept


class Uploader:
    """A thread that uploads finished results in order, retrying each until the store takes it.

    ``submit`` never blocks (the engine's threads call it); its ``deliver`` receives the record entries
    once the images are stored. ``abandon`` stops retrying (a worker out of drain time):
    what was not uploaded stays unacknowledged in the stream, and another worker redoes it.
    """

    def __init__(self, store: ResultStore) -> None:
        self.store = store
        self._queue: list[tuple[str, list[dict[str, Any]], str, Deliver]] = []
        self._changed = threading.Condition()
        self._busy = False
        self._abandoned = threading.Event()
        self.last_error: str | None = None
        self._thread = threading.Thread(target=self._run, name="result-uploader", daemon=True)
        self._thread.start()

    def submit(self, job_id: str, images: list[dict[str, Any]], output_format: str, deliver: Deliver) -> None:
        with self._changed:
            self._queue.append((job_id, images, output_format, deliver))
            self._changed.notify()

    @property
    def idle(self) -> bool:
        """Nothing waiting and nothing being uploaded."""
        with self._changed:
            return not self._queue and not self._busy

    @property
    def stalled(self) -> str | None:
        """Why uploads are not getting through (the last attempt failed and work waits), else ``None``."""
        return None if self.idle else self.last_error

    def abandon(self) -> None:
        self._abandoned.set()
        with self._changed:
            self._changed.notify()

    def _run(self) -> None:
        while not self._abandoned.is_set():
            with self._changed:
                while not self._queue and not self._abandoned.is_set():
                    self._changed.wait()
                if self._abandoned.is_set():
                    return
                job_id, images, output_format, deliver = self._queue.pop(0)
                self._busy = True
            try:
                kept = self._upload(job_id, images, output_format)
                if kept is not None:
                    deliver(kept)
            finally:
                with self._changed:
                    self._busy = False

    def _upload(self, job_id: str, images: list[dict[str, Any]], output_format: str) -> list[dict[str, Any]] | None:
        attempt = 0
        while True:
            try:
                kept = keep_once(self.store, job_id, images, output_format)
            except StoreUnavailable as error:
                if self.last_error is None:
                    logger.warning("result store unavailable (%s); retrying with backoff", error)
                self.last_error = f"result store unavailable: {error}"
                if self._abandoned.wait(BACKOFF.delay(attempt)):
                    return None
                attempt += 1
                continue
            if self.last_error is not None:
                logger.info("result store reachable again; job %s uploaded after %d retries", job_id, attempt)
            self.last_error = None
            return kept
