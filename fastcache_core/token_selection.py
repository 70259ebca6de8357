"""Real computes that run only some tokens of a sample: saliency-based selection and k-NN merging.

At a real compute of a sample whose method has a token plan, its moving tokens (saliency of the stack
input against its input at the last real compute) run the blocks and the static ones take the
forecast; the densest computed tokens may be merged into their nearest neighbour and unmerged after.
Rows with equal token counts share block calls. The tensor operations live in ``tokens.py``.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from fastcache_core.executor import BlockExecutor
from fastcache_core.rows import take
from fastcache_core.state import gather_rows
from fastcache_core.step import StepContext
from fastcache_core.tokens import (
    gather_tokens,
    knn_merge,
    knn_unmerge,
    motion_token_count,
    relative_token_change,
    scatter_tokens,
    static_bipartite_merge,
    top_tokens,
)


class TokenSelection:
    """Token-selecting computes for a ``BlockExecutor`` (see the module docstring)."""

    def __init__(self, runner: BlockExecutor) -> None:
        self.runner = runner

    def compute(
        self,
        step: StepContext,
        call: dict[str, Any],
        members: list[int],
        rows: list[int],
        index: torch.Tensor | None,
        x: torch.Tensor,
        x_text: torch.Tensor | None,
        row_slots: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor | None, dict[int, int]]:
        """Outputs of the compute samples ``members`` (rows ``rows``; inputs ``x``), some of which run only
        some tokens, and the number of tokens each sample ran."""
        runner = self.runner
        n_tokens = x.shape[1]
        local = {r: i for i, r in enumerate(rows)}
        plans = {k: self._plan(step, k, [local[r] for r in step.sample_rows[k]], x, row_slots) for k in members}
        shared_positions = runner.adapter.needs_shared_positions
        groups: dict[tuple[Any, ...], list[int]] = {}
        for k in members:
            positions, merge = plans[k]
            count = n_tokens if positions is None else positions.numel()
            own = shared_positions and (positions is not None or merge > 0)
            groups.setdefault((count, merge, k if own else None), []).extend(step.sample_rows[k])
        y = torch.empty_like(x)
        y_text: torch.Tensor | None = None
        text_missing = False
        sample_of_row = {r: k for k in members for r in step.sample_rows[k]}
        computed: dict[int, int] = {}
        for (count, merge, _), group_rows in groups.items():
            sub = runner.indices.index([local[r] for r in group_rows], x.device)
            g_index = sub if index is None else index.index_select(0, sub)
            gx = x.index_select(0, sub)
            g_text = None if x_text is None else x_text.index_select(0, sub)
            if count == n_tokens and not merge:
                record = any(step.samples[sample_of_row[r]].refresh_fraction > 0 for r in group_rows)
                gy, gy_text = runner.blocks_run(call, g_index, gx, g_text, None, 0, record_kv=record)
            else:
                planned = [plans[sample_of_row[r]][0] for r in group_rows]
                gy, gy_text, count = self._run_selected(
                    step, call, group_rows, g_index, gx, g_text, row_slots.index_select(0, sub), planned, merge
                )
            y.index_copy_(0, sub, gy)
            if gy_text is None:
                text_missing = True
            elif x_text is not None:
                y_text = torch.empty_like(x_text) if y_text is None else y_text
                y_text.index_copy_(0, sub, gy_text)
            for r in group_rows:
                computed[sample_of_row[r]] = count
        return y, (None if text_missing else y_text), computed

    def _run_selected(
        self,
        step: StepContext,
        call: dict[str, Any],
        group_rows: list[int],
        g_index: torch.Tensor,
        gx: torch.Tensor,
        g_text: torch.Tensor | None,
        g_slots: torch.Tensor,
        planned: list[torch.Tensor | None],
        merge: int,
    ) -> tuple[torch.Tensor, torch.Tensor | None, int]:
        """One group's blocks on its selected (and merged) tokens; static tokens take the forecast."""
        runner = self.runner
        n_tokens = gx.shape[1]
        full = torch.arange(n_tokens, device=gx.device)
        positions = torch.stack([full if p is None else p for p in planned])
        selected = gather_tokens(gx, positions)
        merged, merge_info, block_positions = selected, None, positions
        bipartite = merge and runner.config.merge_strategy == "static_bipartite" and runner.supports_refresh
        if bipartite:
            inputs = runner.pool.get("history.in", tuple(gx.shape[1:]), gx.dtype, gx.device)
            change, norm_sq = relative_token_change(selected, gather_rows(inputs, g_slots, positions))
            merged, merge_info = static_bipartite_merge(selected, change / norm_sq.clamp_min(1e-12), merge)
        elif merge:
            merged, merge_info = knn_merge(selected, merge, runner.config.knn_neighbors)
        if merge_info is not None:
            block_positions = positions.gather(1, merge_info.kept)
        if bipartite and merge_info is not None and merge_info.sizes is not None:
            runner.kv.install(runner.self_attentions())
            with runner.kv.proportional(merge_info.sizes):
                out, gy_text = runner.blocks_run(call, g_index, merged, g_text, block_positions, 0)
        else:
            out, gy_text = runner.blocks_run(call, g_index, merged, g_text, block_positions, 0)
        if merge_info is not None:
            out = knn_unmerge(out, merged, selected, merge_info)
        base = gx
        if positions.shape[1] < n_tokens:  # static tokens take the forecast
            base = runner.history.forecast(g_slots, take(step.times, g_index), runner.gains(step, group_rows, gx), gx)
        gy = scatter_tokens(base, positions, out)
        self._update_static_runs(g_slots, positions, gx)
        return gy, gy_text, merged.shape[1]

    def _plan(
        self, step: StepContext, k: int, local_rows: list[int], x: torch.Tensor, row_slots: torch.Tensor
    ) -> tuple[torch.Tensor | None, int]:
        """(moving-token positions or None for all, number of tokens to merge) for one sample."""
        runner = self.runner
        sample = step.samples[k]
        plan = sample.token_plan
        if plan is None or not sample.selects_tokens:
            return None, 0
        n_tokens = x.shape[1]
        positions = None
        count = n_tokens
        if plan.selects:
            sub = runner.indices.index(local_rows, x.device)
            own_slots = row_slots.index_select(0, sub)
            inputs = runner.pool.get("history.in", tuple(x.shape[1:]), x.dtype, x.device)
            saliency, norm_sq = relative_token_change(x.index_select(0, sub), gather_rows(inputs, own_slots, None))
            saliency, norm_sq = saliency.sum(0), norm_sq.sum(0)
            granularity = runner.config.token_granularity or max(1, n_tokens // 16)
            count = motion_token_count(saliency, norm_sq, plan.motion_threshold, plan.motion_fraction, granularity)
            if count < n_tokens:
                # guard: a token left static for max_static_computes computes is computed again
                stale = self._static_runs(x).index_select(0, own_slots[:1])[0] >= plan.max_static_computes
                count = min(n_tokens, max(count, int(stale.sum())))
                saliency = torch.where(stale, torch.full_like(saliency, math.inf), saliency)
                positions = top_tokens(saliency, count)
        merge = min(count - 1, int(plan.merge_ratio * count)) if plan.merge_ratio > 0.0 else 0
        return positions, merge

    def _static_runs(self, like: torch.Tensor) -> torch.Tensor:
        """Consecutive real computes each token of each row skipped, (capacity, N) int32."""
        return self.runner.pool.get("tokens.static_runs", (like.shape[1],), torch.int32, like.device)

    def _update_static_runs(self, slots: torch.Tensor, positions: torch.Tensor, like: torch.Tensor) -> None:
        runs = self._static_runs(like)
        runs.index_add_(0, slots, torch.ones_like(runs.index_select(0, slots)))
        runs[slots[:, None], positions] = 0
