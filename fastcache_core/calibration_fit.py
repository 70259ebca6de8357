"""The streamed fit of calibration: uncached runs pass by, per-phase sums accumulate in bounded memory.

A forward hook on the last block sees each step's stack output ``Y`` and keeps only its projection
through the model's output layer ``P Y`` (the space errors are measured in), for the last
``2 * max_gap + 1`` steps. From that window it accumulates, per schedule phase and forecast distance
``h = 1..max_gap``: the squared relative error of a first-order forecast, the normal equations of a
fitted first-order gain, and TeaCache's (input change, output change) points. Memory holds one small
window per batch row: it does not grow with steps or blocks.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from fastcache_core.adapters import adapter_for
from fastcache_core.profile import phase_of


@dataclass
class FitStatistics:
    """Per-phase sums accumulated while calibration runs stream by (float64, tiny)."""

    num_phases: int
    max_gap: int
    error_sq_sum: np.ndarray = field(init=False)  # (phases, gaps): sum of squared relative forecast errors
    error_count: np.ndarray = field(init=False)
    gain_cross: np.ndarray = field(init=False)  # sum <d, r>
    gain_gram: np.ndarray = field(init=False)  # sum <d, d>
    unit_error: np.ndarray = field(init=False)  # sum ||r - d||^2 (gain 1)
    target_sq: np.ndarray = field(init=False)  # sum ||r||^2
    teacache_points: list[tuple[float, float]] = field(default_factory=list)

    def __post_init__(self) -> None:
        for name in ("gain_cross", "gain_gram", "unit_error", "target_sq"):
            setattr(self, name, np.zeros(self.num_phases))
        self.error_sq_sum = np.zeros((self.num_phases, self.max_gap))
        self.error_count = np.zeros((self.num_phases, self.max_gap))

    def mean_error_sq(self) -> np.ndarray:
        """Mean squared relative error of a first-order forecast, per phase and distance 1..max_gap."""
        return np.where(self.error_count > 0, self.error_sq_sum / np.maximum(self.error_count, 1), np.nan)

    def floor(self) -> np.ndarray:
        """The one-step forecast error per phase: the per-step noise floor."""
        one_step = self.mean_error_sq()[:, 0]
        return np.sqrt(np.where(np.isnan(one_step), 0.0, one_step))

    def drift_per_step_sq(self) -> np.ndarray:
        """Typical drift (error above the floor) per squared step of distance, per phase (nan: no data)."""
        errors = self.mean_error_sq()
        floor_sq = errors[:, :1]
        gaps = np.arange(2, self.max_gap + 1)
        drift = np.sqrt(np.clip(errors[:, 1:] - floor_sq, 0.0, None)) / gaps**2
        drift = np.where(np.isnan(errors[:, 1:]), np.nan, drift)
        seen = (~np.isnan(drift)).sum(axis=1)
        return np.where(seen > 0, np.nansum(drift, axis=1) / np.maximum(seen, 1), np.nan)

    def gains(self) -> np.ndarray:
        """Least-squares first-order gain per phase (1 where a phase saw no data)."""
        return np.where(self.gain_gram > 0, self.gain_cross / np.maximum(self.gain_gram, 1e-30), 1.0)

    def fitted_error(self) -> np.ndarray:
        """Sum of squared forecast errors per phase with the fitted gain (exact, from the sums)."""
        g = self.gains()
        error: np.ndarray = self.target_sq - 2 * g * self.gain_cross + g * g * self.gain_gram
        return error


class StreamingRecorder:
    """Hooks on the transformer and its last block that stream each step into ``FitStatistics``."""

    def __init__(self, pipe: Any, stats: FitStatistics, max_gap: int) -> None:
        transformer = pipe.transformer
        if getattr(transformer, "_fastcache", None) is not None:
            raise RuntimeError("calibrate() records uncached runs: call .remove() on the FastCache handle first")
        self.adapter = adapter_for(transformer)
        self.transformer = transformer
        self.blocks = self.adapter.blocks(transformer)
        self.stats = stats
        self.max_gap = max_gap
        weight = self.adapter.output_projection(transformer)
        self.projection = None if weight is None else weight.detach()
        self.window: deque[torch.Tensor] = deque(maxlen=2 * max_gap + 1)
        self.times: deque[float] = deque(maxlen=2 * max_gap + 1)
        self.modulated_previous: torch.Tensor | None = None
        self.output_previous: torch.Tensor | None = None
        self.pairs = 1
        self._time = 1.0
        self._pending_teacache: float | None = None
        self._handles: list[Any] = []

    def __enter__(self) -> StreamingRecorder:
        self._handles = [
            self.transformer.register_forward_pre_hook(self._on_forward, with_kwargs=True),
            self.blocks[0].register_forward_pre_hook(self._on_first_block, with_kwargs=True),
            self.blocks[-1].register_forward_hook(self._on_last_block),
        ]
        return self

    def __exit__(self, *exc: Any) -> None:
        for handle in self._handles:
            handle.remove()

    def new_run(self) -> None:
        self.window.clear()
        self.times.clear()
        self.modulated_previous = self.output_previous = None

    def _on_forward(self, module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        import inspect

        bound = inspect.signature(module.forward).bind(*args, **kwargs).arguments
        timestep = bound["timestep"]
        t = timestep.reshape(-1)[:1] if torch.is_tensor(timestep) else torch.tensor([float(timestep)])
        self._time = float(self.adapter.normalized_time(t)[0])
        hidden = bound["hidden_states"]
        batch = hidden.shape[0]
        self.pairs = 2 if batch % 2 == 0 and torch.equal(hidden[: batch // 2], hidden[batch // 2 :]) else 1

    def _on_first_block(self, module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        call = self.adapter.bind_call(module.forward, args, kwargs)
        image, _ = self.adapter.split_streams(call)
        try:
            modulated = self.adapter.modulated_input(module, call, image).detach().double()
        except (NotImplementedError, KeyError, AttributeError):
            return
        if self.modulated_previous is not None and self.modulated_previous.shape == modulated.shape:
            change = float(
                (modulated - self.modulated_previous).abs().sum() / self.modulated_previous.abs().sum().clamp_min(1e-12)
            )
            self._pending_teacache = change
        self.modulated_previous = modulated

    def _on_last_block(self, module: torch.nn.Module, args: tuple[Any, ...], output: Any) -> None:
        image, _ = self.adapter.output_to_streams(output)
        y = image.detach().double()
        if self.projection is not None and self.projection.shape[-1] == y.shape[-1]:
            y = y @ self.projection.double().T
        pending = getattr(self, "_pending_teacache", None)
        if pending is not None and self.output_previous is not None and self.output_previous.shape == y.shape:
            out_change = float(
                (y - self.output_previous).abs().sum() / self.output_previous.abs().sum().clamp_min(1e-12)
            )
            self.stats.teacache_points.append((pending, out_change))
        self._pending_teacache = None
        self.output_previous = y
        self.window.append(y)
        self.times.append(self._time)
        self._accumulate()

    def _per_sample(self, values: torch.Tensor) -> torch.Tensor:
        """Sum per-row values over each sample's guidance rows (pipelines put the halves apart)."""
        if self.pairs == 2:
            half = values.shape[0] // 2
            return values[:half] + values[half:]
        return values

    def _accumulate(self) -> None:
        window, stats = self.window, self.stats
        y = window[-1]
        phase = phase_of(self.times[-1], stats.num_phases)
        norm = self._per_sample(y.pow(2).flatten(1).sum(1)).clamp_min(1e-30)
        for gap in range(1, self.max_gap + 1):
            if len(window) < 2 * gap + 1:
                break
            target = y - window[-1 - gap]
            slope = window[-1 - gap] - window[-1 - 2 * gap]
            relative_sq = self._per_sample((target - slope).pow(2).flatten(1).sum(1)) / norm
            stats.error_sq_sum[phase, gap - 1] += float(relative_sq.sum())
            stats.error_count[phase, gap - 1] += relative_sq.numel()
            stats.gain_cross[phase] += float((slope * target).sum())
            stats.gain_gram[phase] += float((slope * slope).sum())
            stats.unit_error[phase] += float((target - slope).pow(2).sum())
            stats.target_sq[phase] += float(target.pow(2).sum())
