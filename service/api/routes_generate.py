"""``POST /generate`` and the asynchronous ``/v1/jobs`` routes."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, StreamingResponse

from service.api.delivery import deliver_images
from service.api.deps import backend_of, build_submission, failure, require_api_key, submit, wait_for_result
from service.api.errors import APIError
from service.api.schemas import GenerateRequest, GenerateResponse, JobAccepted, JobStatus
from service.queue.base import JobRecord, JobSubmission

router = APIRouter(dependencies=[Depends(require_api_key)], tags=["generation"])

WAIT_MARGIN_SECONDS = 30.0


async def to_response(request: Request, record: JobRecord, model: str) -> GenerateResponse:
    """A succeeded job's answer, its images as ``b64_json`` or ``url`` as the job asked."""
    return GenerateResponse(
        id=record.id,
        model=model,
        created=int(record.created_at),
        output_format=record.output_format,
        images=await deliver_images(request, record),
    )


def _submission_of(request: Request, body: GenerateRequest, route: str) -> JobSubmission:
    """The queued form of a native request (``/generate`` and ``/v1/jobs`` take the same body)."""
    return build_submission(
        request,
        body,
        prompt=body.prompt,
        n=body.n,
        width=body.width,
        height=body.height,
        output_format=body.output_format,
        route=route,
        response_format=body.response_format,
    )


@router.post("/generate", response_model=GenerateResponse, summary="Generate images and wait for them")
async def generate(body: GenerateRequest, request: Request) -> GenerateResponse:
    submission = _submission_of(request, body, route="generate")
    record = await submit(request, submission)
    backend = backend_of(request)
    record = await wait_for_result(request, record, submission.timeout_seconds + WAIT_MARGIN_SECONDS)
    if not record.terminal:
        raise APIError(504, "deadline_exceeded", "the request did not finish in time")
    if record.status != "succeeded":
        raise failure(record)
    return await to_response(request, record, backend.model_name)


@router.post("/v1/jobs", status_code=202, response_model=JobAccepted, summary="Queue a generation job")
async def create_job(body: GenerateRequest, request: Request) -> JSONResponse:
    submission = _submission_of(request, body, route="jobs")
    record = await submit(request, submission)
    return JSONResponse(
        {"id": record.id, "status": record.status}, status_code=202, headers={"Location": f"/v1/jobs/{record.id}"}
    )


async def _job(request: Request, job_id: str) -> JobRecord:
    record = await backend_of(request).get(job_id)
    if record is None:
        raise APIError(404, "job_not_found", f"no job {job_id!r} (unknown or expired)", field="id")
    return record


async def _status(request: Request, record: JobRecord, model: str) -> JobStatus:
    result = await to_response(request, record, model) if record.status == "succeeded" else None
    return JobStatus(
        id=record.id,
        status=record.status,
        model=model,
        created=int(record.created_at),
        steps_done=record.steps_done,
        result=result,
        error=record.error,
    )


@router.get("/v1/jobs/{job_id}", response_model=JobStatus, summary="A job's status, then its result")
async def get_job(job_id: str, request: Request) -> JobStatus:
    return await _status(request, await _job(request, job_id), backend_of(request).model_name)


@router.delete("/v1/jobs/{job_id}", response_model=JobStatus, summary="Cancel a job, freeing its batch slot")
async def cancel_job(job_id: str, request: Request) -> JobStatus:
    record = await _job(request, job_id)
    if record.terminal and record.status != "cancelled":
        raise APIError(409, "job_finished", f"job {job_id} already {record.status}")
    cancelled = await backend_of(request).cancel(job_id)
    if cancelled is None:  # expired between the two reads
        raise APIError(404, "job_not_found", f"no job {job_id!r} (unknown or expired)", field="id")
    return await _status(request, cancelled, backend_of(request).model_name)


@router.get("/v1/jobs/{job_id}/events", summary="Server-sent events: one per denoising step, then the result")
async def job_events(job_id: str, request: Request) -> StreamingResponse:
    await _job(request, job_id)
    backend = backend_of(request)

    async def stream() -> AsyncIterator[bytes]:
        async for event in backend.events(job_id):
            if event["type"] == "result":
                record = JobRecord.from_dict(event["job"])
                try:
                    payload: dict[str, Any] = (await _status(request, record, backend.model_name)).model_dump()
                except APIError as error:  # the object store is down: the stream has started, so say it in-band
                    yield _sse("error", {"status": error.status, "code": error.code, "message": error.detail})
                    return
                yield _sse("result", payload)
            else:
                yield _sse(event["type"], event)

    return StreamingResponse(
        stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    )


def _sse(event: str, data: dict[str, Any]) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data)}\n\n".encode()
