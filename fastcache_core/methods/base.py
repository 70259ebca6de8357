"""What a per-sample cache method is: the interface the stack loop talks to, and nothing else.

A method decides, for one sample at one step, which *mode* the sample's rows take; the stack loop
(``stack.py``) groups the rows of a batch by mode and runs each group's blocks once. A method never
sees tensors: the loop hands it the scalars it asks for (a relative input change, a first block's
residual change, a forecast error), so this package imports no torch and the API can read the registry.

Modes the loop knows how to run:

* ``COMPUTE``: the rows run the whole block stack; the output is recorded in the sample's history.
* ``FORECAST``: the stack output is extrapolated from the history (``forecast.py``) with the gain the
  method gives.
* ``REUSE``: the last computed residual is added to the current input.
* ``FIRST_BLOCK``: block 0 runs; the method then decides from block 0's residual change whether the
  tail is reused or runs too.
* ``REFRESH``: the stack output is forecast, and a share of the image tokens (:meth:`CacheMethod.
  refresh_fraction`) runs the whole stack, attending over the cached keys and values of the others
  (``token_refresh.py``); their outputs correct the forecast until the next real compute. Families
  without the attention processor for it (SD3, Flux) forecast instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

if TYPE_CHECKING:
    from fastcache_core.profile import CacheProfile

COMPUTE, FORECAST, REUSE, FIRST_BLOCK, REFRESH = "compute", "forecast", "reuse", "first_block", "refresh"
MODES = (COMPUTE, FORECAST, REUSE, FIRST_BLOCK, REFRESH)

INPUT_CHANGE = "input_change"
"""A probe: the relative L1 change of the first block's timestep-modulated input since the sample's
previous step (TeaCache's indicator)."""


@dataclass(frozen=True)
class TokenPlan:
    """How a sample's real computes select and merge tokens (FastCache's spatial side).

    Args:
        motion_threshold: relative token change below which a token is static; ``0`` = off.
        motion_fraction: share of the most salient tokens computed; ``1`` = off.
        merge_ratio: share of the computed tokens merged into their nearest neighbour; ``0`` = off.
        max_static_computes: a token left static for this many real computes is computed again.
    """

    motion_threshold: float
    motion_fraction: float
    merge_ratio: float
    max_static_computes: int

    @property
    def selects(self) -> bool:
        """Whether some tokens may be left out of the blocks (by threshold or fraction)."""
        return self.motion_threshold > 0.0 or self.motion_fraction < 1.0


class RequestSettings(Protocol):
    """A request's cache fields as a method reads them, every one set (``config.ResolvedCacheParams``)."""

    @property
    def tolerance(self) -> float: ...
    @property
    def significance(self) -> float: ...
    @property
    def motion_threshold(self) -> float: ...
    @property
    def motion_fraction(self) -> float: ...
    @property
    def merge_ratio(self) -> float: ...
    @property
    def max_skip_steps(self) -> int: ...
    @property
    def refresh_fraction(self) -> float: ...


class SampleView(Protocol):
    """What a method sees of one sample (``state.SampleState``): its run, progress and own state."""

    step: int
    """Index of the current step."""
    num_steps: int | None
    guidance_scale: float | None
    computes: int
    """Real computes of the whole stack so far (after a compute: counting it)."""
    last_compute: int
    phase: int
    time: float
    """Normalized time of the current step (1 = pure noise)."""
    method_params: Any
    method_state: Any
    stats: Any
    """The sample's counters (``stats.SampleStats``); a method may record what it decided in
    ``stats.details``."""


@dataclass(frozen=True)
class MethodContext:
    """What every method may read besides its sample: the model's calibration and the cache's
    model-level settings."""

    profile: CacheProfile
    first_steps: int


class CacheMethod:
    """One per-sample cache method. Subclasses set ``name`` and override what they use.

    Per-sample state lives in ``sample.method_state`` (made by :meth:`new_state`); the method object
    itself holds nothing per sample, so one instance serves every cache and thread.
    """

    name: ClassVar[str] = ""
    request_fields: ClassVar[tuple[str, ...]] = ()
    """``CacheParams`` fields this method reads (the rest are ignored for it)."""
    summary: ClassVar[str] = ""
    """One line for docs, ``--help`` and ``GET /v1/models/{id}``."""

    def params(self, resolved: RequestSettings) -> Any:
        """This method's own settings, built from a request's resolved ``CacheParams``."""
        return None

    def new_state(self, params: Any) -> Any:
        """Fresh per-sample state."""
        return None

    def approximator(self, profile: CacheProfile) -> str:
        """How skipped work is filled, for the stats: "fitted forecast", "taylor order 1",
        "residual reuse" or "none"."""
        return "none"

    def probe(self, sample: SampleView, context: MethodContext) -> str | None:
        """A scalar the method needs before it can choose a mode this step (e.g. ``INPUT_CHANGE``)."""
        return None

    def mode(self, sample: SampleView, context: MethodContext, probe: float | None) -> str:
        """The sample's mode at its current step (forced warm-up steps never reach the method)."""
        return COMPUTE

    def reuses_tail(self, sample: SampleView, first_block_change: float) -> bool:
        """``FIRST_BLOCK`` mode only: whether blocks 1.. are reused, given block 0's relative residual
        change since the sample's last compute of them."""
        return False

    def forecast_gain(self, sample: SampleView, context: MethodContext) -> float:
        """``FORECAST`` mode only: the first-order gain of the forecast (1 = Taylor's first order)."""
        return 1.0

    def token_plan(self, sample: SampleView) -> TokenPlan | None:
        """How real computes select or merge tokens; ``None``: every token runs every block."""
        return None

    def refresh_fraction(self, sample: SampleView) -> float:
        """``REFRESH`` mode: the share of image tokens refreshed (``0``: the method never refreshes tokens;
        then real computes need not keep keys and values)."""
        return 0.0

    def keeps_inputs(self, sample: SampleView) -> bool:
        """Whether real computes must store the stack input (residual reuse needs it)."""
        return False

    def measures_forecast_error(self, sample: SampleView, context: MethodContext) -> bool:
        """Whether the loop measures, at this real compute, the error of the forecast that would have
        been used (one device-to-host read per compute step while any sample asks)."""
        return False

    def after_compute(
        self, sample: SampleView, context: MethodContext, forecast_error: float | None, dof: int, gap: int
    ) -> None:
        """Called after each real compute of the whole stack (``sample.computes`` counts it already).

        ``forecast_error`` is the relative error of the forecast that would have been used (``None``
        unless :meth:`measures_forecast_error` asked), ``dof`` the number of output numbers it was
        measured over, ``gap`` the steps since the previous real compute.
        """
