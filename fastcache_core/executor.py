"""``BlockExecutor``: what every mode of the stack loop runs blocks with.

It holds the transformer's blocks and adapter, the pooled cache tensors and history, the cached index
tensors and the methods' context, and runs a range of blocks on some rows and tokens. The stack loop
(``stack.py``), the first-block mode (``first_block.py``), token-selecting computes
(``token_selection.py``) and the counters (``accounting.py``) all work through it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from fastcache_core.adapters import TransformerAdapter
from fastcache_core.config import FastCacheConfig
from fastcache_core.forecast import StackHistory
from fastcache_core.kv_context import KVContext
from fastcache_core.methods import MethodContext
from fastcache_core.profile import CacheProfile
from fastcache_core.rows import IndexCache, take
from fastcache_core.state import RowPool
from fastcache_core.step import StepContext


class BlockExecutor:
    """Runs blocks for one attached transformer. ``block_callables`` returns what really computes each
    block (``hooks.block_callables``)."""

    def __init__(
        self,
        transformer: torch.nn.Module,
        adapter: TransformerAdapter,
        blocks: list[torch.nn.Module],
        config: FastCacheConfig,
        profile: CacheProfile,
        pool: RowPool,
        history: StackHistory,
        block_callables: Callable[[], list[Any]],
    ) -> None:
        self.transformer = transformer
        self.adapter = adapter
        self.blocks = blocks
        self.config = config
        self.context = MethodContext(profile=profile, first_steps=config.first_steps)
        self.pool = pool
        self.history = history
        self.block_callables = block_callables
        self.indices = IndexCache()
        self.kv = KVContext(pool)
        """Keys and values kept for token refreshes (``kv_context.py``)."""
        self.step: StepContext | None = None
        """The step being run (``None`` between steps)."""

    # ------------------------------------------------------------------ blocks

    def blocks_run(
        self,
        call: dict[str, Any],
        index: torch.Tensor | None,
        image: torch.Tensor,
        text: torch.Tensor | None,
        positions: torch.Tensor | None,
        start: int,
        stop: int | None = None,
        record_kv: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Run blocks ``start..stop`` really on the rows ``index`` of the batch (``None``: all rows);
        ``record_kv``: every token of every row runs, and their keys and values are kept for token refreshes."""
        if not (record_kv and self.supports_refresh):
            return self._run_blocks(call, index, image, text, positions, start, stop)
        step = self.step
        assert step is not None
        self.kv.install(self.self_attentions())
        batch_slots = self.indices.tensor(tuple(r.slot for r in step.rows), image.device, torch.long)
        slots = take(batch_slots, index)
        gap = None
        if self.config.refresh_context == "forecast" and step.times is not None:
            gap = self.history.inverse_gap(slots, take(step.times, index))
        with self.kv.recording(slots, gap):
            return self._run_blocks(call, index, image, text, positions, start, stop)

    def _run_blocks(
        self,
        call: dict[str, Any],
        index: torch.Tensor | None,
        image: torch.Tensor,
        text: torch.Tensor | None,
        positions: torch.Tensor | None,
        start: int,
        stop: int | None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        step = self.step
        assert step is not None
        adapter = self.adapter
        callables = self.block_callables()[start:stop]
        step.running = True
        try:
            for block in callables:
                image, text = adapter.call_block(block, call, index, image, text, positions)
        finally:
            step.running = False
        return image, text

    @property
    def supports_refresh(self) -> bool:
        """Whether this family's self-attention keeps keys and values for token refreshes."""
        return self.adapter.self_attention(self.blocks[0]) is not None

    def self_attentions(self) -> list[torch.nn.Module]:
        """Each block's image self-attention (token refresh families only)."""
        found = [self.adapter.self_attention(block) for block in self.blocks]
        return [a for a in found if a is not None]

    # ------------------------------------------------------------------ small helpers

    def gains(self, step: StepContext, rows: list[int], like: torch.Tensor) -> torch.Tensor:
        """Per-row first-order forecast gains (each row's method decides), as a cached tensor."""
        context = self.context
        sample_of = {r: k for k, rs in enumerate(step.sample_rows) for r in rs}
        gains = tuple(
            step.samples[sample_of[r]].method.forecast_gain(step.samples[sample_of[r]], context) for r in rows
        )
        return self.indices.tensor(gains, like.device, like.dtype)

    def projection(self, like: torch.Tensor) -> torch.Tensor | None:
        weight = self.adapter.output_projection(self.transformer)
        if weight is None or weight.shape[-1] != like.shape[-1]:
            return None
        return weight.detach()

    def output_width(self, like: torch.Tensor) -> int:
        projection = self.projection(like)
        return like.shape[-1] if projection is None else projection.shape[0]
