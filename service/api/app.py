"""The FastAPI application: routers, error handlers, body-size limit and lifespan."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service import telemetry
from service.api import (
    routes_files,
    routes_generate,
    routes_health,
    routes_models,
    routes_openai,
    routes_playground,
)
from service.api.errors import APIError, install_error_handlers, problem_response
from service.queue.base import JobBackend
from service.settings import Settings


class BodySizeLimit:
    """ASGI middleware answering 413 to bodies over ``limit`` bytes (declared or streamed)."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers", [])).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            await self._reject(scope, receive, send)
            return
        seen = 0

        async def limited_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise _TooLarge()
            return message

        try:
            await self.app(scope, limited_receive, send)
        except _TooLarge:
            await self._reject(scope, receive, send)

    async def _reject(self, scope: Scope, receive: Receive, send: Send) -> None:
        from starlette.requests import Request

        telemetry.REJECTED.labels(reason="body_too_large").inc()
        response = problem_response(
            Request(scope, receive),
            APIError(413, "body_too_large", f"request body exceeds {self.limit} bytes", field="body"),
        )
        await response(scope, receive, send)


class _TooLarge(Exception):
    pass


def create_app(settings: Settings, backend: JobBackend) -> FastAPI:
    """The API over ``backend``; the backend starts and stops with the app."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await backend.start()
        try:
            yield
        finally:
            # SIGTERM: uvicorn stops accepting and lets open requests finish; then we stop admitting
            # queued work and let the batch in flight complete
            app.state.shutting_down = True
            await backend.stop()

    app = FastAPI(
        title="FastCache DiT serving",
        version="0.1.0",
        description="Image generation with FastCache-accelerated Diffusion Transformers, batched per step, "
        "with per-request cache settings.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.backend = backend
    app.state.shutting_down = False
    install_error_handlers(app)
    app.include_router(routes_health.router)
    app.include_router(routes_generate.router)
    app.include_router(routes_openai.router)
    app.include_router(routes_models.router)
    app.include_router(routes_playground.router)
    app.include_router(routes_files.router)
    app.add_middleware(BodySizeLimit, limit=settings.max_body_bytes)
    return app


def build_backend(settings: Settings) -> JobBackend:
    """The backend named by ``settings.queue``: in-process, or Redis Streams for scale-out."""
    if settings.queue == "local":
        from service.queue.local import LocalBackend

        return LocalBackend(settings)
    if settings.queue.startswith(("redis://", "rediss://", "unix://")):
        from service.queue.redis_streams import RedisBackend

        return RedisBackend(settings)
    raise ValueError(f"--queue must be 'local' or a redis:// URL; got {settings.queue!r}")
