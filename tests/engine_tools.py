"""In-process engines over tiny real pipelines, jobs that record what happened to them, fault injection."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

import torch

from fastcache_core import CacheParams
from service.engine.engine import Engine, Job, JobResult
from service.engine.families import DiTRunner, GenerationSpec
from tests.servers import wait_until


class FaultyDiTRunner(DiTRunner):
    """The real DiT runner with faults injected for chosen seeds (a request that breaks the model)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.fail_prepare: set[int] = set()
        self.fail_forward: set[int] = set()  # the forward raises whenever such an image is in the batch
        self.fail_decode: set[int] = set()

    def prepare(self, sample_id, spec):
        if spec.seed in self.fail_prepare:
            raise RuntimeError(f"injected preparation fault (seed {spec.seed})")
        return super().prepare(sample_id, spec)

    def forward(self, samples, cache):
        bad = [s.spec.seed for s in samples if s.spec.seed in self.fail_forward and s.step >= 2]
        if bad:
            raise RuntimeError(f"injected step fault (seeds {bad})")
        return super().forward(samples, cache)

    def decode(self, samples):
        if any(s.spec.seed in self.fail_decode for s in samples):
            raise RuntimeError("injected decoding fault")
        return super().decode(samples)


def make_engine(pipe, max_batch_size: int = 4, runner_cls=FaultyDiTRunner, **kwargs: Any) -> Engine:
    runner = runner_cls(pipe, torch.device("cpu"), torch.float32)
    engine = Engine(runner, "tiny-dit", max_batch_size=max_batch_size, max_queue=64, **kwargs)
    engine.start(warmup=True)
    wait_until(lambda: engine.ready, 120, lambda: f"engine not ready: {engine.startup_error}")
    return engine


def close_engine(engine: Engine) -> None:
    engine.shutdown(drain=False, timeout=60)
    engine.cache.remove()


@dataclass
class Recorder:
    """Jobs whose events and results are recorded in one global order (thread-safe)."""

    log: list[tuple[str, str, Any]] = field(default_factory=list)  # (job id, "step" | "done", payload)
    results: dict[str, JobResult] = field(default_factory=dict)
    done_threads: dict[str, str] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def job(
        self,
        job_id: str,
        *,
        seed: int = 0,
        steps: int = 8,
        size: int = 16,
        n: int = 1,
        prompt: str = "3",
        tolerance: float = 0.5,
        guidance: float = 2.0,
        output_format: str = "png",
    ) -> Job:
        spec = GenerationSpec(prompt, None, steps, guidance, seed, size, size, CacheParams(tolerance=tolerance))
        return Job(
            job_id=job_id,
            spec=spec,
            n=n,
            output_format=output_format,
            on_event=lambda event, j=job_id: self._record(j, "step", event),
            on_done=lambda result, j=job_id: self._done(j, result),
        )

    def _record(self, job_id: str, kind: str, payload: Any) -> None:
        with self._lock:
            self.log.append((job_id, kind, payload))

    def _done(self, job_id: str, result: JobResult) -> None:
        with self._lock:
            self.results[job_id] = result
            self.done_threads[job_id] = threading.current_thread().name
            self.log.append((job_id, "done", result.status))

    def wait(self, *job_ids: str, timeout: float = 300) -> list[JobResult]:
        wait_until(
            lambda: all(j in self.results for j in job_ids),
            timeout,
            lambda: f"jobs not finished: {[j for j in job_ids if j not in self.results]}",
        )
        return [self.results[j] for j in job_ids]

    def steps_of(self, job_id: str) -> list[int]:
        with self._lock:
            return [p["step"] for j, kind, p in self.log if j == job_id and kind == "step"]

    def position(self, job_id: str, kind: str, step: int | None = None) -> int:
        """Index in the global log of the job's first ``kind`` entry (at ``step`` when given)."""
        with self._lock:
            for index, (j, k, payload) in enumerate(self.log):
                if j == job_id and k == kind and (step is None or payload["step"] == step):
                    return index
        raise AssertionError(f"{job_id} has no {kind} entry")


def admit_together(engine: Engine, recorder: Recorder, jobs: list[Job]) -> None:
    """Submit ``jobs`` so that they are admitted at one step boundary: a blocker fills the batch while they
    queue, then leaves (cancelled), freeing every slot at once."""
    blocker = recorder.job("blocker", steps=1000, n=engine.max_batch_size, size=engine.limits.min_size)
    engine.submit(blocker)
    wait_until(lambda: recorder.steps_of("blocker"), 60, lambda: "the blocker never ran")
    for job in jobs:
        engine.submit(job)
    wait_until(lambda: engine.queue_depth == len(jobs), 30, lambda: "jobs not queued")
    engine.cancel("blocker")
    recorder.wait("blocker")
