"""``CacheProfile``: what calibration fits for one model, saved next to its transformer.

Per schedule phase (``num_phases`` equal slices of normalized time, phase 0 at pure noise):

* ``forecast_gain``: the first-order gain of the forecaster (1 = Taylor's first order; fitted by
  least squares on uncached runs, kept only when it wins end to end);
* ``error_floor``: the relative one-step forecast error of uncached runs in the output space (the
  per-step noise floor; a diagnostic of the fit);
* ``tolerance_weight``: the typical forecast drift per squared step of the phase, relative to the
  mean over phases (a diagnostic of the fit).

``metadata`` holds the mean drift per squared step at the calibration's step count (``drift_scale``),
the constants of FastCache's rule (``fastcache_rule``: its window scale in normalized time, the reuse
velocity of its per-sample test, ...; ``methods/fastcache.py``), TeaCache's rescaling polynomial, the
calibrated default ``CacheParams`` and the calibration report. A profile with no tensors is the
uncalibrated default: unit gain, the library's rule constants, no per-sample test.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

CALIBRATION_FILENAME = "fastcache_calibration.safetensors"
PROFILE_TENSORS = ("forecast_gain", "error_floor", "tolerance_weight")


def phase_of(normalized_time: float, num_phases: int) -> int:
    """Phase index of a step: ``0`` at pure noise (normalized time 1) up to ``num_phases - 1`` at the end."""
    return min(num_phases - 1, max(0, int((1.0 - normalized_time) * num_phases)))


@dataclass
class CacheProfile:
    """Calibrated per-phase coefficients of FastCache for one model (see the module docstring)."""

    num_phases: int = 1
    forecast_gain: torch.Tensor | None = None
    error_floor: torch.Tensor | None = None
    tolerance_weight: torch.Tensor | None = None
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def fitted(self) -> bool:
        """Whether any coefficient came from a calibration."""
        return any(getattr(self, name) is not None for name in PROFILE_TENSORS)

    @property
    def drift_scale(self) -> float | None:
        """Mean typical drift per squared step: sets the settled horizon; ``None`` when uncalibrated."""
        value = self.metadata.get("drift_scale")
        return float(value) if value else None

    def gain(self, phase: int) -> float:
        """The forecast's first-order gain in ``phase`` (1 unless calibration kept a fitted one)."""
        return 1.0 if self.forecast_gain is None else float(self.forecast_gain[phase])

    @property
    def rule_constants(self) -> dict[str, Any]:
        """The calibrated constants of FastCache's rule (``methods.fastcache.FastCacheRule`` fields).

        A profile written before they existed has only ``drift_scale`` (per squared step at
        ``num_inference_steps``): its window scale in normalized time is that times the step count
        squared."""
        constants = dict(self.metadata.get("fastcache_rule") or {})
        steps = self.metadata.get("num_inference_steps")
        if "window_scale" not in constants and self.drift_scale and steps:
            constants["window_scale"] = self.drift_scale * float(steps) ** 2
        return constants

    def save(self, path: str | Path) -> None:
        """Write the profile to a safetensors file."""
        from safetensors.torch import save_file

        tensors = {
            name: getattr(self, name).float().contiguous().cpu()
            for name in PROFILE_TENSORS
            if getattr(self, name) is not None
        }
        meta = {"num_phases": str(self.num_phases), "metadata": json.dumps(self.metadata)}
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(path), metadata=meta)

    @classmethod
    def load(cls, path: str | Path) -> CacheProfile:
        """Read a profile written by :meth:`save`."""
        from safetensors import safe_open

        values: dict[str, torch.Tensor] = {}
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            for key in f.keys():  # noqa: SIM118 (safetensors handles have no __iter__)
                if key not in PROFILE_TENSORS:
                    raise ValueError(
                        f"{path} is not a FastCache profile (unknown tensor {key!r}); recalibrate the model"
                    )
                values[key] = f.get_tensor(key)
        return cls(int(meta.get("num_phases", "1")), metadata=json.loads(meta.get("metadata", "{}")), **values)


def load_profile(
    calibration: str | Path | CacheProfile | None, use_calibration: bool, transformer: torch.nn.Module
) -> CacheProfile:
    """The profile a cache runs with (``FastCacheConfig.calibration``): a given profile or file, else the
    file beside the transformer, else the uncalibrated default (also when ``use_calibration`` is off)."""
    if not use_calibration:
        return CacheProfile()
    if isinstance(calibration, CacheProfile):
        return calibration
    path = calibration or default_calibration_path(transformer)
    if path is None:
        logger.info("FastCache: no calibration found; the library's rule constants, unit forecast gain")
        return CacheProfile()
    return CacheProfile.load(path)


def default_calibration_path(transformer: torch.nn.Module) -> Path | None:
    """Where the calibration of a transformer loaded with ``from_pretrained`` lives, if anywhere."""
    source = getattr(getattr(transformer, "config", None), "_name_or_path", None)
    if not source:
        return None
    path = Path(source) / CALIBRATION_FILENAME
    return path if path.is_file() else None
