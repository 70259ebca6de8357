"""``POST /v1/images/generations``: the OpenAI Images API shape, so OpenAI clients work unchanged."""

from __future__ import annotations

import time

from fastapi import APIRouter, Depends, Request

from service.api.deps import backend_of, build_submission, failure, invalid, require_api_key, submit, wait_for_result
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
    if body.response_format == "url":
        raise invalid("response_format", "only b64_json is supported: this server stores no images")
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
        data=[
            {"b64_json": image["b64_json"], "revised_prompt": None, "seed": image["seed"], "stats": image["stats"]}
            for image in record.images or []
        ],
        output_format=submission.output_format,
        size=f"{spec.width}x{spec.height}",
    )
