"""Error responses: RFC 9457 problem+json everywhere, the OpenAI error object on the OpenAI route."""

from __future__ import annotations

from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from service import telemetry
from service.queue.base import NotReadyError

OPENAI_PREFIX = ("/v1/images", "/v1/models")  # routes that answer with OpenAI error objects
RETRY_AFTER_SECONDS = "5"


class ClientDisconnected(Exception):
    """The client closed the connection while waiting; its job was cancelled, nobody reads the answer."""


class APIError(Exception):
    """An error with an HTTP status, a stable code and the field it concerns (if any)."""

    def __init__(
        self,
        status: int,
        code: str,
        detail: str,
        field: str | None = None,
        headers: dict[str, str] | None = None,
        errors: list[dict[str, str]] | None = None,
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.code = code
        self.detail = detail
        self.field = field
        self.headers = headers or {}
        self.errors = errors or ([{"field": field, "message": detail}] if field else [])


def field_path(loc: tuple[Any, ...]) -> str:
    """Dotted field name from a pydantic error location, without the leading ``body``."""
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "header")]
    return ".".join(parts) or "body"


def problem_response(request: Request, error: APIError) -> JSONResponse:
    if request.url.path.startswith(OPENAI_PREFIX):
        kind = "invalid_request_error" if error.status < 500 else "server_error"
        if error.status == 429:
            kind = "rate_limit_error"
        if error.status == 401:
            kind = "authentication_error"
        openai_body = {"error": {"message": error.detail, "type": kind, "param": error.field, "code": error.code}}
        status = 400 if error.status == 422 else error.status  # the OpenAI API answers 400 to bad parameters
        return JSONResponse(openai_body, status_code=status, headers=error.headers)
    body: dict[str, Any] = {
        "type": f"https://fastcache.dev/problems/{error.code}",
        "title": HTTPStatus(error.status).phrase,
        "status": error.status,
        "detail": error.detail,
        "instance": request.url.path,
        "code": error.code,
    }
    if error.errors:
        body["errors"] = error.errors
    return JSONResponse(body, status_code=error.status, headers=error.headers, media_type="application/problem+json")


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, error: APIError) -> JSONResponse:
        return problem_response(request, error)

    @app.exception_handler(NotReadyError)
    async def _not_ready(request: Request, error: NotReadyError) -> JSONResponse:
        # the queue (Redis) is unreachable or the model is not loaded: a retryable 503, never a 500
        telemetry.REJECTED.labels(reason="not_ready").inc()
        return problem_response(
            request, APIError(503, "not_ready", f"not ready: {error}", headers={"Retry-After": RETRY_AFTER_SECONDS})
        )

    @app.exception_handler(ClientDisconnected)
    async def _client_gone(request: Request, error: ClientDisconnected) -> Response:
        return Response(status_code=499)  # nginx's "client closed request": nobody is listening

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
        errors = []
        for item in error.errors():
            name = field_path(tuple(item.get("loc", ())))
            message = item.get("msg", "invalid value")
            if item.get("type") == "json_invalid":
                name, message = "body", "the body is not valid JSON"
            elif item.get("type") == "extra_forbidden":
                message = "unknown field"
            errors.append({"field": name, "message": message})
        detail = "; ".join(f"{e['field']}: {e['message']}" for e in errors) or "invalid request"
        telemetry.REJECTED.labels(reason="invalid").inc()
        return problem_response(
            request,
            APIError(422, "invalid_request", detail, field=errors[0]["field"] if errors else None, errors=errors),
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(error.status_code, "http_error")
        return problem_response(
            request, APIError(error.status_code, code, str(error.detail), headers=getattr(error, "headers", None) or {})
        )

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, error: Exception) -> JSONResponse:
        return problem_response(request, APIError(500, "internal_error", "internal server error"))
