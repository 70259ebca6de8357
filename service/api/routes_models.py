"""``GET /v1/models`` and ``GET /v1/models/{model}``: the OpenAI model list and model object.

The list names the one model this server serves, so ``client.models.list()`` of an OpenAI client
finds it. The model object also carries a ``serving`` section (not in OpenAI's schema; clients
ignore extra fields) with what a user interface needs to build a request: labels of a
class-conditional model, default steps and guidance, sizes, cache methods, the largest ``n``.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Literal

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, Field

from fastcache_core.methods import method_names
from service.api.deps import backend_of, require_api_key, settings_of
from service.api.errors import APIError
from service.api.schemas import GenerateRequest
from service.model_limits import ModelDefaults

router = APIRouter(dependencies=[Depends(require_api_key)], tags=["openai"])

OWNER = "fastcache-serve"
# the request schema's own bound on n, so the two cannot drift apart
MAX_N = next(bound.le for bound in GenerateRequest.model_fields["n"].metadata if hasattr(bound, "le"))


class ServingInfo(ModelDefaults):
    """What the served model accepts and defaults to (known once the model is loaded): its limits, labels in order."""

    labels: list[str] | None = Field(description="class-conditional models: label names in class-id order")
    max_n: int = Field(description="the most images one request may ask for")
    cache_methods: list[str] = Field(description="values of cache.method")


class ModelObject(BaseModel):
    """OpenAI's model object, plus ``serving`` on the single-model route."""

    id: str
    object: Literal["model"] = "model"
    created: int = Field(description="Unix time the model files were written (or the server started)")
    owned_by: str = OWNER
    serving: ServingInfo | None = Field(None, description="only from GET /v1/models/{model}, once the model is loaded")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelObject]


_STARTED = int(time.time())


def _created(model: str) -> int:
    """When the model directory's files were written; the server's start for a hub id or remote model."""
    path = Path(model)
    try:
        return int(max((p.stat().st_mtime for p in path.glob("*")), default=path.stat().st_mtime))
    except OSError:
        return _STARTED


def _model(request: Request) -> ModelObject:
    return ModelObject(id=backend_of(request).model_name, created=_created(settings_of(request).model))


def _serving(request: Request) -> ServingInfo:
    limits = backend_of(request).limits()
    if limits is None:
        raise APIError(503, "not_ready", "the model is not loaded yet", headers={"Retry-After": "5"})
    return ServingInfo(
        **limits.model_dump(exclude={"labels"}),
        labels=limits.ordered_labels(),
        max_n=min(MAX_N, settings_of(request).max_batch_size),
        cache_methods=list(method_names()),
    )


@router.get(
    "/v1/models",
    response_model=ModelList,
    response_model_exclude_none=True,
    summary="The served model, in the OpenAI list shape",
)
async def list_models(request: Request) -> dict[str, Any]:
    return ModelList(data=[_model(request)]).model_dump(exclude_none=True)


@router.get(
    "/v1/models/{model_id:path}",
    response_model=ModelObject,
    response_model_exclude_none=True,
    summary="The served model with what it accepts (labels, defaults, sizes)",
)
async def retrieve_model(model_id: str, request: Request) -> ModelObject:
    model = _model(request)
    if model_id != model.id:
        raise APIError(
            404,
            "model_not_found",
            f"model {model_id!r} is not served here; this server serves {model.id!r}",
            field="model",
        )
    model.serving = _serving(request)
    return model
