"""The block loop of one cached step: which samples compute, which are forecast, and the bookkeeping.

Per step each sample takes one mode, decided from its own state only:

* ``compute``: its rows run the whole block stack (with token selection and merging when its
  params ask for them); the output is recorded in its history. For FastCache samples the forecast
  that would have been used is compared with the real output first, which sets the next horizon
  (``decisions.fastcache_gap``; with the guard on, the only device-to-host read of a compute step);
* ``forecast`` (FastCache, TaylorSeer): the stack output is extrapolated from the history;
* ``reuse`` (TeaCache): the last computed residual is added to the current input;
* ``first_block`` (First-Block-Cache): block 0 runs; the tail is reused when block 0's residual
  barely changed, else it runs too.

All rows in compute mode share one call of each block (one call per token-count group when token
selection is on), and share it with First-Block-Cache rows too: block 0 runs once over both, the tail
once over the compute rows and the First-Block-Cache rows that need it. Block calls have a fixed cost,
so a mixed batch pays it once per block, like a homogeneous one. A batch whose rows all compute runs
the blocks on the batch itself, with no gather or scatter. Index tensors are cached by batch
composition, so steady batches build none.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from fastcache_core.adapters import TransformerAdapter
from fastcache_core.config import FastCacheConfig
from fastcache_core.decisions import (
    fastcache_gap,
    fbcache_reuses_tail,
    settled_horizon,
    taylorseer_computes,
    teacache_rescaled_change,
    teacache_reuses_stack,
)
from fastcache_core.forecast import StackHistory, projected_error
from fastcache_core.profile import CacheProfile
from fastcache_core.state import RowPool, SampleState, gather_rows, write_rows
from fastcache_core.stats import BlockCostModel
from fastcache_core.step import StepContext
from fastcache_core.tokens import (
    gather_tokens,
    knn_merge,
    knn_unmerge,
    motion_token_count,
    relative_token_change,
    scatter_tokens,
    top_tokens,
)

COMPUTE, FORECAST, REUSE, FIRST_BLOCK, TEACACHE = "compute", "forecast", "reuse", "first_block", "teacache"
_MAX_CACHED_INDICES = 512


@dataclass
class _Part:
    """Outputs for some batch rows: ``rows`` (ascending batch indices), image and text streams."""

    rows: list[int]
    image: torch.Tensor
    text: torch.Tensor | None
    text_known: bool = True  # False when the blocks returned no text stream (SD3's last block)


class StackRunner:
    """Executes one step of the block stack for a ``FastCache`` (see the module docstring).

    ``block_callables`` returns what really computes each block (hooks.block_callables).
    """

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
        self.profile = profile
        self.pool = pool
        self.history = history
        self.block_callables = block_callables
        self._step: StepContext | None = None
        self.costs = BlockCostModel()
        self._indices: dict[tuple[Any, ...], torch.Tensor] = {}
        self._measure_call: tuple[dict[str, Any], torch.Tensor, torch.Tensor | None] | None = None

    # ------------------------------------------------------------------ the step

    @torch.no_grad()
    def run(self, step: StepContext, call: dict[str, Any]) -> Any:
        adapter = self.adapter
        image, text = adapter.split_streams(call)
        slots = self._tensor(tuple(r.slot for r in step.rows), image.device, torch.long)
        self._step = step
        self._measure_call = (call, image, text)
        modes = [self._planned_mode(sample) for sample in step.samples]
        if TEACACHE in modes:
            self._decide_teacache(step, call, image, slots, modes)
        rows_of = {
            mode: [r for k, rows in enumerate(step.sample_rows) if modes[k] == mode for r in rows]
            for mode in (COMPUTE, FORECAST, REUSE, FIRST_BLOCK)
        }
        members_of = {mode: [k for k, m in enumerate(modes) if m == mode] for mode in (COMPUTE, FIRST_BLOCK)}
        # plain computes share First-Block-Cache's block calls: each block runs once per step, not twice
        sharing = bool(rows_of[FIRST_BLOCK]) and not any(step.samples[k].selects_tokens for k in members_of[COMPUTE])
        parts: list[_Part] = []
        if rows_of[FORECAST]:
            parts.append(self._forecast(step, rows_of[FORECAST], image, text, slots))
        if rows_of[REUSE]:
            parts.append(self._residual_reuse(rows_of[REUSE], image, text, slots))
        if rows_of[COMPUTE] and not sharing:
            parts.append(self._compute(step, call, members_of[COMPUTE], rows_of[COMPUTE], image, text, slots))
        if rows_of[FIRST_BLOCK]:
            computing = members_of[COMPUTE] if sharing else []
            parts.append(self._first_block(step, call, members_of[FIRST_BLOCK], computing, image, text, slots))
        self._count_full_cost(step, image, text)
        out_image, out_text = self._assemble(parts, image, text)
        self._measure_call = None
        self._step = None
        return adapter.streams_to_output(out_image, out_text)

    def _planned_mode(self, sample: SampleState) -> str:
        p = sample.params
        config = self.config
        if p.method == "none" or p.tolerance <= 0.0 or sample.is_forced(config.first_steps, config.last_steps):
            return COMPUTE
        if p.method == "teacache":
            return TEACACHE
        if p.method == "fbcache":
            return FIRST_BLOCK
        refresh = sample.refresh
        if refresh.computes == 0:
            return COMPUTE
        if p.method == "taylorseer":
            due = taylorseer_computes(sample.step, config.first_steps, p.max_skip_steps + 1)
        else:
            due = sample.step >= refresh.next_compute
        return COMPUTE if due else FORECAST

    # ------------------------------------------------------------------ modes

    def _forecast(
        self, step: StepContext, rows: list[int], image: torch.Tensor, text: torch.Tensor | None, slots: torch.Tensor
    ) -> _Part:
        index = self._rows_index(rows, image)
        y = self.history.forecast(
            self._take(slots, index), self._take(step.times, index), self._gains(step, rows, image), image
        )
        per_row = image.shape[1] * image.shape[2]
        for sample, count in self._samples_of(step, rows):
            sample.stats.blocks_approximated += len(self.blocks)
            sample.stats.macs_computed += per_row * count
        return _Part(rows, y, self._take(text, index))

    def _residual_reuse(
        self, rows: list[int], image: torch.Tensor, text: torch.Tensor | None, slots: torch.Tensor
    ) -> _Part:
        index = self._rows_index(rows, image)
        y = self.history.residual_reuse(self._take(slots, index), self._take(image, index))
        return _Part(rows, y, self._take(text, index))

    def _compute(
        self,
        step: StepContext,
        call: dict[str, Any],
        members: list[int],
        rows: list[int],
        image: torch.Tensor,
        text: torch.Tensor | None,
        slots: torch.Tensor,
    ) -> _Part:
        index = self._rows_index(rows, image)
        row_slots = self._take(slots, index)
        x, x_text = self._take(image, index), self._take(text, index)
        if any(step.samples[k].selects_tokens for k in members):
            y, y_text, computed_tokens = self._compute_selected(step, call, members, rows, index, x, x_text, row_slots)
        else:
            y, y_text = self._blocks(call, index, x, x_text, None, 0)
            computed_tokens = {k: x.shape[1] for k in members}
        self._after_compute(step, members, rows, index, row_slots, x, y)
        self._count_computes(step, members, computed_tokens, image.shape[1])
        return _Part(rows, y, y_text, text_known=y_text is not None or text is None)

    def _count_computes(
        self, step: StepContext, members: list[int], computed_tokens: dict[int, int], tokens: int
    ) -> None:
        for k in members:
            sample = step.samples[k]
            sample.stats.blocks_computed += len(self.blocks)
            sample.stats.tokens_computed += computed_tokens[k]
            sample.stats.tokens_total += tokens
            sample.stats.macs_computed += self._stack_macs(computed_tokens[k]) * len(step.sample_rows[k])

    def _first_block(
        self,
        step: StepContext,
        call: dict[str, Any],
        members: list[int],
        computing: list[int],
        image: torch.Tensor,
        text: torch.Tensor | None,
        slots: torch.Tensor,
    ) -> _Part:
        """First-Block-Cache per sample: block 0 runs, the tail is reused while its residual holds still.

        ``computing`` samples (plain computes) ride along: block 0 runs once over their rows and the
        First-Block-Cache rows, the tail once over theirs and the First-Block-Cache rows that need it.
        """
        both = sorted(members + computing)
        rows = [r for k in both for r in step.sample_rows[k]]
        local = {r: i for i, r in enumerate(rows)}
        fb_rows = [r for k in members for r in step.sample_rows[k]]
        fb_local = [local[r] for r in fb_rows]
        fb_sub = self._subset(fb_local, len(rows), image.device)
        index = self._rows_index(rows, image)
        row_slots = self._take(slots, index)
        x, x_text = self._take(image, index), self._take(text, index)
        first, first_text = self._blocks(call, index, x, x_text, None, 0, stop=1)
        residual = self._take(first, fb_sub) - self._take(x, fb_sub)
        fb_slots = self._take(row_slots, fb_sub)
        pool = self.pool
        first_pool = pool.get("fbcache.first", tuple(residual.shape[1:]), residual.dtype, residual.device)
        tail_pool = pool.get("fbcache.tail", tuple(residual.shape[1:]), residual.dtype, residual.device)
        changes = self._relative_changes(step, members, fb_rows, residual, gather_rows(first_pool, fb_slots, None))
        reused: set[int] = set()
        for k in members:
            sample = step.samples[k]
            if sample.refresh.computes > 0 and fbcache_reuses_tail(changes[k], sample.params.tolerance):
                reused.update(local[r] for r in step.sample_rows[k])
        reuse_rows = sorted(reused)
        tail_rows = [i for i in range(len(rows)) if i not in reused]
        y = torch.empty_like(first)
        if reuse_rows:
            sub = self._tensor(tuple(reuse_rows), x.device, torch.long)
            y.index_copy_(
                0, sub, first.index_select(0, sub) + gather_rows(tail_pool, row_slots.index_select(0, sub), None)
            )
        y_text = first_text
        if tail_rows:
            sub = self._tensor(tuple(tail_rows), x.device, torch.long)
            batch_sub = sub if index is None else index.index_select(0, sub)
            tail, tail_text = self._blocks(
                call,
                batch_sub,
                first.index_select(0, sub),
                None if first_text is None else first_text.index_select(0, sub),
                None,
                1,
            )
            y.index_copy_(0, sub, tail)
            if tail_text is not None and first_text is not None:
                y_text = first_text.clone()
                y_text.index_copy_(0, sub, tail_text)
            elif tail_text is None:
                y_text = None
            fb_set = set(fb_local)
            refreshed = [j for j, i in enumerate(tail_rows) if i in fb_set]
            if refreshed:
                picked = self._tensor(tuple(refreshed), x.device, torch.long)
                fresh = sub.index_select(0, picked)
                fresh_slots = row_slots.index_select(0, fresh)
                fresh_first = first.index_select(0, fresh)
                write_rows(tail_pool, fresh_slots, None, tail.index_select(0, picked) - fresh_first)
                write_rows(first_pool, fresh_slots, None, fresh_first - x.index_select(0, fresh))
        if computing:
            c_local = [local[r] for k in computing for r in step.sample_rows[k]]
            c_sub = self._tensor(tuple(c_local), x.device, torch.long)
            c_rows = [rows[i] for i in c_local]
            c_index = self._tensor(tuple(c_rows), x.device, torch.long)
            self._after_compute(
                step,
                computing,
                c_rows,
                c_index,
                row_slots.index_select(0, c_sub),
                x.index_select(0, c_sub),
                y.index_select(0, c_sub),
            )
            self._count_computes(step, computing, {k: image.shape[1] for k in computing}, image.shape[1])
        first_macs = self._stack_macs(image.shape[1], stop=1)
        full_macs = self._stack_macs(image.shape[1])
        for k in members:
            sample = step.samples[k]
            mine = [local[r] for r in step.sample_rows[k]]
            sample.stats.tokens_computed += image.shape[1]
            sample.stats.tokens_total += image.shape[1]
            if mine[0] in reused:
                sample.stats.blocks_computed += 1
                sample.stats.blocks_approximated += len(self.blocks) - 1
                sample.stats.macs_computed += first_macs * len(mine)
            else:
                sample.stats.blocks_computed += len(self.blocks)
                sample.stats.macs_computed += full_macs * len(mine)
                sample.refresh.computes += 1
                sample.refresh.last_compute = sample.step
        return _Part(rows, y, y_text, text_known=y_text is not None or text is None)

    def _decide_teacache(
        self, step: StepContext, call: dict[str, Any], image: torch.Tensor, slots: torch.Tensor, modes: list[str]
    ) -> None:
        """TeaCache per sample: reuse the stack while the accumulated rescaled input change stays small."""
        members = [k for k, mode in enumerate(modes) if mode == TEACACHE]
        rows = [r for k in members for r in step.sample_rows[k]]
        index = self._rows_index(rows, image)
        adapter = self.adapter
        modulated = adapter.modulated_input(self.blocks[0], adapter.select_rows(call, index), self._take(image, index))
        pool = self.pool.get("teacache.previous", tuple(modulated.shape[1:]), modulated.dtype, modulated.device)
        row_slots = self._take(slots, index)
        changes = self._relative_changes(step, members, rows, modulated, gather_rows(pool, row_slots, None))
        write_rows(pool, row_slots, None, modulated)
        coefficients = self.profile.metadata.get("teacache_coefficients", [1.0, 0.0])
        for k in members:
            sample = step.samples[k]
            if sample.refresh.computes == 0:
                sample.teacache_accumulated = 0.0
                modes[k] = COMPUTE
                continue
            sample.teacache_accumulated += teacache_rescaled_change(coefficients, changes[k])
            if teacache_reuses_stack(sample.teacache_accumulated, sample.params.tolerance):
                modes[k] = REUSE
                sample.stats.blocks_approximated += len(self.blocks)
                sample.stats.macs_computed += image.shape[1] * image.shape[2] * len(step.sample_rows[k])
            else:
                sample.teacache_accumulated = 0.0
                modes[k] = COMPUTE

    @staticmethod
    def _relative_changes(
        step: StepContext, members: list[int], rows: list[int], current: torch.Tensor, previous: torch.Tensor
    ) -> dict[int, float]:
        """Per sample, the relative L1 change ``sum |current - previous| / sum |previous|`` over its rows
        (``rows`` are the batch rows of ``current``), with one device-to-host read for the whole batch."""
        sums = (
            torch.stack([(current - previous).abs().flatten(1).sum(1), previous.abs().flatten(1).sum(1)])
            .float()
            .tolist()
        )
        local = {r: i for i, r in enumerate(rows)}
        changes = {}
        for k in members:
            mine = [local[r] for r in step.sample_rows[k]]
            changes[k] = sum(sums[0][i] for i in mine) / max(sum(sums[1][i] for i in mine), 1e-12)
        return changes

    # ------------------------------------------------------------------ after a real compute

    def _after_compute(
        self,
        step: StepContext,
        members: list[int],
        rows: list[int],
        index: torch.Tensor | None,
        row_slots: torch.Tensor,
        x: torch.Tensor,
        y: torch.Tensor,
    ) -> None:
        """Measure FastCache samples' forecast error, record the outputs, set the next horizons."""
        local = {r: i for i, r in enumerate(rows)}
        guarded = self.profile.guard_slack is not None
        measured = [
            k
            for k in members
            if guarded
            and step.samples[k].params.method == "fastcache"
            and step.samples[k].params.tolerance > 0.0
            and step.samples[k].refresh.computes >= 2
        ]
        errors: dict[int, float] = {}
        if measured:
            mine = [local[r] for k in measured for r in step.sample_rows[k]]
            sub = self._tensor(tuple(mine), y.device, torch.long)
            batch_rows = [rows[i] for i in mine]
            times = self._row_times(step, batch_rows, y)
            forecast = self.history.forecast(row_slots.index_select(0, sub), times, self._gains(step, batch_rows, y), y)
            real = y.index_select(0, sub)
            squared, reference = projected_error(forecast, real, self._projection(y))
            values = torch.stack([squared, reference]).tolist()  # the one host read of this step
            position = {i: j for j, i in enumerate(mine)}
            for k in measured:
                idx = [position[local[r]] for r in step.sample_rows[k]]
                denominator = sum(values[1][j] for j in idx)
                errors[k] = math.sqrt(sum(values[0][j] for j in idx) / denominator) if denominator > 0 else math.inf
            macs = 2 * y.shape[1] * y.shape[2] * self._output_width(y)
            for k in measured:
                step.samples[k].stats.macs_computed += macs * len(step.sample_rows[k])
        self.history.record(row_slots, self._take(step.times, index), y)
        keep_inputs = [local[r] for k in members if _keeps_inputs(step.samples[k]) for r in step.sample_rows[k]]
        if keep_inputs:
            sub = self._tensor(tuple(keep_inputs), y.device, torch.long)
            self.history.record_input(row_slots.index_select(0, sub), x.index_select(0, sub))
        profile = self.profile
        for k in members:
            sample = step.samples[k]
            refresh = sample.refresh
            gap = sample.step - refresh.last_compute if refresh.last_compute >= 0 else 1
            refresh.computes += 1
            refresh.last_compute = sample.step
            if sample.params.method != "fastcache":
                continue
            p = sample.params
            phase = step.phases[k]
            if k in errors:
                refresh.last_error = errors[k]
            horizon = settled_horizon(p.tolerance, profile.drift_scale, p.max_skip_steps)
            slack = profile.guard_slack
            allowance = 0.0 if slack is None else slack * p.tolerance * profile.weight(phase)
            dof = len(step.sample_rows[k]) * y.shape[1] * self._output_width(y)
            refresh.next_compute = sample.step + fastcache_gap(
                refresh, horizon, errors.get(k), profile.floor(phase), allowance, p.significance, dof, gap
            )

    # ------------------------------------------------------------------ token selection and merging

    def _compute_selected(
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
        """Real computes where some samples run only their moving tokens (static tokens take the
        forecast) and may merge dense tokens. Rows with equal token counts share block calls."""
        n_tokens = x.shape[1]
        local = {r: i for i, r in enumerate(rows)}
        plans = {k: self._plan_tokens(step, k, [local[r] for r in step.sample_rows[k]], x, row_slots) for k in members}
        shared_positions = self.adapter.needs_shared_positions
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
            local_rows = [local[r] for r in group_rows]
            sub = self._tensor(tuple(local_rows), x.device, torch.long)
            g_index = sub if index is None else index.index_select(0, sub)
            gx = x.index_select(0, sub)
            g_text = None if x_text is None else x_text.index_select(0, sub)
            if count == n_tokens and not merge:
                gy, gy_text = self._blocks(call, g_index, gx, g_text, None, 0)
            else:
                full = torch.arange(n_tokens, device=x.device)
                planned = [plans[sample_of_row[r]][0] for r in group_rows]
                positions = torch.stack([full if p is None else p for p in planned])
                selected = gather_tokens(gx, positions)
                merged, merge_info, block_positions = selected, None, positions
                if merge:
                    merged, merge_info = knn_merge(selected, merge, self.config.knn_neighbors)
                    block_positions = positions.gather(1, merge_info.kept)
                out, gy_text = self._blocks(call, g_index, merged, g_text, block_positions, 0)
                if merge_info is not None:
                    out = knn_unmerge(out, merged, selected, merge_info)
                base = gx
                if count < n_tokens:  # static tokens take the forecast
                    base = self.history.forecast(
                        row_slots.index_select(0, sub),
                        self._take(step.times, g_index),
                        self._gains(step, group_rows, x),
                        gx,
                    )
                gy = scatter_tokens(base, positions, out)
                self._update_static_runs(row_slots.index_select(0, sub), positions, x)
                count = merged.shape[1]
            y.index_copy_(0, sub, gy)
            if gy_text is None:
                text_missing = True
            elif x_text is not None:
                y_text = torch.empty_like(x_text) if y_text is None else y_text
                y_text.index_copy_(0, sub, gy_text)
            for r in group_rows:
                computed[sample_of_row[r]] = count
        return y, (None if text_missing else y_text), computed

    def _plan_tokens(
        self, step: StepContext, k: int, local_rows: list[int], x: torch.Tensor, row_slots: torch.Tensor
    ) -> tuple[torch.Tensor | None, int]:
        """(moving-token positions or None for all, number of tokens to merge) for one sample."""
        sample = step.samples[k]
        p = sample.params
        if not sample.selects_tokens:
            return None, 0
        n_tokens = x.shape[1]
        positions = None
        count = n_tokens
        if p.motion_threshold > 0.0 or p.motion_fraction < 1.0:
            sub = self._tensor(tuple(local_rows), x.device, torch.long)
            own_slots = row_slots.index_select(0, sub)
            previous = gather_rows(self.pool.get("history.in", tuple(x.shape[1:]), x.dtype, x.device), own_slots, None)
            saliency, norm_sq = relative_token_change(x.index_select(0, sub), previous)
            saliency, norm_sq = saliency.sum(0), norm_sq.sum(0)
            granularity = self.config.token_granularity or max(1, n_tokens // 16)
            count = motion_token_count(saliency, norm_sq, p.motion_threshold, p.motion_fraction, granularity)
            if count < n_tokens:
                # guard: a token left static for max_skip_steps computes is computed again
                stale = self._static_runs(x).index_select(0, own_slots[:1])[0] >= p.max_skip_steps
                count = min(n_tokens, max(count, int(stale.sum())))
                saliency = torch.where(stale, torch.full_like(saliency, math.inf), saliency)
                positions = top_tokens(saliency, count)
        merge = min(count - 1, int(p.merge_ratio * count)) if p.merge_ratio > 0.0 else 0
        return positions, merge

    def _static_runs(self, like: torch.Tensor) -> torch.Tensor:
        """Consecutive real computes each token of each row skipped, (capacity, N) int32."""
        return self.pool.get("tokens.static_runs", (like.shape[1],), torch.int32, like.device)

    def _update_static_runs(self, slots: torch.Tensor, positions: torch.Tensor, like: torch.Tensor) -> None:
        runs = self._static_runs(like)
        runs.index_add_(0, slots, torch.ones_like(runs.index_select(0, slots)))
        runs[slots[:, None], positions] = 0

    # ------------------------------------------------------------------ blocks

    def _blocks(
        self,
        call: dict[str, Any],
        index: torch.Tensor | None,
        image: torch.Tensor,
        text: torch.Tensor | None,
        positions: torch.Tensor | None,
        start: int,
        stop: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Run blocks ``start..stop`` really on the rows ``index`` of the batch (``None``: all rows)."""
        step = self._step
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

    # ------------------------------------------------------------------ counters

    def _count_full_cost(self, step: StepContext, image: torch.Tensor, text: torch.Tensor | None) -> None:
        full = self._stack_macs(image.shape[1])
        for sample, rows in zip(step.samples, step.sample_rows, strict=True):
            sample.stats.macs_full += full * len(rows)

    def _stack_macs(self, tokens: int, stop: int | None = None) -> float:
        """Measured MACs of blocks ``0..stop`` on one row with ``tokens`` image tokens (BlockCostModel)."""
        assert self._measure_call is not None
        call, image, text = self._measure_call
        full_tokens = image.shape[1]
        key = (stop, full_tokens, None if text is None else text.shape[1], image.shape[-1], image.dtype)

        def measure(n: int) -> None:
            first = self._tensor((0,), image.device, torch.long)
            positions = torch.arange(n, device=image.device)[None] if self.adapter.needs_shared_positions else None
            self._blocks(call, first, image[:1, :n], None if text is None else text[:1], positions, 0, stop)

        return self.costs.macs(key, tokens, measure, full_tokens)

    # ------------------------------------------------------------------ small helpers

    def _tensor(self, values: tuple[Any, ...], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """A cached tensor of ``values``: steady batch compositions build no tensors from lists."""
        key = (values, device, dtype)
        tensor = self._indices.get(key)
        if tensor is None:
            if len(self._indices) >= _MAX_CACHED_INDICES:
                self._indices.clear()
            tensor = torch.tensor(values, device=device, dtype=dtype)
            self._indices[key] = tensor
        return tensor

    def _rows_index(self, rows: list[int], like: torch.Tensor) -> torch.Tensor | None:
        """Index of ``rows`` in the batch, or ``None`` when they are the whole batch in order."""
        return self._subset(rows, like.shape[0], like.device)

    def _subset(self, positions: list[int], size: int, device: torch.device) -> torch.Tensor | None:
        """Index of ``positions`` among ``size`` rows, or ``None`` when they are all of them in order."""
        if len(positions) == size and positions == list(range(size)):
            return None
        return self._tensor(tuple(positions), device, torch.long)

    def _row_times(self, step: StepContext, batch_rows: list[int], like: torch.Tensor) -> torch.Tensor:
        """Normalized times of some batch rows."""
        assert step.times is not None
        return step.times.index_select(0, self._tensor(tuple(batch_rows), like.device, torch.long))

    @staticmethod
    def _take(tensor: torch.Tensor | None, index: torch.Tensor | None) -> Any:
        if tensor is None or index is None:
            return tensor
        return tensor.index_select(0, index)

    def _gains(self, step: StepContext, rows: Sequence[int], like: torch.Tensor) -> torch.Tensor:
        """Per-row first-order forecast gains (the calibrated gain of the row's phase for FastCache
        samples, 1 for TaylorSeer), as a cached tensor."""
        profile = self.profile
        sample_of = {r: k for k, rs in enumerate(step.sample_rows) for r in rs}
        gains = tuple(
            profile.gain(step.phases[sample_of[r]]) if step.samples[sample_of[r]].params.method == "fastcache" else 1.0
            for r in rows
        )
        return self._tensor(gains, like.device, like.dtype)

    def _projection(self, like: torch.Tensor) -> torch.Tensor | None:
        weight = self.adapter.output_projection(self.transformer)
        if weight is None or weight.shape[-1] != like.shape[-1]:
            return None
        return weight.detach()

    def _output_width(self, like: torch.Tensor) -> int:
        projection = self._projection(like)
        return like.shape[-1] if projection is None else projection.shape[0]

    def _samples_of(self, step: StepContext, rows: list[int]) -> list[tuple[SampleState, int]]:
        wanted = set(rows)
        return [(sample, len(rs)) for sample, rs in zip(step.samples, step.sample_rows, strict=True) if rs[0] in wanted]

    def _assemble(
        self, parts: list[_Part], image: torch.Tensor, text: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The batch's stack output from the parts computed for its rows."""
        batch = image.shape[0]
        if len(parts) == 1 and parts[0].rows == list(range(batch)):
            part = parts[0]
            return part.image, (part.text if part.text_known else None)
        out_image = parts[0].image.new_empty((batch, *parts[0].image.shape[1:]))
        text_known = text is not None and all(p.text_known and p.text is not None for p in parts)
        out_text = torch.empty_like(text) if text_known and text is not None else None
        for part in parts:
            index = self._tensor(tuple(part.rows), image.device, torch.long)
            out_image.index_copy_(0, index, part.image)
            if out_text is not None and part.text is not None:
                out_text.index_copy_(0, index, part.text.to(out_text.dtype))
        return out_image, out_text


def _keeps_inputs(sample: SampleState) -> bool:
    """Whether a sample's real computes must store the stack input (residual reuse, token saliency)."""
    return sample.params.method == "teacache" or sample.uses_token_selection
