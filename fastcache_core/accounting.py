"""The per-sample counters of one step: blocks computed and approximated, tokens, and estimated MACs.

MACs are measured, not assumed: ``BlockCostModel`` runs the stack once per shape under torch's FLOP
counter and fits the cost against the token count (``stats.py``). Forecasts and residual reuse cost
one fused operation per output number; error measurements are counted where they run (``stack.py``).
"""

from __future__ import annotations

from typing import Any

import torch

from fastcache_core.executor import BlockExecutor
from fastcache_core.stats import BlockCostModel
from fastcache_core.step import StepContext


class StepAccounting:
    """Counters for a ``BlockExecutor``'s steps (see the module docstring)."""

    def __init__(self, runner: BlockExecutor) -> None:
        self.runner = runner
        self.costs = BlockCostModel()
        self._call: tuple[dict[str, Any], torch.Tensor, torch.Tensor | None] | None = None

    def begin(self, call: dict[str, Any], image: torch.Tensor, text: torch.Tensor | None) -> None:
        """Remember the step's block call: a new shape's cost is measured on it."""
        self._call = (call, image, text)

    def end(self) -> None:
        self._call = None

    def count_full_cost(self, step: StepContext, image: torch.Tensor) -> None:
        """What the step would cost uncached, for every sample (the MAC fraction's denominator)."""
        full = self.stack_macs(image.shape[1])
        for sample, rows in zip(step.samples, step.sample_rows, strict=True):
            sample.stats.macs_full += full * len(rows)

    def count_skips(self, step: StepContext, rows: list[int], image: torch.Tensor) -> None:
        """Counters of samples whose whole stack was forecast or reused (one fused op per number)."""
        wanted = set(rows)
        per_row = image.shape[1] * image.shape[2]
        blocks = len(self.runner.blocks)
        for sample, sample_rows in zip(step.samples, step.sample_rows, strict=True):
            if sample_rows[0] in wanted:
                sample.stats.blocks_approximated += blocks
                sample.stats.macs_computed += per_row * len(sample_rows)

    def count_computes(
        self, step: StepContext, members: list[int], computed_tokens: dict[int, int], tokens: int
    ) -> None:
        """Counters of samples whose whole stack ran (on ``computed_tokens[k]`` of ``tokens`` tokens)."""
        blocks = len(self.runner.blocks)
        for k in members:
            sample = step.samples[k]
            sample.stats.blocks_computed += blocks
            sample.stats.tokens_computed += computed_tokens[k]
            sample.stats.tokens_total += tokens
            sample.stats.macs_computed += self.stack_macs(computed_tokens[k]) * len(step.sample_rows[k])

    def count_refreshes(self, step: StepContext, members: list[int], refreshed: dict[int, int], tokens: int) -> None:
        """Counters of samples whose stack was forecast with ``refreshed[k]`` of ``tokens`` tokens run through
        it (attending over all ``tokens``), plus the forecast and the correction (one op per number each)."""
        blocks = len(self.runner.blocks)
        assert self._call is not None
        width = self._call[1].shape[-1]
        for k in members:
            sample = step.samples[k]
            sample.stats.blocks_approximated += blocks
            sample.stats.tokens_computed += refreshed[k]
            sample.stats.tokens_total += tokens
            per_row = self.stack_macs_partial(refreshed[k], tokens) + 2 * tokens * width
            sample.stats.macs_computed += per_row * len(step.sample_rows[k])

    def stack_macs_partial(self, queries: int, tokens: int) -> float:
        """Measured MACs of the stack on one row when ``queries`` of ``tokens`` tokens run, attending over all."""
        self.stack_macs(tokens)  # fits this shape's cost model if it is new
        return self.costs.partial_macs(self._shape_key(None), queries, tokens)

    def _shape_key(self, stop: int | None) -> tuple[Any, ...]:
        """The cost model's key: blocks ``0..stop`` at this step's token counts, width and dtype."""
        assert self._call is not None
        _, image, text = self._call
        return (stop, image.shape[1], None if text is None else text.shape[1], image.shape[-1], image.dtype)

    def stack_macs(self, tokens: int, stop: int | None = None) -> float:
        """Measured MACs of blocks ``0..stop`` on one row with ``tokens`` image tokens (BlockCostModel)."""
        assert self._call is not None
        call, image, text = self._call
        runner = self.runner
        full_tokens = image.shape[1]

        def measure(n: int) -> None:
            first = runner.indices.index([0], image.device)
            positions = torch.arange(n, device=image.device)[None] if runner.adapter.needs_shared_positions else None
            runner.blocks_run(call, first, image[:1, :n], None if text is None else text[:1], positions, 0, stop)

        return self.costs.macs(self._shape_key(stop), tokens, measure, full_tokens)
