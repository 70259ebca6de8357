"""A model directory's own serving defaults (``fastcache_serving.json``) over its family's."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from service.model_limits import ModelLimits

SERVING_DEFAULTS_FILE = "fastcache_serving.json"
SERVING_DEFAULT_KEYS = ("default_steps", "default_guidance_scale", "default_width", "default_height")


def apply_serving_defaults(limits: ModelLimits, pipe: Any) -> ModelLimits:
    """Override a family's defaults with ``fastcache_serving.json`` in the pipeline's directory, if any.

    A model directory can state its own defaults (e.g. the guidance scale it was validated at):
    ``{"default_steps": 50, "default_guidance_scale": 2.0}``. Unknown keys are an error.
    """
    source = getattr(pipe, "name_or_path", None) or pipe.config.get("_name_or_path")
    path = Path(source) / SERVING_DEFAULTS_FILE if source else None
    if path is None or not path.is_file():
        return limits
    overrides = json.loads(path.read_text())
    unknown = set(overrides) - set(SERVING_DEFAULT_KEYS)
    if unknown:
        raise ValueError(f"{path}: unknown keys {sorted(unknown)}; allowed: {', '.join(SERVING_DEFAULT_KEYS)}")
    return limits.model_copy(update=overrides)
