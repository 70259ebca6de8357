"""``apply_fastcache``: attach FastCache to a diffusers transformer; the handle that registers samples.

FastCache decides per sample and step whether the transformer's block stack really runs for the
sample or its output is forecast from the sample's own history of real computes (``forecast.py``),
by the sample's method (``methods/``: FastCache's rule and its chi-square test, or a per-sample peer),
with per-phase coefficients fitted by calibration (``profile.py``, ``calibration.py``). Real computes
may run only a sample's moving tokens and merge redundant ones (``token_selection.py``). The block loop
of a step lives in ``stack.py``; the diffusers hooks that attach it in ``hooks.py``.

Plain pipeline calls work unchanged: each new denoising run (detected from the timestep going up
again or the batch size changing) starts fresh per-sample state with the default params (see
:meth:`FastCache.set_run`), and guidance pairs are recognised by their identical latents. A batch
runner instead registers samples with :meth:`FastCache.add_sample`, says before every forward which
sample and guidance branch each batch row is (:meth:`FastCache.bind`) and retires samples with
:meth:`FastCache.remove_sample`, so samples can join and leave between steps. A sample's result
depends only on its own rows.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Hashable, Sequence
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from fastcache_core import hooks
from fastcache_core.adapters import TransformerAdapter, adapter_for
from fastcache_core.config import CacheParams, FastCacheConfig
from fastcache_core.forecast import StackHistory
from fastcache_core.profile import load_profile, phase_of
from fastcache_core.stack import StackRunner
from fastcache_core.state import RowPool, RowState, SampleState
from fastcache_core.stats import SampleStats
from fastcache_core.step import StepContext

logger = logging.getLogger(__name__)

RowKey = tuple[Hashable, int]
"""A batch row: (sample id, guidance branch)."""


class FastCache:
    """Handle of FastCache attached to one transformer (returned by :func:`apply_fastcache`)."""

    def __init__(self, transformer: nn.Module, config: FastCacheConfig | None = None) -> None:
        self.transformer = transformer
        self.config = config or FastCacheConfig()
        self.adapter: TransformerAdapter = adapter_for(transformer)
        self.blocks = self.adapter.blocks(transformer)
        self.profile = load_profile(self.config.calibration, self.config.use_calibration, transformer)
        calibrated = self.profile.metadata.get("default_params")
        self.default_params = self.config.params.resolved(CacheParams.from_dict(calibrated) if calibrated else None)
        self.pool = RowPool()
        self.history = StackHistory(self.pool)
        self._samples: dict[Hashable, SampleState] = {}
        self._rows: dict[RowKey, RowState] = {}
        self._fresh_slots: list[int] = []
        self._bound: list[RowKey] | None = None
        self._plain_ids: list[Hashable] = []
        self._plain_last: tuple[int, float] | None = None
        self._plain_paired = False
        self._plain_params: CacheParams | Sequence[CacheParams] | None = None
        self._plain_steps: int | None = None
        self._plain_guidance: float | None = None
        self._plain_counter = 0
        self._step: StepContext | None = None
        self._forward_signature = inspect.signature(transformer.forward)
        if getattr(transformer, "_fastcache", None) is not None:
            raise RuntimeError("FastCache is already applied to this transformer; call .remove() first")
        hooks.attach(self)
        self._runner = StackRunner(
            transformer,
            self.adapter,
            self.blocks,
            self.config,
            self.profile,
            self.pool,
            self.history,
            lambda: hooks.block_callables(self.blocks),
        )
        transformer.__dict__["_fastcache"] = self  # marks the module (nn.Module's setattr is typed for tensors/modules)

    # ------------------------------------------------------------------ public API

    def remove(self) -> None:
        """Detach: remove the hooks (diffusers' ``remove_hook``) and every cached tensor."""
        hooks.detach(self)
        self._runner.kv.uninstall()
        self.pool.clear()
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

    def set_run(
        self,
        params: CacheParams | Sequence[CacheParams] | None = None,
        num_steps: int | None = None,
        guidance_scale: float | None = None,
    ) -> None:
        """Params (one for all samples, or one per sample), step count and guidance scale for following
        plain pipeline calls.

        Knowing ``num_steps`` lets the last ``config.last_steps`` steps be computed in full; methods may
        read both (FastCache's rule does: see ``methods/fastcache.py``).
        """
        self._plain_params = params
        self._plain_steps = num_steps
        self._plain_guidance = guidance_scale

    def add_sample(
        self,
        sample_id: Hashable,
        params: CacheParams | None = None,
        num_steps: int | None = None,
        guidance_scale: float | None = None,
    ) -> None:
        """Register a sample for batch-runner use; its rows join the batch through :meth:`bind`.

        ``num_steps`` and ``guidance_scale`` are the sample's run (``None``: unknown)."""
        if sample_id in self._samples:
            raise ValueError(f"sample {sample_id!r} is already registered")
        params = params or CacheParams()
        # the model's defaults are calibrated for its default method: another method's omitted fields
        # take the library defaults (a FastCache tolerance is no TeaCache threshold)
        same_method = params.method in (None, self.default_params.method)
        resolved = params.resolved(self.default_params if same_method else None)
        if not self.config.enabled:
            resolved = replace(resolved, method="none")
        state = SampleState.create(sample_id, resolved, num_steps, guidance_scale)
        state.stats = SampleStats(
            sample_id=sample_id,
            method=resolved.method,
            params=resolved.to_dict(),
            approximator=state.method.approximator(self.profile),
        )
        self._samples[sample_id] = state

    def remove_sample(self, sample_id: Hashable) -> SampleStats:
        """Retire a sample, free its rows' cache slots and return its counters."""
        state = self._samples.pop(sample_id)
        for key in [k for k, row in self._rows.items() if row.sample is state]:
            self.pool.release(self._rows.pop(key).slot)
        return state.stats

    def release_idle_memory(self) -> int:
        """Free the pooled cache tensors when no sample is registered (e.g. after a burst); returns bytes freed.

        A serving loop calls this when it has been idle a while; the pool grows again on the next forward.
        """
        if self._samples:
            return 0
        self._fresh_slots.clear()
        return self.pool.shrink()

    def bind(self, rows: Sequence[RowKey] | None) -> None:
        """Declare the (sample id, guidance branch) of every row of the next forwards; ``None`` = plain mode.

        Branch 0 is the conditional row, 1 the unconditional one (a sample without guidance has only 0)."""
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
        """Whether a fitted profile is loaded (else: unit gain, no noise floor, unit phase weights)."""
        return self.profile.fitted

    # ------------------------------------------------------------------ set-up

    # ------------------------------------------------------------------ per forward (called by hooks)

    @property
    def current_step(self) -> StepContext | None:
        """The step context of the forward in progress (``None`` between forwards)."""
        return self._step

    def begin_step(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """Open the step context of a transformer forward: which sample and branch each row is, and when."""
        bound = self._forward_signature.bind(*args, **kwargs).arguments
        hidden = bound.get("hidden_states")
        timestep = bound.get("timestep")
        unsupported = [k for k in self.adapter.unsupported_forward_kwargs if bound.get(k) is not None]
        if unsupported or hidden is None or timestep is None:
            if unsupported:
                logger.warning("FastCache: %s given; running this forward uncached", ", ".join(unsupported))
            self._step = StepContext([], [], [], None, bypass=True)
            return
        batch = hidden.shape[0]
        if not torch.is_tensor(timestep):
            timestep = torch.tensor([float(timestep)], device=hidden.device)
        times = self.adapter.normalized_time(timestep)
        times = times.expand(batch) if times.numel() == 1 else times
        host_times = times.tolist()  # one small read per step: phases, new-run detection
        keys = self._bound if self._bound is not None else self._plain_rows(hidden, host_times)
        if len(keys) != batch:
            raise ValueError(f"bound {len(keys)} rows but the batch has {batch}")
        rows: list[RowState] = []
        samples: list[SampleState] = []
        sample_rows: list[list[int]] = []
        index_of: dict[int, int] = {}
        num_phases = self.profile.num_phases
        for row_index, (key, t) in enumerate(zip(keys, host_times, strict=True)):
            row = self._row(key)
            rows.append(row)
            sid = id(row.sample)
            if sid not in index_of:
                index_of[sid] = len(samples)
                samples.append(row.sample)
                sample_rows.append([])
                row.sample.phase = phase_of(t, num_phases)
                row.sample.time = t
            sample_rows[index_of[sid]].append(row_index)
        self._step = StepContext(rows, samples, sample_rows, times.to(hidden.device))

    def end_step(self) -> None:
        """Close the step context: every sample of the step advances one step."""
        step, self._step = self._step, None
        if step is None or step.bypass:
            return
        for sample in step.samples:
            sample.step += 1
            sample.stats.steps += 1

    def run_stack(self, first_block: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """Run the whole block stack of the step (called in place of the first block)."""
        step = self._step
        assert step is not None
        call = self.adapter.bind_call(first_block, args, kwargs)
        if self._fresh_slots:  # once per joining row, not per step
            fresh = torch.tensor(self._fresh_slots, device=call["hidden_states"].device)
            self._fresh_slots.clear()
            self.pool.zero_rows(fresh)
        step.output = self._runner.run(step, call)
        return step.output

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
        if new_run:
            # guidance: pipelines duplicate the latents for the (cond, uncond) halves of the batch;
            # checked once per run, not per step (it reads the latents)
            self._plain_paired = batch % 2 == 0 and torch.equal(hidden[: batch // 2], hidden[batch // 2 :])
            per_sample = batch // 2 if self._plain_paired else batch
            for sample_id in self._plain_ids:
                if sample_id in self._samples:
                    self.remove_sample(sample_id)
            self._plain_counter += 1
            self._plain_ids = [("run", self._plain_counter, i) for i in range(per_sample)]
            params = self._plain_params
            for i, sample_id in enumerate(self._plain_ids):
                one = params if params is None or isinstance(params, CacheParams) else params[i]
                self.add_sample(sample_id, one, self._plain_steps, self._plain_guidance if self._plain_paired else None)
                self._samples[sample_id].cond_branch = self.adapter.plain_cond_branch
        if self._plain_paired:
            return [(i, 0) for i in self._plain_ids] + [(i, 1) for i in self._plain_ids]
        return [(i, 0) for i in self._plain_ids]

    def _row(self, key: RowKey) -> RowState:
        row = self._rows.get(key)
        if row is None:
            sample = self._samples[key[0]]
            row = RowState(sample, key[1], self.pool.acquire())
            self._rows[key] = row
            self._fresh_slots.append(row.slot)
        return row


def apply_fastcache(transformer: nn.Module, config: FastCacheConfig | None = None) -> FastCache:
    """Attach FastCache to a diffusers DiT, PixArt, SD3 or Flux transformer; returns the handle.

    >>> cache = apply_fastcache(pipe.transformer, FastCacheConfig())
    >>> images = pipe(...).images          # plain diffusers call, default params
    >>> cache.stats()                      # per-sample counters of the last run
    >>> cache.remove()                     # diffusers' remove_hook: the transformer is as before
    """
    return FastCache(transformer, config)
