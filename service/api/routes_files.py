"""``GET /v1/files/{key}``: images behind HMAC-signed, expiring URLs (directory, memory and Redis result stores).

No API key: the signature is the credential, so a browser or ``httpx.get`` can fetch the URL as is.
A tampered, expired, or re-targeted URL (another job's key) gets 403.
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response

from service import telemetry
from service.api.delivery import image_bytes, image_missing, store_unavailable
from service.api.deps import backend_of, settings_of
from service.api.errors import APIError
from service.api.signed_urls import verify
from service.queue.base import NotReadyError
from service.queue.results import ImageMissing, StoreUnavailable, content_type, parse_object_key

router = APIRouter(tags=["generation"])


@router.get("/v1/files/{key:path}", summary="An image behind a signed URL (response_format url)")
async def get_file(key: str, request: Request) -> Response:
    backend = backend_of(request)
    try:
        secret = await backend.url_signing_key()
    except NotReadyError as error:
        raise APIError(503, "not_ready", f"not ready: {error}", headers={"Retry-After": "5"}) from error
    refused = verify(secret, key, request.query_params.get("expires"), request.query_params.get("signature"))
    if refused is not None:
        telemetry.REJECTED.labels(reason="bad_signature").inc()
        raise APIError(403, "forbidden", refused)
    parsed = parse_object_key(key)
    if parsed is None:  # signed by us, so ours; a key scheme of another version
        raise APIError(404, "image_not_found", f"no image {key!r}")
    job_id, index = parsed
    record = await backend.get(job_id)
    if record is None or not record.images or index >= len(record.images):
        raise APIError(404, "image_not_found", f"no image {key!r} (its job expired)")
    try:
        data = await image_bytes(request, record.images[index])
    except StoreUnavailable as error:
        raise store_unavailable(error) from error
    except ImageMissing as error:
        raise image_missing(job_id, error) from error
    max_age = settings_of(request).result_url_ttl_seconds
    return Response(data, media_type=content_type(key), headers={"Cache-Control": f"private, max-age={max_age}"})
