"""Liveness, readiness and metrics."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from service import telemetry
from service.api.deps import backend_of, settings_of

router = APIRouter(tags=["operations"])


@router.get("/healthz", summary="The process is alive")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz", summary="The model is loaded and warmed and the queue is reachable")
async def readyz(request: Request) -> JSONResponse:
    backend = backend_of(request)
    ok, reason = await backend.ready()
    if request.app.state.shutting_down:
        ok, reason = False, "shutting down"
    telemetry.READY.set(1 if ok else 0)
    body = {"status": "ready" if ok else "not ready", "model": backend.model_name}
    if not ok:
        body["reason"] = reason
    return JSONResponse(body, status_code=200 if ok else 503, headers=None if ok else {"Retry-After": "5"})


@router.get("/metrics", summary="Prometheus metrics")
async def metrics(request: Request) -> Response:
    backend = backend_of(request)
    ok, _ = await backend.ready()
    telemetry.READY.set(1 if ok and not request.app.state.shutting_down else 0)
    await backend.refresh_metrics()
    settings = settings_of(request)
    # an API replica in Redis mode runs no model: it reports its own RSS and never imports torch to ask for a GPU
    device = settings.resolved_device() if settings.queue == "local" else "cpu"
    return Response(telemetry.render(device), media_type=CONTENT_TYPE_LATEST)
