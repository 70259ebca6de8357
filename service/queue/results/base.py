"""The result-store interface and the object-key scheme shared by its implementations."""

from __future__ import annotations

import base64
import re
from abc import ABC, abstractmethod
from typing import Any

EXTENSIONS = {"png": "png", "jpeg": "jpg", "webp": "webp"}
CONTENT_TYPES = {"png": "image/png", "jpg": "image/jpeg", "webp": "image/webp"}
_KEY = re.compile(r"^(?P<job>[0-9A-Za-z_-]{1,64})/(?P<index>\d{1,3})\.(?P<ext>png|jpg|webp)$")


class StoreUnavailable(Exception):
    """The store cannot be reached or did not answer in time (retry later: 503 with Retry-After)."""


class ImageMissing(Exception):
    """The object is not in the store (expired, pruned, or never written)."""


def object_key(job_id: str, index: int, output_format: str) -> str:
    """The key of a job's ``index``-th image: ``<job id>/<index>.<ext>`` (the same on every run of the job)."""
    return f"{job_id}/{index}.{EXTENSIONS[output_format]}"


def parse_object_key(key: str) -> tuple[str, int] | None:
    """(job id, image index) of a key made by ``object_key``; ``None`` for anything else."""
    match = _KEY.match(key)
    return (match["job"], int(match["index"])) if match else None


def content_type(key: str) -> str:
    """The media type of an object by its key's extension."""
    return CONTENT_TYPES.get(key.rpartition(".")[2], "application/octet-stream")


class ResultStore(ABC):
    """Where finished images rest.

    ``keep`` turns the engine's images (base64 in ``b64_json``) into what the job record holds; ``read``
    gives an image's bytes back from a record's entry. Object stores (``holds_objects``) upload the
    images under ``object_key`` and leave only the key in the record, so Redis holds metadata only;
    uploads are idempotent (a job that runs twice writes the same keys with the same bytes).
    """

    scheme: str = ""
    holds_objects: bool = False

    def keep(self, job_id: str, images: list[dict[str, Any]], output_format: str) -> list[dict[str, Any]]:
        """The record entries of a finished job's images (object stores upload them first)."""
        return images

    def read(self, entry: dict[str, Any]) -> bytes:
        """The bytes of one image entry of a record."""
        if "b64_json" in entry:
            return base64.b64decode(entry["b64_json"])
        raise ImageMissing("the record holds no image data")

    def presigned_url(self, key: str, expires_in: int) -> str | None:
        """A URL the store itself serves for ``expires_in`` seconds, or ``None`` (the API serves the image)."""
        return None

    def warm(self) -> None:  # noqa: B027 (optional: stores with nothing to prepare keep this no-op)
        """Prepare what the first use would (clients, imports), off the request path."""

    def prune(self, max_age_seconds: float) -> int:
        """Delete objects older than ``max_age_seconds``; how many (stores that expire by themselves: 0)."""
        return 0

    @abstractmethod
    def describe(self) -> str:
        """The store as ``--result-store`` names it (no credentials)."""


class InlineStore(ResultStore):
    """Images stay inside the job record as base64 (the ``memory`` and ``redis`` stores)."""

    def __init__(self, scheme: str) -> None:
        self.scheme = scheme

    def describe(self) -> str:
        return self.scheme


class ObjectStore(ResultStore):
    """Images are objects under their ``object_key``; the record keeps the key, the size and the stats."""

    holds_objects = True

    @abstractmethod
    def put(self, key: str, data: bytes) -> None:
        """Write an object (overwriting is fine: a key's bytes never change). ``StoreUnavailable`` on outage."""

    @abstractmethod
    def get(self, key: str) -> bytes:
        """An object's bytes: ``ImageMissing`` when absent, ``StoreUnavailable`` on outage."""

    def keep(self, job_id: str, images: list[dict[str, Any]], output_format: str) -> list[dict[str, Any]]:
        kept = []
        for index, image in enumerate(images):
            if "b64_json" not in image:  # already uploaded (a retry after a partial success)
                kept.append(image)
                continue
            data = base64.b64decode(image["b64_json"])
            key = object_key(job_id, index, output_format)
            self.put(key, data)
            entry = {k: v for k, v in image.items() if k != "b64_json"}
            entry.update(key=key, bytes=len(data))
            kept.append(entry)
        return kept

    def read(self, entry: dict[str, Any]) -> bytes:
        if "key" in entry:
            return self.get(entry["key"])
        return super().read(entry)
