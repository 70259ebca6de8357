"""Running and timing denoising loops at a model shape through the engine's model code.

A run is what the serving engine's ``StepRunner`` does for a batch: ``FamilyRunner.prepare`` per image
(registered with the cache first), then per step one ``FamilyRunner.forward`` for every image and one
scheduler step each. Runs that are compared are stepped in lockstep (``interleaved``): on a shared or
throttled machine a run's speed drifts by 20% from one minute to the next, so back-to-back steps are
what can be compared. The uncached reference runs the same loop on the same weights with no cache
attached (``forward(samples, None)``); the cached variants run on a structural copy of the
transformer that shares its weights, so no hook ever touches the reference.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from bench.cache.runner import share_parameters_clone
from fastcache_core import FastCache, FastCacheConfig, apply_fastcache
from fastcache_core.config import CacheParams
from fastcache_core.stats import SampleStats
from service.engine.families import FamilyRunner, GenerationSpec, runner_for


@dataclass
class LoopResult:
    """One timed denoising loop."""

    seconds: float
    """Wall-clock of the steps (prompt encoding before and decoding after are not included)."""
    steps: int
    images: int
    stats: list[SampleStats]
    pool_bytes: int = 0
    """Bytes of the cache's pooled per-row tensors at the end of the loop (allocated, all slots)."""
    pool_slots: int = 0
    """Row slots the pool holds (it grows by doubling, at least 4)."""
    step_seconds: list[float] = field(default_factory=list)

    @property
    def seconds_per_step(self) -> float:
        return self.seconds / self.steps

    @property
    def mac_fraction(self) -> float:
        """Mean over the images of the cache's measured MAC fraction (1 without a cache)."""
        return sum(s.mac_fraction for s in self.stats) / len(self.stats) if self.stats else 1.0


@dataclass
class ShapeBench:
    """A shape's pipeline ready to run: the reference family runner and the cached one.

    Args:
        pipe: the random-weight pipeline (its transformer is the uncached reference).
        device, dtype: where and in which precision the transformers run.
    """

    pipe: Any
    device: str
    dtype: torch.dtype

    def __post_init__(self) -> None:
        self.pipe.to(self.device, self.dtype)
        self.reference = runner_for(self.pipe, torch.device(self.device), self.dtype)
        cached_pipe = copy.copy(self.pipe)
        # plain attribute: DiffusionPipeline.__setattr__ would re-register the component in the shared config
        object.__setattr__(cached_pipe, "transformer", share_parameters_clone(self.pipe.transformer))
        self.cached = runner_for(cached_pipe, torch.device(self.device), self.dtype)
        self.cache: FastCache = apply_fastcache(cached_pipe.transformer, FastCacheConfig())

    def close(self) -> None:
        self.cache.remove()

    def sync(self) -> None:
        if self.device.startswith("cuda"):
            torch.cuda.synchronize(self.device)

    def specs(self, images: int, steps: int, guidance: float, size: int, params: CacheParams) -> list[GenerationSpec]:
        """``images`` requests of one image each (seed = index), the family's prompt, ``params``."""
        prompt = "0" if self.reference.family == "dit" else "a photo of a red cat on a tree"
        spec = GenerationSpec(prompt, None, steps, guidance, 0, size, size, params)
        return [replace(spec, seed=i) for i in range(images)]

    def start(self, specs: list[GenerationSpec], cached: bool, tag: str) -> DenoisingRun:
        """Prepare ``specs`` as one batch of the engine, with the cache or without (see the module doc)."""
        return DenoisingRun(self, specs, cached, tag)

    def loop(self, specs: list[GenerationSpec], cached: bool) -> LoopResult:
        """Denoise ``specs`` to the end; the result with its wall-clock."""
        return interleaved({"run": self.start(specs, cached, "loop")})["run"]


class DenoisingRun:
    """One batch of requests being denoised step by step, each step timed on its own."""

    def __init__(self, bench: ShapeBench, specs: list[GenerationSpec], cached: bool, tag: str) -> None:
        self.bench = bench
        self.family: FamilyRunner = bench.cached if cached else bench.reference
        self.cache = bench.cache if cached else None
        self.specs = specs
        self.ids = [(tag, i) for i in range(len(specs))]
        self.samples: list[Any] = []
        self.seconds = 0.0
        self.step_seconds: list[float] = []
        try:
            for sample_id, spec in zip(self.ids, specs, strict=True):
                if self.cache is not None:
                    self.cache.add_sample(sample_id, spec.cache, spec.steps, self.family.cache_guidance(spec))
                self.samples.append(self.family.prepare(sample_id, spec))
        except BaseException:
            self.finish()
            raise

    @property
    def done(self) -> bool:
        return self.samples[0].done

    @torch.no_grad()
    def step(self) -> float:
        """One denoising step of every image (one transformer forward); its seconds."""
        self.bench.sync()
        began = time.perf_counter()
        for sample, output in zip(self.samples, self.family.forward(self.samples, self.cache), strict=True):
            self.family.step(sample, output)
        self.bench.sync()
        seconds = time.perf_counter() - began
        self.seconds += seconds
        self.step_seconds.append(seconds)
        return seconds

    def finish(self) -> LoopResult:
        """Unregister the images from the cache; the run's result."""
        pool_bytes = self.cache.pool.nbytes if self.cache is not None else 0
        pool_slots = self.cache.pool.capacity if self.cache is not None else 0
        stats = []
        if self.cache is not None:
            stats = [self.cache.remove_sample(sample_id) for sample_id in self.ids[: len(self.samples)]]
        return LoopResult(
            self.seconds, self.specs[0].steps, len(self.specs), stats, pool_bytes, pool_slots, self.step_seconds
        )


def interleaved(runs: dict[str, DenoisingRun], on_step: Callable[[], None] | None = None) -> dict[str, LoopResult]:
    """Step all ``runs`` in lockstep, their steps back to back in an order that rotates every step, so
    a slow minute of the machine falls on every run alike; each run's result."""
    names = list(runs)
    try:
        index = 0
        while not all(run.done for run in runs.values()):
            for name in names[index % len(names) :] + names[: index % len(names)]:
                if not runs[name].done:
                    runs[name].step()
            index += 1
            if on_step is not None:
                on_step()
    finally:
        results = {name: run.finish() for name, run in runs.items()}
    return results


def cache_bytes_per_image(result: LoopResult, rows_per_image: int) -> float:
    """The cache's pooled state per image: bytes per row slot times the image's rows (2 with guidance)."""
    if not result.pool_slots:
        return 0.0
    return result.pool_bytes / result.pool_slots * rows_per_image
