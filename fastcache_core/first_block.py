"""The ``first_block`` mode: block 0 runs, its method decides per sample whether the tail is reused.

Samples in plain ``compute`` mode may ride along: block 0 runs once over their rows and the
first-block rows, the tail once over theirs and the first-block rows that need it, so a mixed batch
pays each block call once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from fastcache_core.accounting import StepAccounting
from fastcache_core.executor import BlockExecutor
from fastcache_core.rows import StackPart, relative_changes, take
from fastcache_core.state import gather_rows, write_rows
from fastcache_core.step import StepContext


@dataclass
class RidingCompute:
    """The plain computes that rode along: their batch rows, index, slots, stack inputs and outputs."""

    rows: list[int]
    index: torch.Tensor
    slots: torch.Tensor
    inputs: torch.Tensor
    outputs: torch.Tensor


def run_first_block(
    runner: BlockExecutor,
    accounting: StepAccounting,
    step: StepContext,
    call: dict[str, Any],
    members: list[int],
    computing: list[int],
    image: torch.Tensor,
    text: torch.Tensor | None,
    slots: torch.Tensor,
) -> tuple[StackPart, RidingCompute | None]:
    """Outputs of the first-block samples ``members`` and the riding ``computing`` samples, and what the
    caller needs to finish the riding samples' computes (``None`` without any)."""
    indices = runner.indices
    both = sorted(members + computing)
    rows = [r for k in both for r in step.sample_rows[k]]
    local = {r: i for i, r in enumerate(rows)}
    fb_rows = [r for k in members for r in step.sample_rows[k]]
    fb_local = [local[r] for r in fb_rows]
    fb_sub = indices.subset(fb_local, len(rows), image.device)
    index = indices.rows(rows, image)
    row_slots = take(slots, index)
    x, x_text = take(image, index), take(text, index)
    first, first_text = runner.blocks_run(call, index, x, x_text, None, 0, stop=1)
    residual = take(first, fb_sub) - take(x, fb_sub)
    fb_slots = take(row_slots, fb_sub)
    shape = tuple(residual.shape[1:])
    first_pool = runner.pool.get("first_block.residual", shape, residual.dtype, residual.device)
    tail_pool = runner.pool.get("first_block.tail", shape, residual.dtype, residual.device)
    changes = relative_changes(step.sample_rows, members, fb_rows, residual, gather_rows(first_pool, fb_slots, None))
    reused = {
        local[r]
        for k in members
        if step.samples[k].method.reuses_tail(step.samples[k], changes[k])
        for r in step.sample_rows[k]
    }
    y = torch.empty_like(first)
    reuse_rows = sorted(reused)
    if reuse_rows:
        sub = indices.index(reuse_rows, x.device)
        y.index_copy_(0, sub, first.index_select(0, sub) + gather_rows(tail_pool, row_slots.index_select(0, sub), None))
    y_text = first_text
    tail_rows = [i for i in range(len(rows)) if i not in reused]
    if tail_rows:
        sub = indices.index(tail_rows, x.device)
        batch_sub = sub if index is None else index.index_select(0, sub)
        first_tail_text = None if first_text is None else first_text.index_select(0, sub)
        tail, tail_text = runner.blocks_run(call, batch_sub, first.index_select(0, sub), first_tail_text, None, 1)
        y.index_copy_(0, sub, tail)
        if tail_text is not None and first_text is not None:
            y_text = first_text.clone()
            y_text.index_copy_(0, sub, tail_text)
        elif tail_text is None:
            y_text = None
        fb_set = set(fb_local)
        refreshed = [j for j, i in enumerate(tail_rows) if i in fb_set]
        if refreshed:
            picked = indices.index(refreshed, x.device)
            fresh = sub.index_select(0, picked)
            fresh_slots = row_slots.index_select(0, fresh)
            fresh_first = first.index_select(0, fresh)
            write_rows(tail_pool, fresh_slots, None, tail.index_select(0, picked) - fresh_first)
            write_rows(first_pool, fresh_slots, None, fresh_first - x.index_select(0, fresh))
    _count(runner, accounting, step, members, local, reused, image.shape[1])
    part = StackPart(rows, y, y_text, text_known=y_text is not None or text is None)
    if not computing:
        return part, None
    c_local = [local[r] for k in computing for r in step.sample_rows[k]]
    c_sub = indices.index(c_local, x.device)
    c_rows = [rows[i] for i in c_local]
    c_slots = row_slots.index_select(0, c_sub)
    riding = RidingCompute(
        c_rows, indices.index(c_rows, x.device), c_slots, x.index_select(0, c_sub), y.index_select(0, c_sub)
    )
    return part, riding


def _count(
    runner: BlockExecutor,
    accounting: StepAccounting,
    step: StepContext,
    members: list[int],
    local: dict[int, int],
    reused: set[int],
    tokens: int,
) -> None:
    """Counters of the first-block samples; a sample whose tail ran has computed the whole stack."""
    first_macs = accounting.stack_macs(tokens, stop=1)
    full_macs = accounting.stack_macs(tokens)
    blocks = len(runner.blocks)
    for k in members:
        sample = step.samples[k]
        mine = [local[r] for r in step.sample_rows[k]]
        sample.stats.tokens_computed += tokens
        sample.stats.tokens_total += tokens
        if mine[0] in reused:
            sample.stats.blocks_computed += 1
            sample.stats.blocks_approximated += blocks - 1
            sample.stats.macs_computed += first_macs * len(mine)
        else:
            sample.stats.blocks_computed += blocks
            sample.stats.macs_computed += full_macs * len(mine)
            sample.computes += 1
            sample.last_compute = sample.step
