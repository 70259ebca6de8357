"""Token refresh: between real computes, run the stack on the tokens whose forecast drifts most.

A sample in ``REFRESH`` mode takes the forecast of its whole stack output (``forecast.py``), and a
share ``refresh_fraction`` of its image tokens also runs every block, their queries attending over
*all* tokens: the others' keys and values come from the sample's last real compute, refreshed where
tokens ran since (``kv_context.py``). The refreshed tokens' outputs replace the forecast there, and
their difference from it is kept as a per-token *correction* that is added to the sample's forecasts
until its next real compute, which resets it (the forecast's slope is always taken between two real
computes of every token).

Which tokens (``FastCacheConfig.refresh_score``), per sample, summed over its guidance rows:
``forecast_error``: the largest error of the forecast at the last real compute (measured there, one
fused operation per number); ``input_change``: the largest relative change of the stack input since
the last real compute; ``slope``: the largest forecast slope. Rows refreshing equally many tokens share
one call of each block; positions are per row, so nothing mixes rows.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from fastcache_core.executor import BlockExecutor
from fastcache_core.rows import StackPart, take
from fastcache_core.state import gather_rows, write_rows
from fastcache_core.step import StepContext
from fastcache_core.tokens import gather_tokens, relative_token_change, scatter_tokens, top_tokens

_CORRECTION, _ERROR = "refresh.correction", "refresh.error"


class TokenRefresh:
    """Token refreshes and their corrections for a ``BlockExecutor`` (see the module docstring)."""

    def __init__(self, runner: BlockExecutor) -> None:
        self.runner = runner

    # ------------------------------------------------------------------ the REFRESH mode

    def run(
        self,
        step: StepContext,
        call: dict[str, Any],
        members: list[int],
        rows: list[int],
        image: torch.Tensor,
        text: torch.Tensor | None,
        slots: torch.Tensor,
    ) -> tuple[StackPart, dict[int, int]]:
        """Stack outputs of the refreshing samples ``members`` (batch rows ``rows``), and how many tokens
        each refreshed."""
        runner = self.runner
        index = runner.indices.rows(rows, image)
        x, row_slots = take(image, index), take(slots, index)
        n_tokens = x.shape[1]
        local = {r: i for i, r in enumerate(rows)}
        forecast = runner.history.forecast(row_slots, take(step.times, index), runner.gains(step, rows, x), x)
        scores = self._scores(x, row_slots, forecast)
        groups: dict[int, list[int]] = {}
        counts: dict[int, int] = {}
        for k in members:
            counts[k] = self.token_count(step.samples[k].refresh_fraction, n_tokens)
            groups.setdefault(counts[k], []).append(k)
        y = forecast.clone()
        correction = self._correction(x)
        for count, group in groups.items():
            group_local = [local[r] for k in group for r in step.sample_rows[k]]
            sub = runner.indices.index(group_local, x.device)
            # one position set per sample (its guidance rows together), from the score summed over its rows
            per_sample = [
                top_tokens(self._sample_score(scores, [local[r] for r in step.sample_rows[k]]), count) for k in group
            ]
            positions = torch.stack([p for k, p in zip(group, per_sample, strict=True) for _ in step.sample_rows[k]])
            g_slots = row_slots.index_select(0, sub)
            g_index = sub if index is None else index.index_select(0, sub)
            g_text = None if text is None else take(text, g_index)
            gx = gather_tokens(x.index_select(0, sub), positions)
            out = self._run_tokens(step, call, g_index, g_slots, gx, g_text, positions, n_tokens)
            g_forecast = forecast.index_select(0, sub)
            if runner.config.refresh_correction:
                write_rows(correction, g_slots, positions, out - gather_tokens(g_forecast, positions))
            y.index_copy_(0, sub, scatter_tokens(g_forecast + gather_rows(correction, g_slots, None), positions, out))
        return StackPart(rows, y, take(text, index), text_known=text is None), counts

    def _run_tokens(
        self,
        step: StepContext,
        call: dict[str, Any],
        g_index: torch.Tensor,
        g_slots: torch.Tensor,
        gx: torch.Tensor,
        g_text: torch.Tensor | None,
        positions: torch.Tensor,
        n_tokens: int,
    ) -> torch.Tensor:
        """The refreshed tokens ``gx`` through every block, over the context ``refresh_context`` names."""
        runner = self.runner
        context = runner.config.refresh_context
        if context == "none":  # an ablation: the refreshed tokens attend among themselves only
            return runner.blocks_run(call, g_index, gx, g_text, None, 0)[0]
        since = runner.history.since(g_slots, take(step.times, g_index)) if context == "forecast" else None
        with runner.kv.refreshing(g_slots, positions, n_tokens, since):
            return runner.blocks_run(call, g_index, gx, g_text, None, 0)[0]

    def token_count(self, fraction: float, n_tokens: int) -> int:
        """Tokens refreshed at ``fraction``: rounded up to the token granularity, so samples share calls."""
        granularity = self.runner.config.token_granularity or max(1, n_tokens // 16)
        count = max(granularity, math.ceil(fraction * n_tokens / granularity) * granularity)
        return min(n_tokens, count)

    # ------------------------------------------------------------------ forecasts and real computes

    def corrected(self, forecast: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """``forecast`` of rows ``slots`` plus the corrections of their last refreshes."""
        return forecast + gather_rows(self._correction(forecast), slots, None)

    def after_compute(
        self, slots: torch.Tensor, times: torch.Tensor, gains: torch.Tensor, outputs: torch.Tensor
    ) -> None:
        """At a real compute of refreshing rows (before the history records it): measure each token's
        forecast error for the next refreshes' choice, and reset the corrections."""
        runner = self.runner
        if runner.config.refresh_score == "forecast_error":
            forecast = runner.history.forecast(slots, times, gains, outputs)
            error = (forecast - outputs).float().pow(2).sum(-1)
            pool = runner.pool.get(_ERROR, (outputs.shape[1],), torch.float32, outputs.device)
            write_rows(pool, slots, None, error)
        correction = self._correction(outputs)
        correction.index_fill_(0, slots, 0)

    # ------------------------------------------------------------------ helpers

    def _correction(self, like: torch.Tensor) -> torch.Tensor:
        return self.runner.pool.get(_CORRECTION, tuple(like.shape[1:]), like.dtype, like.device)

    def _sample_score(self, scores: torch.Tensor, local_rows: list[int]) -> torch.Tensor:
        """One sample's per-token score, summed over its rows, (N,)."""
        return scores.index_select(0, self.runner.indices.index(local_rows, scores.device)).sum(0)

    def _scores(self, x: torch.Tensor, slots: torch.Tensor, forecast: torch.Tensor) -> torch.Tensor:
        """Each row's per-token score (rows, N): the tokens with the largest refresh first."""
        runner = self.runner
        score = runner.config.refresh_score
        if score == "forecast_error":
            return gather_rows(runner.pool.get(_ERROR, (x.shape[1],), torch.float32, x.device), slots, None)
        if score == "input_change":
            previous = gather_rows(runner.pool.get("history.in", tuple(x.shape[1:]), x.dtype, x.device), slots, None)
            change, norm_sq = relative_token_change(x, previous)
            return change / norm_sq.clamp_min(1e-12)
        slope = gather_rows(runner.pool.get("history.slope", tuple(x.shape[1:]), x.dtype, x.device), slots, None)
        return slope.float().pow(2).sum(-1)
