"""Configuration: model-level ``FastCacheConfig`` and per-request ``CacheParams``.

``CacheParams`` field names are the ones the HTTP API exposes. A field left as ``None`` takes the
model's calibrated default (stored with the calibration next to the model), else the library
default in ``DEFAULT_PARAMS``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastcache_core.methods.registry import method_names

if TYPE_CHECKING:
    from fastcache_core.profile import CacheProfile


REFRESH_SCORES = ("forecast_error", "input_change", "slope")
"""How a token refresh picks its tokens (``FastCacheConfig.refresh_score``)."""
REFRESH_CONTEXTS = ("kept", "forecast", "none")
"""What the tokens of a token refresh attend to (``FastCacheConfig.refresh_context``)."""


def __getattr__(name: str) -> Any:
    if name == "METHODS":  # the registry's names at the time of asking (plug-ins included)
        return method_names()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@dataclass(frozen=True)
class CacheParams:
    """Cache settings of one request (one sample and its guidance pair).

    Args:
        method: a registered method (``fastcache_core.methods``): ``"fastcache"`` (the default),
            ``"none"``, or a per-sample peer: ``"taylorseer"``, ``"teacache"``, ``"fbcache"``. Each
            method reads the fields it names in ``request_fields`` and ignores the others.
        tolerance: tau. For ``fastcache``: the relative drift of a typical sample's first-order forecast
            (in what the sampler integrates) at the end of its window; it sets the window in the
            sampler's normalized time, ``sqrt(tau / window_scale)``, the same at any step count.
            Larger values refresh less often; ``0`` computes every step. For ``teacache`` and
            ``fbcache`` it is their threshold (accumulated rescaled change, first-block residual
            change); for ``taylorseer`` any value above 0 enables it. Range [0, 1].
        significance: alpha of FastCache's per-sample chi-square test: the probability of shortening
            the window of a sample that drifts like a typical one. Range (0, 0.5].
        motion_threshold: spatial token selection. At a real compute, a token whose relative change
            since the sample's last real compute is below this value is *static*: it skips the blocks
            and takes the forecast. ``0`` disables token selection. Range [0, 1].
        motion_fraction: alternative to ``motion_threshold``: compute exactly this fraction of the
            image tokens (the most salient ones). ``None`` or ``1`` disables it. Range (0, 1].
        merge_ratio: k-NN density token merging: fraction of the computed image tokens merged into
            their nearest neighbour before the blocks and unmerged after. ``0`` disables it.
            Range [0, 0.9].
        refresh_fraction: token refresh (``fastcache``): at every forecast step, this share of the image
            tokens (those whose forecast erred most at the last real compute) runs the whole stack,
            attending over the cached keys and values of the others; their outputs correct the forecast
            until the next real compute. DiT and PixArt only (SD3 and Flux forecast). ``0`` disables it.
            Range [0, 1].
        max_skip_steps: the most consecutive forecast steps between two real computes (for
            ``taylorseer``: exactly this many, i.e. its cache interval is ``max_skip_steps + 1``); also
            the most consecutive computes a static token may skip. Range [1, 100].

    A request that leaves a field out gets the model's calibrated default when it runs the model's
    default method, else the library default (``DEFAULT_PARAMS``).
    """

    method: str | None = None
    tolerance: float | None = None
    significance: float | None = None
    motion_threshold: float | None = None
    motion_fraction: float | None = None
    merge_ratio: float | None = None
    max_skip_steps: int | None = None
    refresh_fraction: float | None = None

    def __post_init__(self) -> None:
        if self.method is not None and self.method not in method_names():
            raise ValueError(f"method must be one of {', '.join(method_names())}; got {self.method!r}")
        for name, limits in CACHE_FIELDS.items():
            limits.check(name, getattr(self, name))

    def resolved(self, defaults: CacheParams | None = None) -> ResolvedCacheParams:
        """Fill every ``None`` field from ``defaults`` then from ``DEFAULT_PARAMS``."""
        values = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None and defaults is not None:
                value = getattr(defaults, f.name)
            if value is None:
                value = getattr(DEFAULT_PARAMS, f.name)
            values[f.name] = value
        return ResolvedCacheParams(**values)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CacheParams:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass(frozen=True)
class FieldLimits:
    """The range and one-line meaning of a numeric ``CacheParams`` field: the one place the API's schema,
    request validation and ``fastcache-generate --help`` take them from."""

    low: float
    high: float
    summary: str
    low_open: bool = False
    integer: bool = False

    def check(self, name: str, value: float | None) -> None:
        """``ValueError`` naming the field when ``value`` (``None``: unset) is out of range."""
        if value is None:
            return
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"{name} must be a finite number; got {value!r}")
        if self.integer and int(value) != value:
            raise ValueError(f"{name} must be a whole number; got {value!r}")
        if value < self.low or value > self.high or (self.low_open and value == self.low):
            bracket = "(" if self.low_open else "["
            raise ValueError(f"{name} must be in {bracket}{self.low:g}, {self.high:g}]; got {value}")


CACHE_FIELDS: dict[str, FieldLimits] = {
    "tolerance": FieldLimits(0.0, 1.0, "tau: the drift (or change) accepted; larger refreshes less often; 0 = none"),
    "significance": FieldLimits(0.0, 0.5, "alpha of FastCache's per-sample chi-square test", low_open=True),
    "motion_threshold": FieldLimits(0.0, 1.0, "relative token change below which a token is static; 0 = off"),
    "motion_fraction": FieldLimits(0.0, 1.0, "compute exactly this share of tokens instead", low_open=True),
    "merge_ratio": FieldLimits(0.0, 0.9, "share of computed tokens merged by k-NN density; 0 = off"),
    "max_skip_steps": FieldLimits(1, 100, "most forecast steps in a row (taylorseer: exactly this many)", integer=True),
    "refresh_fraction": FieldLimits(0.0, 1.0, "share of tokens refreshed at each forecast step (K/V kept); 0 = off"),
}
"""Every numeric field of ``CacheParams`` with its range (see the class docstring for full meanings)."""


@dataclass(frozen=True)
class ResolvedCacheParams(CacheParams):
    """``CacheParams`` with every field set: what a registered sample runs with. Its field defaults are
    the library defaults (``DEFAULT_PARAMS``)."""

    method: str = "fastcache"
    tolerance: float = 0.02
    significance: float = 0.05
    motion_threshold: float = 0.0
    motion_fraction: float = 1.0
    merge_ratio: float = 0.0
    max_skip_steps: int = 4
    refresh_fraction: float = 0.0


DEFAULT_PARAMS = ResolvedCacheParams()
"""Library defaults, used where neither the request nor the model's calibration sets a value."""


@dataclass
class FastCacheConfig:
    """Model-level FastCache configuration, in the style of diffusers' cache configs.

    Args:
        enabled: when ``False`` every step is computed (the cache still counts steps). Default ``True``.
        params: default ``CacheParams`` for samples that bring none (plain pipeline calls). Fields left
            ``None`` take the calibrated defaults. Default: all ``None``.
        first_steps: number of initial denoising steps of each sample that always compute. Default
            ``1``: measured on the bundled model, every further warm-up compute costs more than it
            returns.
        last_steps: number of final steps that always compute, when the sample's step count is known
            (given by a batch runner or ``FastCache.set_run``). Default ``0``: the last step's output
            barely reaches the image (measured sensitivity ~1e-8 of the first step's).
        calibration: path of a calibration file (or a loaded ``CacheProfile``); ``None`` looks for
            ``fastcache_calibration.safetensors`` in the directory the transformer was loaded from.
            Default ``None``.
        use_calibration: set ``False`` to ignore any calibration file: unit forecast gain, no noise
            floor, unit phase weights. Default ``True``.
        token_granularity: computed-token counts are rounded up to a multiple of this (``None``:
            1/16 of the image tokens) so samples with similar counts share a batched block call.
        knn_neighbors: k of the k-NN density used for token merging. Default ``5``.
        merge_strategy: how ``merge_ratio`` merges: ``"knn"`` (the densest tokens into their most similar
            kept token) or ``"static_bipartite"`` (ToMe-style bipartite matching among the least salient
            tokens only, with proportional attention; DiT and PixArt). Default ``"knn"``.
        refresh_score: which tokens a token refresh computes: ``"forecast_error"`` (largest error of the
            forecast at the sample's last real compute), ``"input_change"`` (largest relative change of
            the stack input since then) or ``"slope"`` (largest forecast slope). Default
            ``"forecast_error"``.
        refresh_context: the attention context of a token refresh: ``"kept"`` (the other tokens' keys
            and values of the last real compute, the refreshed ones replaced) or ``"forecast"`` (keys
            and values extrapolated along their slope between the last two real computes). Default
            ``"kept"``. ``"none"`` (an ablation): the refreshed tokens attend among themselves only.
        refresh_correction: keep a refreshed token's correction of the forecast until the next real
            compute (``False``: it corrects the refresh step only). Default ``True``.
    """

    enabled: bool = True
    params: CacheParams = field(default_factory=CacheParams)
    first_steps: int = 1
    last_steps: int = 0
    calibration: str | Path | CacheProfile | None = None
    use_calibration: bool = True
    token_granularity: int | None = None
    knn_neighbors: int = 5
    merge_strategy: str = "knn"
    refresh_score: str = "forecast_error"
    refresh_context: str = "kept"
    refresh_correction: bool = True

    def __post_init__(self) -> None:
        if self.refresh_score not in REFRESH_SCORES:
            raise ValueError(f"refresh_score must be one of {', '.join(REFRESH_SCORES)}")
        if self.merge_strategy not in ("knn", "static_bipartite"):
            raise ValueError("merge_strategy must be 'knn' or 'static_bipartite'")
        if self.refresh_context not in REFRESH_CONTEXTS:
            raise ValueError(f"refresh_context must be one of {', '.join(REFRESH_CONTEXTS)}")
        if self.first_steps < 0 or self.last_steps < 0:
            raise ValueError("first_steps and last_steps must be >= 0")
        if self.knn_neighbors < 1:
            raise ValueError("knn_neighbors must be >= 1")
