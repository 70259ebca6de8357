"""``POST /v1/images/generations``: the OpenAI Images API shape, so OpenAI clients work unchanged."""

from __future__ import annotations

import time

from fastapi import APIRouter, Depends, Request

from service.api.delivery import deliver_images
from service.api.deps import backend_of, build_submission, failure, require_api_key, submit, wait_for_result
from service.api.errors import APIError
from service.api.routes_generate import WAIT_MARGIN_SECONDS
from service.api.schemas import OpenAIImageRequest, OpenAIImageResponse

router = APIRouter(dependencies=[Depends(require_api_key)], tags=["openai"])


@router.post("/v1/images/generations", response_model=OpenAIImageResponse, summary="OpenAI-compatible image generation")
async def images_generations(body: OpenAIImageRequest, request: Request) -> OpenAIImageResponse:
    backend = backend_of(request)
    if body.model is not None and body.model != backend.model_name:
        raise APIError(
            404,
            "model_not_found",
            f"model {body.model!r} is not served here; this server serves {backend.model_name!r}",
            field="model",
        )
    width = height = None
    if body.size and body.size != "auto":
        width, height = (int(v) for v in body.size.split("x"))
    submission = build_submission(
        request,
        body,
        prompt=body.prompt,
        n=body.n,
        width=width,
        height=height,
        output_format=body.output_format or "png",
        route="openai",
        response_format=body.response_format or "b64_json",
    )
    record = await submit(request, submission)
    record = await wait_for_result(request, record, submission.timeout_seconds + WAIT_MARGIN_SECONDS)
    if not record.terminal:
        raise APIError(504, "deadline_exceeded", "the request did not finish in time")
    if record.status != "succeeded":
        raise failure(record)
    spec = submission.spec
    return OpenAIImageResponse(
        created=int(time.time()),
        data=[{**image, "revised_prompt": None} for image in await deliver_images(request, record)],
        output_format=submission.output_format,
        size=f"{spec.width}x{spec.height}",
    )
