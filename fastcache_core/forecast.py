"""Forecasting a sample's stack output from its own history of real computes.

Between real computes the output of the whole block stack of a sample is extrapolated in time:

    Y_hat(t) = Y(t_k) + g * (t - t_k) * (Y(t_k) - Y(t_{k-1})) / (t_k - t_{k-1})

with ``t`` the normalized time of the step (so uneven step spacings are handled), ``t_k`` and
``t_{k-1}`` the sample's last two real computes and ``g`` the calibrated first-order gain of the
phase (1 = TaylorSeer's first order). After a single compute the slope is zero (plain reuse). Every
block of the sample refreshes at the same step, so the slope is always taken between two consistent
real outputs; chained per-block approximations, whose errors compound, are not used.

``StackHistory`` keeps, per batch-row slot of a ``RowPool``, the last real output, its slope, the
time of the last compute and how many computes were seen. Updates and forecasts are tensor
operations on the device with no host round trip.

Times, slopes and the forecast's arithmetic are float32 whatever the model's dtype: in bfloat16 (8
mantissa bits) normalized times near 1 are rounded to 0.004, a 100-step run's spacing of 0.01 by up to
40%, and a slope, a difference of two close outputs, keeps two or three significant bits. The last
output itself stays in the model's dtype (it is what the model produced).
"""

from __future__ import annotations

import torch

from fastcache_core.state import RowPool, gather_rows, write_rows

_OUT, _SLOPE, _TIME, _COUNT, _IN = "history.out", "history.slope", "history.time", "history.count", "history.in"


class StackHistory:
    """Per-slot history of a sample's real stack outputs (pooled; see the module docstring)."""

    def __init__(self, pool: RowPool) -> None:
        self.pool = pool

    def _tensor(self, name: str, like: torch.Tensor) -> torch.Tensor:
        return self.pool.get(name, tuple(like.shape[1:]), like.dtype, like.device)

    def _slopes(self, like: torch.Tensor) -> torch.Tensor:
        return self.pool.get(_SLOPE, tuple(like.shape[1:]), torch.float32, like.device)

    def _scalars(self, name: str, like: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.pool.get(name, (), dtype, like.device)

    def forecast(
        self, slots: torch.Tensor, times: torch.Tensor, gains: torch.Tensor, like: torch.Tensor
    ) -> torch.Tensor:
        """Forecast stack outputs of rows ``slots`` at normalized ``times`` (R,) with per-row ``gains`` (R,).

        ``like`` is any tensor with the per-row shape, dtype and device of the stack output.
        """
        last = gather_rows(self._tensor(_OUT, like), slots, None)
        slope = gather_rows(self._slopes(like), slots, None)
        since = (times.float() - self._scalars(_TIME, like).index_select(0, slots)) * gains.float()
        forecast = torch.addcmul(last.float(), since.view(-1, *([1] * (last.ndim - 1))), slope)
        return forecast.to(like.dtype)

    def record(self, slots: torch.Tensor, times: torch.Tensor, outputs: torch.Tensor) -> None:
        """Store real stack ``outputs`` of rows ``slots`` computed at normalized ``times``."""
        out_pool, slope_pool = self._tensor(_OUT, outputs), self._slopes(outputs)
        time_pool = self._scalars(_TIME, outputs)
        count_pool = self._scalars(_COUNT, outputs, torch.int32)
        previous = gather_rows(out_pool, slots, None)
        step = times.float() - time_pool.index_select(0, slots)
        usable = (count_pool.index_select(0, slots) > 0) & (step != 0)
        inverse = torch.where(usable, 1.0 / torch.where(usable, step, torch.ones_like(step)), torch.zeros_like(step))
        change = outputs.float() - previous.float()
        write_rows(slope_pool, slots, None, change * inverse.view(-1, *([1] * (outputs.ndim - 1))))
        write_rows(out_pool, slots, None, outputs)
        time_pool.index_copy_(0, slots, times.to(time_pool.dtype))
        count_pool.index_add_(0, slots, torch.ones_like(slots, dtype=torch.int32))

    def since(self, slots: torch.Tensor, times: torch.Tensor) -> torch.Tensor:
        """``t - t_k`` per row: normalized time since the rows' last real compute, (R,)."""
        return times - self._scalars(_TIME, times).index_select(0, slots)

    def inverse_gap(self, slots: torch.Tensor, times: torch.Tensor) -> torch.Tensor:
        """``1 / (t - t_k)`` per row, 0 for rows without an earlier compute (a first slope is zero)."""
        step = self.since(slots, times)
        usable = (self._scalars(_COUNT, times, torch.int32).index_select(0, slots) > 0) & (step != 0)
        return torch.where(usable, 1.0 / torch.where(usable, step, torch.ones_like(step)), torch.zeros_like(step))

    def record_input(self, slots: torch.Tensor, inputs: torch.Tensor) -> None:
        """Store the stack input of a real compute (residual reuse needs it)."""
        write_rows(self._tensor(_IN, inputs), slots, None, inputs)

    def residual_reuse(self, slots: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
        """``X(t) + (Y(t_k) - X(t_k))``: the last computed residual applied to the current input."""
        last_in = gather_rows(self._tensor(_IN, inputs), slots, None)
        last_out = gather_rows(self._tensor(_OUT, inputs), slots, None)
        return inputs + (last_out - last_in)


def guided_error(
    forecast: torch.Tensor,
    real: torch.Tensor,
    projection: torch.Tensor | None,
    guidance_scale: float | None,
    cond_row: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """One sample's forecast error in what the sampler integrates, through the output projection ``P``
    (``None``: identity): ``||P e||^2`` and ``||P Y_c||^2`` (float32 scalars on the device) and the number
    of output numbers ``n`` of ``P e``.

    With guidance (two rows, ``cond_row`` the conditional one) ``e = g (Yhat_c - Y_c) + (1 - g) (Yhat_u -
    Y_u)``: the guided prediction's error, so a sample at high guidance, whose error the sampler
    amplifies, measures more. Otherwise ``e`` is every row's error (and ``P Y`` every row's).
    """
    difference = (forecast - real).float()
    reference = real.float()
    if projection is not None:
        weight = projection.float()
        difference = difference @ weight.T
        reference = reference @ weight.T
    if guidance_scale is not None and difference.shape[0] == 2:
        g = float(guidance_scale)
        combined = g * difference[cond_row] + (1.0 - g) * difference[1 - cond_row]
        return combined.pow(2).sum(), reference[cond_row].pow(2).sum(), combined.numel()
    return difference.pow(2).sum(), reference.pow(2).sum(), difference.numel()
