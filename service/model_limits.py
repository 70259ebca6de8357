"""What a model serves, what a request asks of it, and the check between the two: no torch, no diffusers.

The API validates requests with these (an API replica in Redis mode imports no torch); the engine's
family runners produce the ``ModelLimits`` and the workers publish them in Redis for the replicas.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, Field

from fastcache_core.config import CacheParams


class InvalidField(ValueError):
    """A request field the model cannot serve; ``field`` names it for the 422 response."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field
        self.message = message


class ModelDefaults(BaseModel):
    """The defaults and size rules of a served model: shared by ``ModelLimits`` and the API's ``serving`` section."""

    family: str = Field(description="dit, pixart, sd3 or flux")
    default_steps: int = Field(description="denoising steps of a request that names none")
    default_guidance_scale: float = Field(description="classifier-free guidance of a request that names none")
    default_width: int = Field(description="pixels: the model's native width")
    default_height: int = Field(description="pixels: the model's native height")
    size_multiple: int = Field(description="width and height must be multiples of this (patch x VAE factor)")
    min_size: int = Field(description="smallest width or height")
    max_size: int = Field(description="largest width or height")
    supports_negative_prompt: bool = Field(description="whether negative_prompt is accepted")
    num_classes: int | None = Field(None, description="class-conditional models: ids are in [0, num_classes)")


class ModelLimits(ModelDefaults):
    """What a model serves: its defaults, its sizes and (class-conditional models) its labels."""

    labels: dict[str, int] | None = Field(None, description="class-conditional models: label name -> class id")

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump()

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelLimits:
        return cls.model_validate(data)

    def ordered_labels(self) -> list[str] | None:
        """Label names in class-id order (``None`` for text models)."""
        if not self.labels:
            return None
        labels = self.labels
        return sorted(labels, key=labels.__getitem__)


@dataclass
class GenerationSpec:
    """The model-facing part of a request (already validated by the API)."""

    prompt: str
    negative_prompt: str | None
    steps: int
    guidance_scale: float
    seed: int
    width: int
    height: int
    cache: CacheParams


def resolve_label(limits: ModelLimits, prompt: str) -> int:
    """Class id of a class-conditional prompt: a label name (``"seven"``) or an id (``"7"``)."""
    text = prompt.strip()
    valid_ids = sorted(set(limits.labels.values())) if limits.labels else None
    if text.isdigit():
        value = int(text)
        if valid_ids is not None and value not in valid_ids:
            raise InvalidField("prompt", f"unknown class id {value}; valid ids: {valid_ids}")
        if limits.num_classes is not None and not 0 <= value < limits.num_classes:
            raise InvalidField("prompt", f"class id must be in [0, {limits.num_classes})")
        return value
    if limits.labels and text in limits.labels:
        return limits.labels[text]
    names = ", ".join(limits.ordered_labels() or []) or "class ids only"
    raise InvalidField(
        "prompt", f"this class-conditional model takes a label name or id; {text[:40]!r} is not one of: {names}"
    )


def validate_spec(limits: ModelLimits, spec: GenerationSpec) -> None:
    """Check a request against what the model serves; raises ``InvalidField`` naming the field."""
    for name, value in (("width", spec.width), ("height", spec.height)):
        if value % limits.size_multiple or not limits.min_size <= value <= limits.max_size:
            raise InvalidField(
                name,
                f"{name} must be a multiple of {limits.size_multiple} in "
                f"[{limits.min_size}, {limits.max_size}] for this model; got {value}",
            )
    if spec.negative_prompt and not limits.supports_negative_prompt:
        raise InvalidField("negative_prompt", f"this {limits.family} model takes no negative prompt")
    if limits.family == "dit":
        resolve_label(limits, spec.prompt)
