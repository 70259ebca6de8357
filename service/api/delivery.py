"""A finished job's images as the client asked for them: inline base64, or URLs (presigned S3, or signed /v1/files)."""

from __future__ import annotations

import asyncio
import base64
from typing import Any

from fastapi import Request

from service.api.deps import backend_of, settings_of
from service.api.errors import APIError
from service.api.signed_urls import signed_path
from service.queue.base import JobRecord, NotReadyError
from service.queue.results import ImageMissing, StoreUnavailable, object_key

RETRY_AFTER = {"Retry-After": "5"}


def store_unavailable(error: Exception) -> APIError:
    """The object store is down or slow: the client must wait (503 with Retry-After)."""
    return APIError(503, "result_store_unavailable", f"the result store is unavailable: {error}", headers=RETRY_AFTER)


def image_missing(job_id: str, error: Exception) -> APIError:
    return APIError(404, "image_not_found", f"an image of job {job_id} is no longer stored ({error})")


async def image_bytes(request: Request, entry: dict[str, Any]) -> bytes:
    """The bytes of one image entry of a record, from the record itself or from the object store."""
    store = backend_of(request).result_store
    if "b64_json" in entry:
        return base64.b64decode(entry["b64_json"])
    return await asyncio.to_thread(store.read, entry)


async def image_url(request: Request, record: JobRecord, index: int, entry: dict[str, Any]) -> str:
    """A URL of the ``index``-th image: presigned by the object store, else signed by this API."""
    backend = backend_of(request)
    ttl = settings_of(request).result_url_ttl_seconds
    key = entry.get("key") or object_key(record.id, index, record.output_format)
    if "key" in entry:
        presigned = backend.result_store.presigned_url(key, ttl)
        if presigned is not None:
            return presigned
    try:
        secret = await backend.url_signing_key()
    except NotReadyError as error:
        raise APIError(503, "not_ready", f"not ready: {error}", headers=RETRY_AFTER) from error
    return str(request.base_url).rstrip("/") + signed_path(secret, key, ttl)


async def deliver_images(request: Request, record: JobRecord) -> list[dict[str, Any]]:
    """Each image with its seed and stats, and ``b64_json`` or ``url`` as the job's ``response_format`` says.

    ``APIError`` 503 (Retry-After) when the object store cannot be read now; 404 when an object is gone.
    """
    delivered = []
    for index, entry in enumerate(record.images or []):
        image: dict[str, Any] = {"seed": entry["seed"], "stats": entry["stats"]}
        try:
            if record.response_format == "url":
                image["url"] = await image_url(request, record, index, entry)
            else:
                image["b64_json"] = base64.b64encode(await image_bytes(request, entry)).decode("ascii")
        except StoreUnavailable as error:
            raise store_unavailable(error) from error
        except ImageMissing as error:
            raise image_missing(record.id, error) from error
        delivered.append(image)
    return delivered
