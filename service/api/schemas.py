"""Request and response bodies (pydantic). Field names are the public contract of the API."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from fastcache_core.config import CACHE_FIELDS
from fastcache_core.methods import method_names
from service.engine.image_stats import ImageStats

ResponseFormat = Literal["b64_json", "url"]
RESPONSE_FORMAT_DESCRIPTION = (
    "b64_json: each image inline, base64-encoded; url: a link to it instead, valid for --result-url-ttl-seconds"
)


def _cache_field(name: str) -> Any:
    """A ``CacheSettings`` field with the range and meaning ``fastcache_core.config.CACHE_FIELDS`` gives it."""
    limits = CACHE_FIELDS[name]
    if limits.low_open:
        return Field(None, gt=limits.low, le=limits.high, description=limits.summary)
    return Field(None, ge=limits.low, le=limits.high, description=limits.summary)


class CacheSettings(BaseModel):
    """Per-request cache settings; omitted fields take the model's calibrated defaults (for the model's
    default method; another method's take the library defaults)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    method: str | None = Field(
        None,
        description="a registered cache method: fastcache (default), none, or a per-sample peer: taylorseer, "
        "teacache, fbcache (GET /v1/models/{id} lists them as cache_methods)",
    )
    tolerance: float | None = _cache_field("tolerance")
    significance: float | None = _cache_field("significance")
    motion_threshold: float | None = _cache_field("motion_threshold")
    motion_fraction: float | None = _cache_field("motion_fraction")
    merge_ratio: float | None = _cache_field("merge_ratio")
    max_skip_steps: int | None = _cache_field("max_skip_steps")
    refresh_fraction: float | None = _cache_field("refresh_fraction")

    @field_validator("method")
    @classmethod
    def _registered(cls, value: str | None) -> str | None:
        if value is not None and value not in method_names():
            raise ValueError(f"must be one of {', '.join(method_names())}")
        return value


class GenerationFields(BaseModel):
    """Fields shared by /generate and /v1/jobs (and accepted as extras by the OpenAI route)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    negative_prompt: str | None = Field(None, max_length=2000, description="what to steer away from (text models)")
    steps: int | None = Field(None, ge=1, le=200, description="denoising steps; default: the model's")
    guidance_scale: float | None = Field(
        None, ge=0.0, le=30.0, description="classifier-free guidance; default: the model's"
    )
    seed: int | None = Field(
        None, ge=0, le=2**63 - 1, description="seed of the first image (image i uses seed + i); random if omitted"
    )
    cache: CacheSettings = Field(default_factory=CacheSettings)
    timeout_seconds: float | None = Field(
        None, gt=0, le=3600, description="deadline; past it the request fails with 504"
    )


class GenerateRequest(GenerationFields):
    """Body of ``POST /generate`` and ``POST /v1/jobs``."""

    prompt: str = Field(
        min_length=1,
        max_length=2000,
        description='text, or for a class-conditional model a label name or id such as "seven" or "7"',
    )
    n: int = Field(1, ge=1, le=8, description="images to generate")
    width: int | None = Field(None, ge=8, le=4096, description="pixels; default: the model's native size")
    height: int | None = Field(None, ge=8, le=4096, description="pixels; default: the model's native size")
    output_format: Literal["png", "jpeg", "webp"] = "png"
    response_format: ResponseFormat = Field("b64_json", description=RESPONSE_FORMAT_DESCRIPTION)


def _absent(value: object) -> bool:
    return value is None


class _ImageData(BaseModel):
    """An image as ``b64_json`` or as ``url``: the one it does not carry is left out of the JSON, not null."""

    b64_json: str | None = Field(
        None, exclude_if=_absent, description="the image, base64-encoded in output_format (response_format b64_json)"
    )
    url: str | None = Field(
        None, exclude_if=_absent, description="where to download the image until the link expires (response_format url)"
    )


class GeneratedImage(_ImageData):
    seed: int
    stats: ImageStats


class GenerateResponse(BaseModel):
    id: str
    model: str
    created: int
    output_format: str
    images: list[GeneratedImage]


class JobAccepted(BaseModel):
    id: str
    status: str


class JobStatus(BaseModel):
    id: str
    status: Literal["queued", "running", "succeeded", "failed", "cancelled"]
    model: str
    created: int
    steps_done: int
    result: GenerateResponse | None = None
    error: dict[str, Any] | None = None


class OpenAIImageRequest(GenerationFields):
    """Body of ``POST /v1/images/generations``: the OpenAI Images API plus our generation fields."""

    model_config = ConfigDict(extra="forbid", strict=True)

    prompt: str = Field(min_length=1, max_length=4000)
    model: str | None = None
    n: int = Field(1, ge=1, le=8)
    size: str | None = Field(None, pattern=r"^(auto|\d{1,4}x\d{1,4})$", description="WIDTHxHEIGHT or auto")
    response_format: ResponseFormat | None = Field("b64_json", description=RESPONSE_FORMAT_DESCRIPTION)
    output_format: Literal["png", "jpeg", "webp"] | None = "png"
    quality: str | None = None
    style: str | None = None
    user: str | None = None
    background: str | None = None
    moderation: str | None = None
    output_compression: int | None = None


class OpenAIImage(_ImageData):
    revised_prompt: str | None = None
    seed: int
    stats: ImageStats


class OpenAIImageResponse(BaseModel):
    created: int
    data: list[OpenAIImage]
    output_format: str
    size: str
