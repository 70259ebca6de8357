"""``apply_fastcache``: attach FastCache to a diffusers transformer and run its blocks with per-sample reuse.

How it hooks in: a forward pre-hook on the transformer reads the step (timestep, batch); the first
block's ``forward`` is replaced (on the instance only) by a runner that executes the whole block stack
with per-sample decisions and returns the stack's output; the other blocks' ``forward`` become
pass-throughs for that call. Nothing else of the model changes, ``state_dict`` keys included, and
``FastCache.remove()`` deletes the instance attributes so the class's own ``forward`` is back.

Per step and per sample the runner
1. optionally selects motion tokens by saliency and merges dense tokens (k-NN), per sample;
2. for every block decides compute or reuse (FastCache's chi-square rule with guards, or a peer's
   rule), runs the block once for all rows that compute, and approximates the others with the
   fitted linear map around the cached point;
3. unmerges, and gives static tokens the fitted whole-stack linear path.
A sample's result depends only on its own rows: batch composition changes which rows share a kernel
call, never what is computed for a row.
"""

from __future__ import annotations

import inspect
import logging
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable, Iterable, Sequence

import torch
from torch import nn

from fastcache_core.adapters import TransformerAdapter, adapter_for
from fastcache_core.approx import ApproximatorSet, LinearApproximator, default_calibration_path, phase_of
from fastcache_core.config import CacheParams, FastCacheConfig
from fastcache_core.decisions import fastcache_reuses_block, fbcache_reuses_tail, teacache_reuses_stack
from fastcache_core.state import RowPool, RowState, SampleState, gather_rows, write_rows
from fastcache_core.stats import BlockCostModel, SampleStats
from fastcache_core.tokens import (
    gather_tokens,
    knn_merge,
    knn_unmerge,
    motion_token_count,
    relative_token_change,
    scatter_tokens,
    top_tokens,
)

logger = logging.getLogger(__name__)

RowKey = tuple[Hashable, int]
"""A batch row: (sample id, guidance branch)."""


@dataclass
class _Forward:
    """What one transformer forward is about: its rows, their samples, timing and phase."""

    rows: list[RowState]
    samples: list[SampleState]
    row_sample: list[int]  # index into samples for each row
    phases: list[int]  # per sample
    forced: list[bool]  # per sample
    bypass: bool = False
    stack_done: bool = False


@dataclass
class _Group:
    """Rows that run the block stack together: same computed-token count and merge count."""

    rows: list[int]  # batch row indices
    sample_rows: dict[int, list[int]] = field(default_factory=dict)  # sample index -> local row indices
    positions: torch.Tensor | None = None  # (G, k) motion-token positions, None = all tokens
    merge_count: int = 0


class FastCache:
    """Handle of FastCache attached to one transformer (returned by :func:`apply_fastcache`).

    Plain pipeline calls work unchanged: each new denoising run (detected from the timestep going up
    again or the batch size changing) starts fresh per-sample state with the default params (see
    :meth:`set_run`), and guidance pairs are recognised by their identical latents.

    A batch runner instead registers samples with :meth:`add_sample`, tells before every forward which
    sample and guidance branch each batch row is (:meth:`bind`), and retires samples with
    :meth:`remove_sample`, so samples can join and leave between steps.
    """

    def __init__(self, transformer: nn.Module, config: FastCacheConfig | None = None) -> None:
        self.transformer = transformer
        self.config = config or FastCacheConfig()
        self.adapter: TransformerAdapter = adapter_for(transformer)
        self.blocks = self.adapter.blocks(transformer)
        self.approximators = self._load_approximators()
        calibrated = self.approximators.metadata.get("default_params")
        self.default_params = self.config.params.resolved(CacheParams.from_dict(calibrated) if calibrated else None)
        self._originals: list[Callable] = []
        self._hooks: list[Any] = []
        self._pool = RowPool()
        self._samples: dict[Hashable, SampleState] = {}
        self._rows: dict[RowKey, RowState] = {}
        self._bound: list[RowKey] | None = None
        self._plain_ids: list[Hashable] = []
        self._plain_last: tuple[int, float] | None = None
        self._plain_params: CacheParams | Sequence[CacheParams] | None = None
        self._plain_steps: int | None = None
        self._plain_counter = 0
        self._ctx: _Forward | None = None
        self._device_maps: dict[tuple, ApproximatorSet] = {}
        self._costs = BlockCostModel()
        self._full_tokens = 0
        self._reference: tuple | None = None
        self._forward_signature = inspect.signature(transformer.forward)
        self._attach()

    # ------------------------------------------------------------------ public API

    def remove(self) -> None:
        """Detach: restore every block's own ``forward`` and remove the hooks and cached state."""
        for block in self.blocks:
            block.__dict__.pop("forward", None)
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
        self._pool.clear()
        self._samples.clear()
        self._rows.clear()
        if getattr(self.transformer, "_fastcache", None) is self:
            del self.transformer._fastcache

    def reset(self) -> None:
        """Forget all samples and cached activations."""
        for sample_id in list(self._samples):
            self.remove_sample(sample_id)
        self._plain_ids = []
        self._plain_last = None

    def set_run(self, params: CacheParams | Sequence[CacheParams] | None = None, num_steps: int | None = None) -> None:
        """Params (one for all samples, or one per sample) and step count for following plain pipeline calls.

        Knowing ``num_steps`` lets the last ``config.last_steps`` steps be computed in full.
        """
        self._plain_params = params
        self._plain_steps = num_steps

    def add_sample(self, sample_id: Hashable, params: CacheParams | None = None, num_steps: int | None = None) -> None:
        """Register a sample for batch-runner use; its rows join the batch through :meth:`bind`."""
        if sample_id in self._samples:
            raise ValueError(f"sample {sample_id!r} is already registered")
        resolved = (params or CacheParams()).resolved(self.default_params)
        if not self.config.enabled:
            resolved = CacheParams(**{**resolved.to_dict(), "method": "none"})
        state = SampleState(sample_id, resolved, num_steps, len(self.blocks))
        state.stats = SampleStats(
            sample_id=sample_id,
            method=resolved.method,
            params=resolved.to_dict(),
            approximator=self._approximator_label(resolved),
        )
        self._samples[sample_id] = state

    def remove_sample(self, sample_id: Hashable) -> SampleStats:
        """Retire a sample, free its rows' cache slots and return its counters."""
        state = self._samples.pop(sample_id)
        for key in [k for k, row in self._rows.items() if row.sample is state]:
            self._pool.release(self._rows.pop(key).slot)
        return state.stats

    def release_idle_memory(self) -> int:
        """Free the pooled cache tensors when no sample is registered (e.g. after a burst); returns bytes freed.

        A serving loop calls this when it has been idle a while; the pool grows again on the next forward.
        """
        if self._samples:
            return 0
        return self._pool.shrink()

    def bind(self, rows: Sequence[RowKey] | None) -> None:
        """Declare the (sample id, guidance branch) of every row of the next forwards; ``None`` = plain mode."""
        if rows is not None:
            for sample_id, _ in rows:
                if sample_id not in self._samples:
                    raise KeyError(f"sample {sample_id!r} was not added")
        self._bound = list(rows) if rows is not None else None

    def sample_stats(self, sample_id: Hashable) -> SampleStats:
        return self._samples[sample_id].stats

    def stats(self) -> list[SampleStats]:
        """Counters of the samples of the last plain run (or of all registered samples when bound)."""
        ids = self._plain_ids if self._bound is None else list(self._samples)
        return [self._samples[i].stats for i in ids if i in self._samples]

    @property
    def calibrated(self) -> bool:
        """Whether fitted linear maps are loaded (else reuse falls back to residual reuse, W = I)."""
        return self.approximators.fitted

    # ------------------------------------------------------------------ attaching

    def _load_approximators(self) -> ApproximatorSet:
        if not self.config.use_calibration:
            return ApproximatorSet()
        if isinstance(self.config.calibration, ApproximatorSet):
            return self.config.calibration
        path = self.config.calibration or default_calibration_path(self.transformer)
        if path is None:
            logger.info("FastCache: no calibration found; reuse falls back to residual reuse (W = I)")
            return ApproximatorSet()
        approximators = ApproximatorSet.load(path)
        if approximators.block_scales is not None and approximators.block_scales.shape[0] != len(self.blocks):
            raise ValueError(f"calibration {path} is for {approximators.block_scales.shape[0]} blocks, "
                             f"the model has {len(self.blocks)}")
        return approximators

    def _approximator_label(self, params: CacheParams) -> str:
        if params.method != "fastcache":
            return "identity"
        return "fitted" if self.approximators.fitted else "identity (uncalibrated: residual reuse, W = I)"

    def _attach(self) -> None:
        if getattr(self.transformer, "_fastcache", None) is not None:
            raise RuntimeError("FastCache is already applied to this transformer; call .remove() first")
        for index, block in enumerate(self.blocks):
            original = block.forward
            self._originals.append(original)
            block.forward = self._make_block_forward(index, original)
        self._hooks.append(self.transformer.register_forward_pre_hook(self._begin_forward, with_kwargs=True))
        self._hooks.append(self.transformer.register_forward_hook(self._end_forward))
        self.transformer._fastcache = self

    def _make_block_forward(self, index: int, original: Callable) -> Callable:
        def forward(*args: Any, **kwargs: Any) -> Any:
            ctx = self._ctx
            if ctx is None or ctx.bypass or (index > 0 and not ctx.stack_done):
                return original(*args, **kwargs)
            call = self.adapter.bind_call(original, args, kwargs)
            if index == 0:
                result = self._run_stack(call)
                ctx.stack_done = True
                return result
            # the stack already ran inside block 0: pass the final state through unchanged
            return self.adapter.streams_to_output(*self.adapter.split_streams(call))

        return forward

    # ------------------------------------------------------------------ per forward

    def _begin_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        bound = self._forward_signature.bind(*args, **kwargs).arguments
        hidden = bound.get("hidden_states")
        timestep = bound.get("timestep")
        unsupported = [k for k in self.adapter.unsupported_forward_kwargs if bound.get(k) is not None]
        if unsupported or hidden is None or timestep is None:
            if unsupported:
                logger.warning("FastCache: %s given; running this forward uncached", ", ".join(unsupported))
            self._ctx = _Forward([], [], [], [], [], bypass=True)
            return
        batch = hidden.shape[0]
        if not torch.is_tensor(timestep):
            timestep = torch.tensor([timestep])
        times = self.adapter.normalized_time(timestep.reshape(-1).expand(batch) if timestep.numel() == 1 else timestep)
        keys = self._bound if self._bound is not None else self._plain_rows(hidden, times)
        if len(keys) != batch:
            raise ValueError(f"bound {len(keys)} rows but the batch has {batch}")
        rows, samples, row_sample, phases = [], [], [], []
        index_of: dict[int, int] = {}
        for key, t in zip(keys, times):
            row = self._row(key)
            rows.append(row)
            sid = id(row.sample)
            if sid not in index_of:
                index_of[sid] = len(samples)
                samples.append(row.sample)
                phases.append(phase_of(t, self.approximators.num_phases))
            row_sample.append(index_of[sid])
        cfg = self.config
        forced = [s.is_forced(cfg.first_steps, cfg.last_steps) for s in samples]
        self._ctx = _Forward(rows, samples, row_sample, phases, forced)

    def _end_forward(self, module: nn.Module, args: tuple, output: Any) -> None:
        ctx = self._ctx
        self._ctx = None
        if ctx is None or ctx.bypass:
            return
        for sample in ctx.samples:
            sample.step += 1
            sample.stats.steps += 1

    def _plain_rows(self, hidden: torch.Tensor, times: list[float]) -> list[RowKey]:
        """Rows of a plain pipeline call; a new run starts fresh samples."""
        batch = hidden.shape[0]
        new_run = (
            self._plain_last is None
            or self._plain_last[0] != batch
            or times[0] >= self._plain_last[1]
            or any(i not in self._samples for i in self._plain_ids)
        )
        self._plain_last = (batch, times[0])
        # guidance: pipelines duplicate the latents for the (cond, uncond) halves of the batch
        paired = batch % 2 == 0 and torch.equal(hidden[: batch // 2], hidden[batch // 2 :])
        per_sample = batch // 2 if paired else batch
        if new_run or len(self._plain_ids) != per_sample:
            for sample_id in self._plain_ids:
                if sample_id in self._samples:
                    self.remove_sample(sample_id)
            self._plain_counter += 1
            self._plain_ids = [("run", self._plain_counter, i) for i in range(per_sample)]
            params = self._plain_params
            for i, sample_id in enumerate(self._plain_ids):
                p = params[i] if isinstance(params, (list, tuple)) else params
                self.add_sample(sample_id, p, self._plain_steps)
        if paired:
            return [(i, 0) for i in self._plain_ids] + [(i, 1) for i in self._plain_ids]
        return [(i, 0) for i in self._plain_ids]

    def _row(self, key: RowKey) -> RowState:
        row = self._rows.get(key)
        if row is None:
            sample = self._samples[key[0]]
            row = RowState(sample, key[1], self._pool.acquire())
            self._rows[key] = row
        return row

    # ------------------------------------------------------------------ the stack

    def _maps(self, device: torch.device, dtype: torch.dtype) -> ApproximatorSet:
        key = (device, dtype)
        if key not in self._device_maps:
            self._device_maps[key] = self.approximators.to(device, dtype)
        return self._device_maps[key]

    def _pool_tensor(self, name: str, like: torch.Tensor) -> torch.Tensor:
        """Pool tensor ``name`` with per-row shape, dtype and device of ``like``'s rows."""
        return self._pool.get(name, tuple(like.shape[1:]), like.dtype, like.device)

    @torch.no_grad()
    def _run_stack(self, call: dict[str, Any]) -> Any:
        ctx = self._ctx
        image, text = self.adapter.split_streams(call)
        batch = image.shape[0]
        slots = torch.tensor([r.slot for r in ctx.rows], device=image.device)
        # the full-batch inputs: block cost measurements run on a row of these
        self._full_tokens = image.shape[1]
        self._reference = (image, text, torch.arange(batch, device=image.device))
        self._count_full_cost(call, image, text)
        groups = self._plan_groups(image, slots)
        if len(groups) == 1:
            out_image, out_text = self._run_group(call, groups[0], None, slots, image, text)
        else:
            out_image = torch.empty_like(image)
            out_text = None
            for group in groups:
                rows = torch.tensor(group.rows, device=image.device)
                g_text = None if text is None else text.index_select(0, rows)
                y_image, y_text = self._run_group(call, group, rows, slots.index_select(0, rows),
                                                  image.index_select(0, rows), g_text)
                out_image.index_copy_(0, rows, y_image)
                if y_text is not None:
                    out_text = torch.empty((batch, *y_text.shape[1:]), dtype=y_text.dtype, device=y_text.device) \
                        if out_text is None else out_text
                    out_text.index_copy_(0, rows, y_text)
        self._remember_stack_inputs(image, slots)
        self._reference = None
        return self.adapter.streams_to_output(out_image, out_text)

    # -- token selection and grouping

    def _plan_groups(self, image: torch.Tensor, slots: torch.Tensor) -> list[_Group]:
        """Choose each sample's computed tokens and group rows that can run the blocks together."""
        ctx = self._ctx
        n_tokens = image.shape[1]
        plans = [self._plan_tokens(s_index, sample, image, slots) for s_index, sample in enumerate(ctx.samples)]
        shared_positions = self.adapter.needs_shared_positions
        groups: dict[tuple, _Group] = {}
        for row_index, s_index in enumerate(ctx.row_sample):
            positions, merge = plans[s_index]
            count = n_tokens if positions is None else positions.numel()
            own = shared_positions and (positions is not None or merge > 0)
            key = (count, merge, s_index if own else None)
            group = groups.setdefault(key, _Group(rows=[], merge_count=merge))
            group.sample_rows.setdefault(s_index, []).append(len(group.rows))
            group.rows.append(row_index)
        for (count, merge, _), group in groups.items():
            if count < n_tokens or merge:
                full = torch.arange(n_tokens, device=image.device)
                group.positions = torch.stack([
                    full if plans[ctx.row_sample[r]][0] is None else plans[ctx.row_sample[r]][0] for r in group.rows
                ])
        return list(groups.values())

    def _plan_tokens(self, s_index: int, sample: SampleState, image: torch.Tensor,
                     slots: torch.Tensor) -> tuple[torch.Tensor | None, int]:
        """(motion-token positions or None for all, number of tokens to merge) for one sample."""
        ctx = self._ctx
        p = sample.params
        if not sample.uses_token_selection or ctx.forced[s_index] or sample.step == 0:
            return None, 0
        n_tokens = image.shape[1]
        positions = None
        count = n_tokens
        if p.motion_threshold > 0.0 or p.motion_fraction < 1.0:
            rows = torch.tensor([i for i, s in enumerate(ctx.row_sample) if s == s_index], device=image.device)
            prev = gather_rows(self._pool_tensor("stack.prev", image), slots.index_select(0, rows), None)
            saliency, norm_sq = relative_token_change(image.index_select(0, rows), prev)
            saliency, norm_sq = saliency.sum(0), norm_sq.sum(0)
            granularity = self.config.token_granularity or max(1, n_tokens // 16)
            count = motion_token_count(saliency, norm_sq, p.motion_threshold, p.motion_fraction, granularity)
            if count < n_tokens:
                # guard: a token static for max_skip_steps steps is computed again
                run = self._static_runs(image.device)[ctx.rows[int(rows[0])].slot]
                stale = run >= p.max_skip_steps
                count = min(n_tokens, max(count, int(stale.sum())))
                saliency = torch.where(stale, torch.full_like(saliency, math.inf), saliency)
                positions = top_tokens(saliency, count)
        merge = min(count - 1, int(p.merge_ratio * count)) if p.merge_ratio > 0.0 else 0
        return positions, merge

    def _static_runs(self, device: torch.device) -> torch.Tensor:
        """Consecutive steps each token of each row has been static, (capacity, N)."""
        return self._pool.get("stack.static_run", (self._full_tokens,), torch.int32, device)

    def _remember_stack_inputs(self, image: torch.Tensor, slots: torch.Tensor) -> None:
        """Keep this step's stack input of samples that select tokens (next step's saliency)."""
        ctx = self._ctx
        rows = [i for i, s in enumerate(ctx.row_sample) if ctx.samples[s].uses_token_selection]
        if rows:
            index = torch.tensor(rows, device=image.device)
            write_rows(self._pool_tensor("stack.prev", image), slots.index_select(0, index), None,
                       image.index_select(0, index))

    def _remember_stack_outputs(self, group: _Group, slots: torch.Tensor, positions: torch.Tensor | None,
                                x: torch.Tensor, y: torch.Tensor) -> None:
        """Keep the last computed stack input/output of each token (the static tokens' linear path)."""
        ctx = self._ctx
        local = [r for s, rs in group.sample_rows.items() if ctx.samples[s].uses_token_selection for r in rs]
        if not local:
            return
        index = torch.tensor(local, device=x.device)
        s = slots.index_select(0, index)
        p = None if positions is None else positions.index_select(0, index)
        shape = (self._full_tokens, x.shape[-1])
        write_rows(self._pool.get("stack.in", shape, x.dtype, x.device), s, p, x.index_select(0, index))
        write_rows(self._pool.get("stack.out", shape, x.dtype, x.device), s, p, y.index_select(0, index))
        runs = self._static_runs(x.device)
        if p is None:
            runs.index_fill_(0, s, 0)
        else:
            runs.index_add_(0, s, torch.ones_like(runs.index_select(0, s)))
            runs[s[:, None], p] = 0

    def _run_group(self, call: dict[str, Any], group: _Group, rows: torch.Tensor | None, slots: torch.Tensor,
                   image: torch.Tensor, text: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Token selection and merging around the block loop for one group of rows."""
        ctx = self._ctx
        positions = group.positions
        x = image if positions is None else gather_tokens(image, positions)
        merge = None
        block_positions = positions
        merged = x
        if group.merge_count:
            merged, merge = knn_merge(x, group.merge_count, self.config.knn_neighbors)
            block_positions = positions.gather(1, merge.kept)
        y, y_text = self._run_blocks(call, group, rows, slots, merged, text, block_positions)
        if merge is not None:
            y = knn_unmerge(y, merged, x, merge)
        for s_index in group.sample_rows:
            stats = ctx.samples[s_index].stats
            stats.tokens_computed += merged.shape[1]
            stats.tokens_total += image.shape[1]
        if positions is None or positions.shape[1] == image.shape[1]:
            y_full = y if positions is None else scatter_tokens(image, positions, y)
            self._remember_stack_outputs(group, slots, None, image, y_full)
            return y_full, y_text
        # static tokens take the fitted whole-stack linear path around their last computed value
        shape = tuple(image.shape[1:])
        stack_in = gather_rows(self._pool.get("stack.in", shape, image.dtype, image.device), slots, None)
        stack_out = gather_rows(self._pool.get("stack.out", shape, image.dtype, image.device), slots, None)
        gaps = (self._static_runs(image.device).index_select(0, slots) + 1).to(image.dtype)
        phases = [ctx.phases[ctx.row_sample[r]] for r in group.rows]
        approx = self._maps(image.device, image.dtype).get("stack.image")
        y_full = scatter_tokens(approx.apply(stack_out, image - stack_in, gaps, phases), positions, y)
        static_tokens = image.shape[1] - positions.shape[1]
        for s_index, local in group.sample_rows.items():
            ctx.samples[s_index].stats.macs_computed += approx.macs_per_token() * static_tokens * len(local)
        self._remember_stack_outputs(group, slots, positions, x, y)
        return y_full, y_text

    # -- the block loop

    def _run_blocks(self, call: dict[str, Any], group: _Group, rows: torch.Tensor | None, slots: torch.Tensor,
                    image: torch.Tensor, text: torch.Tensor | None,
                    positions: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Per block and sample: compute or reuse; one block call for all rows that compute."""
        ctx = self._ctx
        s_indices = list(group.sample_rows)
        samples = [ctx.samples[s] for s in s_indices]
        local_rows = [group.sample_rows[s] for s in s_indices]
        phases = [ctx.phases[s] for s in s_indices]
        forced = [ctx.forced[s] for s in s_indices]
        maps = self._maps(image.device, image.dtype)
        tea_reuse = self._teacache_decisions(call, rows, slots, image, samples, local_rows, forced)
        fb_reuse = [False] * len(samples)
        n_rows = image.shape[0]
        for index, original in enumerate(self._originals):
            cache = _CachedBlock(self, index, slots, positions, image, text)
            candidates = [self._may_reuse(index, sample, forced[k], tea_reuse[k], fb_reuse[k])
                          for k, sample in enumerate(samples)]
            # the change norms cost a gather and a host sync: only measure them when someone may reuse
            changes = cache.relative_changes(image, text, local_rows) if any(candidates) else [math.inf] * len(samples)
            changes = [c if candidate else None for c, candidate in zip(changes, candidates)]
            dof = (image.shape[1] + (0 if text is None else text.shape[1])) * image.shape[2]
            reuse = [self._decide(index, sample, phases[k], changes[k], dof * len(local_rows[k]), maps)
                     for k, sample in enumerate(samples)]
            compute = [r for k, rs in enumerate(local_rows) if not reuse[k] for r in rs]
            reused = [r for k, rs in enumerate(local_rows) if reuse[k] for r in rs]
            out_image, out_text = image, text
            if compute:
                sub = _RowSubset(compute, n_rows, image.device)
                c_image, c_text = sub.take(image), sub.take(text)
                c_rows = sub.take(rows) if rows is not None else sub.index
                y_image, y_text = self.adapter.call_block(original, call, c_rows, c_image, c_text, sub.take(positions))
                steps_between = None
                if cache.tracks_velocity:  # per-step residual change needs the gap to the previous compute
                    gap_of = {r: (samples[k].step - samples[k].previous_computed_at[index]
                                  if samples[k].previous_computed_at[index] >= 0 else 0)
                              for k, rs in enumerate(local_rows) for r in rs}
                    steps_between = torch.tensor([gap_of[r] for r in sub.rows], device=image.device, dtype=image.dtype)
                cache.store(sub.take(slots), sub.take(positions), c_image, y_image, c_text, y_text, steps_between)
                out_image, out_text = sub.put(image, y_image), sub.put(text, y_text)
            if reused:
                sub = _RowSubset(reused, n_rows, image.device)
                a_image, a_text = self._approximate(index, maps, cache, sub, samples, local_rows, phases)
                out_image = a_image if not compute else sub.put(out_image, a_image, inplace=True)
                out_text = a_text if not compute else sub.put(out_text, a_text, inplace=True)
            if index == 0:
                fb_reuse = self._fbcache_decisions(slots, image, out_image, samples, local_rows, forced)
            self._count_block(index, call, image, text, samples, local_rows, reuse, maps)
            image, text = out_image, out_text
        return image, text

    def _may_reuse(self, index: int, sample: SampleState, forced: bool, tea_reuse: bool, fb_reuse: bool) -> bool:
        """Whether ``sample`` could reuse block ``index`` at all this step (before measuring its change)."""
        p = sample.params
        state = sample.reuse[index]
        if forced or p.method == "none" or not state.computed_once:
            return False
        if p.method == "fastcache":
            return p.tolerance > 0.0 and state.consecutive_reuses < p.max_skip_steps
        if p.method == "teacache":
            return tea_reuse
        return index > 0 and fb_reuse  # fbcache: block 0 always computes

    def _decide(self, index: int, sample: SampleState, phase: int, change: float | None, dof: int,
                maps: ApproximatorSet) -> bool:
        """Whether ``sample`` reuses block ``index`` this step and update its reuse state. ``change`` is
        ``None`` when it cannot reuse (see ``_may_reuse``); the peers' stack-level rules already said yes."""
        p = sample.params
        state = sample.reuse[index]
        if change is None:
            reuse = False
        elif p.method == "fastcache":
            tolerance = p.tolerance * maps.block_scale(index, phase)
            reuse = fastcache_reuses_block(change, tolerance, p.significance, dof, state, p.max_skip_steps,
                                           self.config.accumulation_limit)
        else:  # teacache / fbcache candidates reuse: their rule decided for the whole stack or tail
            reuse = True
        if reuse:
            state.record_reuse(change if math.isfinite(change) else 0.0)
        else:
            sample.previous_computed_at[index] = sample.computed_at[index] if state.computed_once else -1
            state.record_compute()
            sample.computed_at[index] = sample.step
        return reuse

    def _approximate(self, index: int, maps: ApproximatorSet, cache: "_CachedBlock", sub: "_RowSubset",
                     samples: list[SampleState], local_rows: list[list[int]],
                     phases: list[int]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Linear approximation of block ``index`` for the reusing rows ``sub``."""
        row_sample = {r: k for k, rs in enumerate(local_rows) for r in rs}
        ks = [row_sample[r] for r in sub.rows]
        gaps = torch.tensor([samples[k].step - samples[k].computed_at[index] for k in ks],
                            device=cache.image_in.device, dtype=cache.image_in.dtype)
        row_phases = [phases[k] for k in ks]
        fitted = [samples[k].params.method == "fastcache" for k in ks]
        identity = LinearApproximator()

        def approx(name: str, cached_out: torch.Tensor, diff: torch.Tensor, velocity: torch.Tensor | None) -> torch.Tensor:
            m = maps.get(name)
            if all(fitted):
                return m.apply(cached_out, diff, gaps, row_phases, velocity)
            if not any(fitted) or m.is_identity:
                return identity.apply(cached_out, diff, gaps, row_phases)
            out = identity.apply(cached_out, diff, gaps, row_phases)
            f = torch.tensor([i for i, v in enumerate(fitted) if v], device=diff.device)
            out.index_copy_(0, f, m.apply(cached_out.index_select(0, f), diff.index_select(0, f),
                                          gaps.index_select(0, f), [row_phases[i] for i in f.tolist()],
                                          None if velocity is None else velocity.index_select(0, f)))
            return out

        image = approx(f"block{index}.image", sub.take(cache.image_out), sub.take(cache.image_diff),
                       sub.take(cache.image_velocity))
        text = None
        if cache.text_diff is not None and cache.text_out_valid:
            text = approx(f"block{index}.text", sub.take(cache.text_out), sub.take(cache.text_diff),
                          sub.take(cache.text_velocity))
        return image, text

    # -- the peers' stack-level rules

    def _teacache_decisions(self, call: dict[str, Any], rows: torch.Tensor | None, slots: torch.Tensor,
                            image: torch.Tensor, samples: list[SampleState], local_rows: list[list[int]],
                            forced: list[bool]) -> list[bool]:
        """TeaCache: reuse the whole stack while the accumulated rescaled change stays below tolerance."""
        decisions = [False] * len(samples)
        members = [k for k, s in enumerate(samples) if s.params.method == "teacache"]
        if not members:
            return decisions
        local = [r for k in members for r in local_rows[k]]
        sub = _RowSubset(local, image.shape[0], image.device)
        batch_rows = sub.take(rows) if rows is not None else sub.index
        modulated = self.adapter.modulated_input(self.blocks[0], self.adapter.select_rows(call, batch_rows),
                                                 sub.take(image))
        pool = self._pool_tensor("teacache.prev", modulated)
        previous = gather_rows(pool, sub.take(slots), None)
        abs_diff = (modulated - previous).abs().flatten(1).sum(1)
        abs_prev = previous.abs().flatten(1).sum(1)
        values = torch.stack([abs_diff, abs_prev]).float().cpu().tolist()
        write_rows(pool, sub.take(slots), None, modulated)
        coefficients = self.approximators.metadata.get("teacache_coefficients", [1.0, 0.0])
        position = {r: i for i, r in enumerate(local)}
        for k in members:
            sample = samples[k]
            idx = [position[r] for r in local_rows[k]]
            change = sum(values[0][i] for i in idx) / max(sum(values[1][i] for i in idx), 1e-12)
            if forced[k] or sample.step == 0:
                sample.teacache_accumulated = 0.0
                continue
            sample.teacache_accumulated += max(0.0, _polyval(coefficients, change))
            if teacache_reuses_stack(sample.teacache_accumulated, sample.params.tolerance):
                decisions[k] = True
            else:
                sample.teacache_accumulated = 0.0
        return decisions

    def _fbcache_decisions(self, slots: torch.Tensor, block_in: torch.Tensor, block_out: torch.Tensor,
                           samples: list[SampleState], local_rows: list[list[int]], forced: list[bool]) -> list[bool]:
        """First-Block-Cache: reuse blocks 1.. while block 0's residual barely changed since the last compute."""
        decisions = [False] * len(samples)
        members = [k for k, s in enumerate(samples) if s.params.method == "fbcache"]
        if not members:
            return decisions
        local = [r for k in members for r in local_rows[k]]
        sub = _RowSubset(local, block_in.shape[0], block_in.device)
        residual = sub.take(block_out) - sub.take(block_in)
        pool = self._pool_tensor("fbcache.residual", residual)
        previous = gather_rows(pool, sub.take(slots), None)
        values = torch.stack([(residual - previous).abs().flatten(1).sum(1),
                              previous.abs().flatten(1).sum(1)]).float().cpu().tolist()
        position = {r: i for i, r in enumerate(local)}
        store = []
        for k in members:
            sample = samples[k]
            idx = [position[r] for r in local_rows[k]]
            change = sum(values[0][i] for i in idx) / max(sum(values[1][i] for i in idx), 1e-12)
            valid = sample.step > 0 and not forced[k] and sample.reuse[-1].computed_once
            decisions[k] = valid and fbcache_reuses_tail(change, sample.params.tolerance)
            if not decisions[k]:
                store.extend(idx)
        if store:
            keep = torch.tensor(store, device=residual.device)
            write_rows(pool, sub.take(slots).index_select(0, keep), None, residual.index_select(0, keep))
        return decisions

    # -- counters

    def _count_full_cost(self, call: dict[str, Any], image: torch.Tensor, text: torch.Tensor | None) -> None:
        ctx = self._ctx
        full = sum(self._block_macs(i, call, image, text, image.shape[1]) for i in range(len(self.blocks)))
        rows_per_sample = [0] * len(ctx.samples)
        for s in ctx.row_sample:
            rows_per_sample[s] += 1
        for sample, n_rows in zip(ctx.samples, rows_per_sample):
            sample.stats.macs_full += full * n_rows

    def _count_block(self, index: int, call: dict[str, Any], image: torch.Tensor, text: torch.Tensor | None,
                     samples: list[SampleState], local_rows: list[list[int]],
                     reuse: list[bool], maps: ApproximatorSet) -> None:
        tokens = image.shape[1]
        computed_macs = None
        for k, sample in enumerate(samples):
            stats = sample.stats
            if reuse[k]:
                stats.blocks_approximated += 1
                if sample.params.method == "fastcache":
                    per_token = maps.get(f"block{index}.image").macs_per_token()
                    stats.macs_computed += per_token * tokens * len(local_rows[k])
            else:
                stats.blocks_computed += 1
                if computed_macs is None:
                    computed_macs = self._block_macs(index, call, image, text, tokens)
                stats.macs_computed += computed_macs * len(local_rows[k])

    def _block_macs(self, index: int, call: dict[str, Any], image: torch.Tensor, text: torch.Tensor | None,
                    tokens: int) -> float:
        """Measured MACs of block ``index`` on one row with ``tokens`` image tokens (see BlockCostModel)."""
        full_tokens = self._full_tokens
        key = (index, full_tokens, None if text is None else text.shape[1], image.shape[-1], image.dtype)
        original = self._originals[index]

        def measure(n: int) -> None:
            ref_image, ref_text, ref_rows = self._reference
            positions = torch.arange(n, device=image.device)[None] if self.adapter.needs_shared_positions else None
            t = None if ref_text is None else ref_text[:1]
            self.adapter.call_block(original, call, ref_rows[:1], ref_image[:1, :n], t, positions)

        return self._costs.macs(key, tokens, measure, full_tokens)


class _RowSubset:
    """A subset of a group's rows, with helpers that skip the gather when it is every row."""

    def __init__(self, rows: Iterable[int], n_rows: int, device: torch.device) -> None:
        self.rows = sorted(rows)
        self.every = self.rows == list(range(n_rows))
        self.index = torch.tensor(self.rows, device=device)

    def take(self, tensor: torch.Tensor | None) -> torch.Tensor | None:
        if tensor is None or self.every:
            return tensor
        return tensor.index_select(0, self.index)

    def put(self, base: torch.Tensor | None, values: torch.Tensor | None, inplace: bool = False) -> torch.Tensor | None:
        """``base`` with this subset's rows replaced by ``values`` (``None`` if either is missing)."""
        if base is None or values is None:
            return None
        if self.every:
            return values
        out = base if inplace else base.clone()
        out.index_copy_(0, self.index, values.to(out.dtype))
        return out


class _CachedBlock:
    """One block's cached inputs/outputs for a group's rows (at its token positions) for one step.

    The pools are looked up at once; the cached rows are gathered only when a decision or an
    approximation needs them.
    """

    def __init__(self, owner: FastCache, index: int, slots: torch.Tensor, positions: torch.Tensor | None,
                 image: torch.Tensor, text: torch.Tensor | None) -> None:
        pool = owner._pool
        full = (owner._full_tokens, image.shape[-1])
        self._pools = {
            "in": pool.get(f"block{index}.in", full, image.dtype, image.device),
            "out": pool.get(f"block{index}.out", full, image.dtype, image.device),
        }
        if text is not None:
            self._pools["text_in"] = pool.get(f"block{index}.text_in", tuple(text.shape[1:]), text.dtype, text.device)
            if f"block{index}.text_out" in pool.tensors:  # the last SD3 block returns no text stream
                self._pools["text_out"] = pool.tensors[f"block{index}.text_out"]
        self.text_out_valid = "text_out" in self._pools
        maps = owner._maps(image.device, image.dtype)
        self._velocity_streams = [stream for stream in ("image", "text")
                                  if maps.get(f"block{index}.{stream}").uses_velocity
                                  and (stream == "image" or self.text_out_valid)]
        for stream in self._velocity_streams:
            like = image if stream == "image" else text
            shape = full if stream == "image" else tuple(text.shape[1:])
            self._pools[f"{stream}_velocity"] = pool.get(f"block{index}.{stream}_velocity", shape, like.dtype, like.device)
        self._slots, self._positions, self._has_text = slots, positions, text is not None
        self.image_velocity = self.text_velocity = None
        self.image_in = self.image_out = self.image_diff = None
        self.text_in = self.text_out = self.text_diff = None
        self._owner = owner
        self._index = index

    def load(self, image: torch.Tensor, text: torch.Tensor | None) -> None:
        """Gather the cached rows and their differences to the current inputs (once)."""
        if self.image_in is not None:
            return
        self.image_in = gather_rows(self._pools["in"], self._slots, self._positions)
        self.image_out = gather_rows(self._pools["out"], self._slots, self._positions)
        self.image_diff = image - self.image_in
        if "image" in self._velocity_streams:
            self.image_velocity = gather_rows(self._pools["image_velocity"], self._slots, self._positions)
        if "text" in self._velocity_streams:
            self.text_velocity = gather_rows(self._pools["text_velocity"], self._slots, None)
        if self._has_text:
            self.text_in = gather_rows(self._pools["text_in"], self._slots, None)
            self.text_diff = text - self.text_in
            if self.text_out_valid:
                self.text_out = gather_rows(self._pools["text_out"], self._slots, None)

    def relative_changes(self, image: torch.Tensor, text: torch.Tensor | None,
                         local_rows: list[list[int]]) -> list[float]:
        """Per sample, ``||H - H_c|| / ||H_c||`` over its rows and both streams (one host sync)."""
        self.load(image, text)
        num = self.image_diff.float().pow(2).flatten(1).sum(1)
        den = self.image_in.float().pow(2).flatten(1).sum(1)
        if text is not None:
            num = num + self.text_diff.float().pow(2).flatten(1).sum(1)
            den = den + self.text_in.float().pow(2).flatten(1).sum(1)
        values = torch.stack([num, den]).cpu().tolist()
        changes = []
        for rows in local_rows:
            d = sum(values[1][r] for r in rows)
            changes.append(math.sqrt(sum(values[0][r] for r in rows) / d) if d > 0 else math.inf)
        return changes

    @property
    def tracks_velocity(self) -> bool:
        """Whether this block's maps use the residual velocity (so computes must record it)."""
        return bool(self._velocity_streams)

    def store(self, slots: torch.Tensor, positions: torch.Tensor | None, image_in: torch.Tensor,
              image_out: torch.Tensor, text_in: torch.Tensor | None, text_out: torch.Tensor | None,
              steps_between: torch.Tensor | None = None) -> None:
        """Record a real computation of the block for rows ``slots``; with ``steps_between`` (steps since
        each row's previous compute, 0 = none) also the per-step change of the block's residual."""
        if steps_between is not None:
            per_step = torch.where(steps_between > 0, 1.0 / steps_between.clamp_min(1), torch.zeros_like(steps_between))
            for stream in self._velocity_streams:
                new_in, new_out = (image_in, image_out) if stream == "image" else (text_in, text_out)
                old_in = gather_rows(self._pools["in" if stream == "image" else "text_in"], slots,
                                     positions if stream == "image" else None)
                old_out = gather_rows(self._pools["out" if stream == "image" else "text_out"], slots,
                                      positions if stream == "image" else None)
                velocity = ((new_out - new_in) - (old_out - old_in)) * per_step[:, None, None]
                write_rows(self._pools[f"{stream}_velocity"], slots, positions if stream == "image" else None, velocity)
        write_rows(self._pools["in"], slots, positions, image_in)
        write_rows(self._pools["out"], slots, positions, image_out)
        if text_in is not None:
            write_rows(self._pools["text_in"], slots, None, text_in)
        if text_out is not None:
            pool = self._owner._pool.get(f"block{self._index}.text_out", tuple(text_out.shape[1:]),
                                         text_out.dtype, text_out.device)
            write_rows(pool, slots, None, text_out)


def _polyval(coefficients: Sequence[float], x: float) -> float:
    """Evaluate a polynomial given highest power first (numpy.polyfit order)."""
    value = 0.0
    for c in coefficients:
        value = value * x + c
    return value


def apply_fastcache(transformer: nn.Module, config: FastCacheConfig | None = None) -> FastCache:
    """Attach FastCache to a diffusers DiT, PixArt, SD3 or Flux transformer; returns the handle.

    >>> cache = apply_fastcache(pipe.transformer, FastCacheConfig())
    >>> images = pipe(...).images          # plain diffusers call, default params
    >>> cache.stats()                      # per-sample counters of the last run
    >>> cache.remove()                     # the transformer's own forward is back
    """
    return FastCache(transformer, config)
