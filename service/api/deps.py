"""Shared route plumbing: the backend, API-key auth, and turning a request into a job submission."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import secrets

from fastapi import Request

from fastcache_core.config import CacheParams
from service import telemetry
from service.api.errors import APIError, ClientDisconnected
from service.api.schemas import GenerationFields
from service.model_limits import GenerationSpec, InvalidField, validate_spec
from service.queue.base import (
    IdempotencyConflict,
    JobBackend,
    JobRecord,
    JobSubmission,
    NotReadyError,
    QueueFullError,
)
from service.settings import Settings


def backend_of(request: Request) -> JobBackend:
    backend: JobBackend = request.app.state.backend
    return backend


def settings_of(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


async def require_api_key(request: Request) -> None:
    """Bearer-token check (constant-time) when the server has an API key."""
    key = settings_of(request).api_key
    if key is None:
        return
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.encode(), key.get_secret_value().encode()):
        telemetry.REJECTED.labels(reason="unauthorized").inc()
        raise APIError(
            401,
            "unauthorized",
            "missing or wrong API key (Authorization: Bearer <key>)",
            headers={"WWW-Authenticate": "Bearer"},
        )


def build_submission(
    request: Request,
    body: GenerationFields,
    *,
    prompt: str,
    n: int,
    width: int | None,
    height: int | None,
    output_format: str,
    route: str,
    response_format: str = "b64_json",
) -> JobSubmission:
    """Resolve defaults against the served model and validate what only the model can judge."""
    settings = settings_of(request)
    limits = backend_of(request).limits()
    if limits is None:
        telemetry.REJECTED.labels(reason="not_ready").inc()
        raise APIError(
            503,
            "not_ready",
            "the model is not loaded yet or the queue is unreachable (see /readyz)",
            headers={"Retry-After": "5"},
        )
    if n > settings.max_batch_size:
        raise invalid("n", f"n must be at most the server's max batch size {settings.max_batch_size}")
    spec = GenerationSpec(
        prompt=prompt,
        negative_prompt=body.negative_prompt,
        steps=body.steps or limits.default_steps,
        guidance_scale=limits.default_guidance_scale if body.guidance_scale is None else body.guidance_scale,
        seed=secrets.randbelow(2**31) if body.seed is None else body.seed,
        width=width or limits.default_width,
        height=height or limits.default_height,
        cache=CacheParams(**body.cache.model_dump()),
    )
    try:
        validate_spec(limits, spec)
    except InvalidField as error:
        raise invalid(error.field, error.message) from error
    timeout = body.timeout_seconds or settings.request_timeout
    # what the client sent, not the resolved spec: a retry without a seed must match its first try
    fingerprint = hashlib.sha256(f"{route}\n{body.model_dump_json()}".encode()).hexdigest()
    return JobSubmission(
        spec=spec,
        n=n,
        output_format=output_format,
        route=route,
        timeout_seconds=timeout,
        request_fingerprint=fingerprint,
        response_format=response_format,
    )


def invalid(field: str, message: str) -> APIError:
    telemetry.REJECTED.labels(reason="invalid").inc()
    return APIError(422, "invalid_request", f"{field}: {message}", field=field)


async def submit(request: Request, submission: JobSubmission) -> JobRecord:
    """Queue a submission, mapping backend refusals to 429 / 503 / 422 with Retry-After."""
    key = request.headers.get("idempotency-key")
    if key is not None and not 1 <= len(key) <= 255:
        raise invalid("Idempotency-Key", "must be 1 to 255 characters")
    try:
        return await backend_of(request).submit(submission, idempotency_key=key)
    except QueueFullError as error:
        telemetry.REJECTED.labels(reason="queue_full").inc()
        raise APIError(
            429, "queue_full", f"the queue is full, retry later ({error})", headers={"Retry-After": "2"}
        ) from error
    except NotReadyError as error:
        telemetry.REJECTED.labels(reason="not_ready").inc()
        raise APIError(503, "not_ready", f"not ready: {error}", headers={"Retry-After": "5"}) from error
    except IdempotencyConflict as error:
        raise invalid("Idempotency-Key", str(error)) from error


def failure(record: JobRecord) -> APIError:
    """The API error of a failed or cancelled job."""
    if record.status == "cancelled":
        return APIError(409, "cancelled", "the job was cancelled")
    error = record.error or {"status": 500, "code": "failed", "message": "the job failed"}
    headers = {"Retry-After": "5"} if error["status"] == 503 else None
    return APIError(int(error["status"]), error["code"], error["message"], headers=headers)


async def wait_for_result(request: Request, record: JobRecord, timeout: float) -> JobRecord:
    """Wait for a job to finish; if the client disconnects first, cancel the job (freeing its batch slot).

    Raises ``ClientDisconnected`` in that case (nobody reads the answer).
    """
    backend = backend_of(request)
    waiting = asyncio.ensure_future(backend.wait(record.id, timeout))
    watching = asyncio.ensure_future(_disconnect(request))
    try:
        await asyncio.wait({waiting, watching}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watching.cancel()
    if waiting.done():
        return waiting.result()
    waiting.cancel()
    await backend.abandon(record.id)
    raise ClientDisconnected(record.id)


async def _disconnect(request: Request) -> None:
    """Returns when the client has closed the connection (the body was read already)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return
