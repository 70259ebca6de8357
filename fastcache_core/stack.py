"""The block loop of one cached step: ask each sample's method for its mode, group rows, run blocks.

Per step each sample takes one mode, decided by its method (``fastcache_core.methods``) from its own
state only; warm-up and final steps (``FastCacheConfig.first_steps``/``last_steps``) always compute.
The loop knows modes, not methods:

* ``compute``: the rows run the whole block stack (token selection and merging when the method's
  token plan asks, ``token_selection.py``); the output is recorded in the sample's history, and the
  forecast that would have been used is measured first for methods that ask (the only device-to-host
  read of a compute step);
* ``forecast``: the stack output is extrapolated from the history with the method's gain;
* ``reuse``: the last computed residual is added to the current input;
* ``first_block``: block 0 runs; the method decides from its residual change whether the tail is
  reused or runs too (``first_block.py``);
* ``refresh``: the forecast, with a share of the tokens run through the stack over the others' cached
  keys and values (``token_refresh.py``); real computes of such samples keep their keys and values.

All rows in compute mode share one call of each block (one call per token-count group with token
selection), and share it with first-block rows too: block 0 runs once over both, the tail once over
the compute rows and the first-block rows that need it. Block calls have a fixed cost, so a mixed
batch pays it once per block, like a homogeneous one. A batch whose rows all compute runs the blocks
on the batch itself, with no gather or scatter. Index tensors are cached by batch composition.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from fastcache_core.accounting import StepAccounting
from fastcache_core.executor import BlockExecutor
from fastcache_core.first_block import run_first_block
from fastcache_core.forecast import guided_error
from fastcache_core.methods import COMPUTE, FIRST_BLOCK, FORECAST, INPUT_CHANGE, REFRESH, REUSE
from fastcache_core.rows import StackPart, relative_changes, take
from fastcache_core.state import SampleState, gather_rows, write_rows
from fastcache_core.step import StepContext
from fastcache_core.token_refresh import TokenRefresh
from fastcache_core.token_selection import TokenSelection


class StackRunner(BlockExecutor):
    """Executes one step of the block stack for a ``FastCache`` (see the module docstring)."""

    # ------------------------------------------------------------------ the step

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.tokens = TokenSelection(self)
        self.refresh = TokenRefresh(self)
        self.accounting = StepAccounting(self)

    @torch.no_grad()
    def run(self, step: StepContext, call: dict[str, Any]) -> Any:
        image, text = self.adapter.split_streams(call)
        slots = self.indices.tensor(tuple(r.slot for r in step.rows), image.device, torch.long)
        self.step = step
        self.accounting.begin(call, image, text)
        modes = self._modes(step, call, image, slots)
        rows_of = {
            mode: [r for k, rows in enumerate(step.sample_rows) if modes[k] == mode for r in rows]
            for mode in set(modes)
        }
        members_of = {mode: [k for k, m in enumerate(modes) if m == mode] for mode in (COMPUTE, FIRST_BLOCK)}
        # plain computes share first-block rows' block calls: each block runs once per step, not twice
        sharing = bool(members_of[FIRST_BLOCK]) and not any(
            step.samples[k].selects_tokens or step.samples[k].refresh_fraction > 0 for k in members_of[COMPUTE]
        )
        parts: list[StackPart] = []
        if rows_of.get(FORECAST):
            parts.append(self._forecast(step, rows_of[FORECAST], image, text, slots))
        if rows_of.get(REFRESH):
            refreshing = [k for k, m in enumerate(modes) if m == REFRESH]
            part, refreshed = self.refresh.run(step, call, refreshing, rows_of[REFRESH], image, text, slots)
            self.accounting.count_refreshes(step, refreshing, refreshed, image.shape[1])
            parts.append(part)
        if rows_of.get(REUSE):
            parts.append(self._residual_reuse(step, rows_of[REUSE], image, text, slots))
        if rows_of.get(COMPUTE) and not sharing:
            parts.append(self._compute(step, call, members_of[COMPUTE], rows_of[COMPUTE], image, text, slots))
        if members_of[FIRST_BLOCK]:
            computing = members_of[COMPUTE] if sharing else []
            part, riding = run_first_block(
                self, self.accounting, step, call, members_of[FIRST_BLOCK], computing, image, text, slots
            )
            parts.append(part)
            if riding is not None:
                self.after_compute(
                    step, computing, riding.rows, riding.index, riding.slots, riding.inputs, riding.outputs
                )
                self.accounting.count_computes(step, computing, {k: image.shape[1] for k in computing}, image.shape[1])
        self.accounting.count_full_cost(step, image)
        out_image, out_text = self._assemble(parts, image, text)
        self.accounting.end()
        self.step = None
        return self.adapter.streams_to_output(out_image, out_text)

    def _modes(self, step: StepContext, call: dict[str, Any], image: torch.Tensor, slots: torch.Tensor) -> list[str]:
        """Each sample's mode: forced steps compute; the others ask their method, after the probes
        the methods asked for were measured (one batched measurement per probe)."""
        config, context = self.config, self.context
        forced = [s.is_forced(config.first_steps, config.last_steps) for s in step.samples]
        probes = [None if f else s.method.probe(s, context) for s, f in zip(step.samples, forced, strict=True)]
        values: dict[int, float] = {}
        probed = [k for k, p in enumerate(probes) if p == INPUT_CHANGE]
        if probed:
            values = self._input_changes(step, call, probed, image, slots)
        modes = [COMPUTE if forced[k] else s.method.mode(s, context, values.get(k)) for k, s in enumerate(step.samples)]
        if REFRESH in modes and not self.supports_refresh:  # no processor keeps this family's keys and values
            modes = [FORECAST if m == REFRESH else m for m in modes]
        return modes

    def _input_changes(
        self, step: StepContext, call: dict[str, Any], members: list[int], image: torch.Tensor, slots: torch.Tensor
    ) -> dict[int, float]:
        """Per sample, the relative change of block 0's modulated input since its previous step."""
        rows = [r for k in members for r in step.sample_rows[k]]
        index = self.indices.rows(rows, image)
        adapter = self.adapter
        modulated = adapter.modulated_input(self.blocks[0], adapter.select_rows(call, index), take(image, index))
        pool = self.pool.get("probe.input", tuple(modulated.shape[1:]), modulated.dtype, modulated.device)
        row_slots = take(slots, index)
        changes = relative_changes(step.sample_rows, members, rows, modulated, gather_rows(pool, row_slots, None))
        write_rows(pool, row_slots, None, modulated)
        return changes

    # ------------------------------------------------------------------ modes

    def _forecast(
        self, step: StepContext, rows: list[int], image: torch.Tensor, text: torch.Tensor | None, slots: torch.Tensor
    ) -> StackPart:
        index = self.indices.rows(rows, image)
        row_slots = take(slots, index)
        y = self.history.forecast(row_slots, take(step.times, index), self.gains(step, rows, image), image)
        if any(step.samples[k].refresh_fraction > 0 for k, rs in enumerate(step.sample_rows) if rs[0] in rows):
            y = self.refresh.corrected(y, row_slots)  # corrections are zero for the other rows
        self.accounting.count_skips(step, rows, image)
        return StackPart(rows, y, take(text, index))

    def _residual_reuse(
        self, step: StepContext, rows: list[int], image: torch.Tensor, text: torch.Tensor | None, slots: torch.Tensor
    ) -> StackPart:
        index = self.indices.rows(rows, image)
        y = self.history.residual_reuse(take(slots, index), take(image, index))
        self.accounting.count_skips(step, rows, image)
        return StackPart(rows, y, take(text, index))

    def _compute(
        self,
        step: StepContext,
        call: dict[str, Any],
        members: list[int],
        rows: list[int],
        image: torch.Tensor,
        text: torch.Tensor | None,
        slots: torch.Tensor,
    ) -> StackPart:
        index = self.indices.rows(rows, image)
        row_slots = take(slots, index)
        x, x_text = take(image, index), take(text, index)
        if any(step.samples[k].selects_tokens for k in members):
            y, y_text, computed_tokens = self.tokens.compute(step, call, members, rows, index, x, x_text, row_slots)
        else:
            record = any(step.samples[k].refresh_fraction > 0 for k in members)
            y, y_text = self.blocks_run(call, index, x, x_text, None, 0, record_kv=record)
            computed_tokens = {k: x.shape[1] for k in members}
        self.after_compute(step, members, rows, index, row_slots, x, y)
        self.accounting.count_computes(step, members, computed_tokens, image.shape[1])
        return StackPart(rows, y, y_text, text_known=y_text is not None or text is None)

    # ------------------------------------------------------------------ after a real compute

    def after_compute(
        self,
        step: StepContext,
        members: list[int],
        rows: list[int],
        index: torch.Tensor | None,
        row_slots: torch.Tensor,
        x: torch.Tensor,
        y: torch.Tensor,
    ) -> None:
        """Measure the forecast errors methods asked for, record the outputs, let each method decide."""
        context = self.context
        local = {r: i for i, r in enumerate(rows)}
        measured = [k for k in members if step.samples[k].method.measures_forecast_error(step.samples[k], context)]
        errors = self._forecast_errors(step, measured, rows, local, row_slots, y) if measured else {}
        refreshing = [local[r] for k in members if step.samples[k].refresh_fraction > 0 for r in step.sample_rows[k]]
        if refreshing:
            sub = self.indices.index(refreshing, y.device)
            batch_rows = [rows[i] for i in refreshing]
            times = take(step.times, self.indices.index(batch_rows, y.device))
            self.refresh.after_compute(
                row_slots.index_select(0, sub), times, self.gains(step, batch_rows, y), y.index_select(0, sub)
            )
        self.history.record(row_slots, take(step.times, index), y)
        keep = [local[r] for k in members if self._keeps_inputs(step.samples[k]) for r in step.sample_rows[k]]
        if keep:
            sub = self.indices.index(keep, y.device)
            self.history.record_input(row_slots.index_select(0, sub), x.index_select(0, sub))
        for k in members:
            sample = step.samples[k]
            gap = sample.step - sample.last_compute if sample.last_compute >= 0 else 1
            sample.computes += 1
            sample.last_compute = sample.step
            error, dof = errors.get(k, (None, len(step.sample_rows[k]) * y.shape[1] * self.output_width(y)))
            sample.method.after_compute(sample, context, error, dof, gap)

    def _forecast_errors(
        self,
        step: StepContext,
        measured: list[int],
        rows: list[int],
        local: dict[int, int],
        row_slots: torch.Tensor,
        y: torch.Tensor,
    ) -> dict[int, tuple[float, int]]:
        """Per sample, the relative error of the forecast that would have been used, in what the sampler
        integrates (``forecast.guided_error``), and the number of output numbers it was measured over."""
        mine = [local[r] for k in measured for r in step.sample_rows[k]]
        sub = self.indices.index(mine, y.device)
        batch_rows = [rows[i] for i in mine]
        times = step.times.index_select(0, self.indices.index(batch_rows, y.device))  # type: ignore[union-attr]
        forecast = self.history.forecast(row_slots.index_select(0, sub), times, self.gains(step, batch_rows, y), y)
        real = y.index_select(0, sub)
        projection = self.projection(y)
        sums: list[torch.Tensor] = []
        counts: list[int] = []
        start = 0
        for k in measured:
            sample, sample_rows = step.samples[k], step.sample_rows[k]
            cond_row = next((j for j, r in enumerate(sample_rows) if step.rows[r].branch == sample.cond_branch), 0)
            stop = start + len(sample_rows)
            error, reference, count = guided_error(
                forecast[start:stop], real[start:stop], projection, sample.guidance_scale, cond_row
            )
            sums.extend((error, reference))
            counts.append(count)
            start = stop
        values = torch.stack(sums).tolist()  # the one host read of this step
        macs = 2 * y.shape[1] * y.shape[2] * self.output_width(y)
        errors = {}
        for n, k in enumerate(measured):
            error, reference = values[2 * n], values[2 * n + 1]
            errors[k] = (math.sqrt(error / reference) if reference > 0 else math.inf, counts[n])
            step.samples[k].stats.macs_computed += macs * len(step.sample_rows[k])
        return errors

    def _keeps_inputs(self, sample: SampleState) -> bool:
        refresh_input = sample.refresh_fraction > 0 and self.config.refresh_score == "input_change"
        return refresh_input or sample.token_plan is not None or sample.method.keeps_inputs(sample)

    def _assemble(
        self, parts: list[StackPart], image: torch.Tensor, text: torch.Tensor | None
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
            index = self.indices.index(part.rows, image.device)
            out_image.index_copy_(0, index, part.image)
            if out_text is not None and part.text is not None:
                out_text.index_copy_(0, index, part.text.to(out_text.dtype))
        return out_image, out_text
