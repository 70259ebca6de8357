"""The model side of the engine: prepares jobs, runs one denoising step for a group, decodes.

Everything here runs on the engine's model thread. Each operation isolates failures per job: a
request whose preparation, step or decoding raises fails alone with a clear error, and the other
jobs of its batch carry on. The step runner owns the jobs' images in flight (their latents and
schedulers, ``Sample``), from ``prepare`` to ``release``; the engine asks it for a job's progress.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Hashable
from dataclasses import replace
from typing import Any

from fastcache_core import FastCache
from fastcache_core.stats import SampleStats
from service.engine.families import FamilyRunner, GenerationSpec, InvalidField, Sample
from service.engine.job import Job, JobError

logger = logging.getLogger(__name__)


class StepRunner:
    """One ``FamilyRunner`` with FastCache attached: per-job preparation, batched steps, decoding."""

    def __init__(self, family: FamilyRunner, cache: FastCache) -> None:
        self.family = family
        self.cache = cache
        self._samples: dict[str, list[Sample]] = {}  # job id -> its images in flight, prepare to release

    def compat_key(self, job: Job) -> tuple[Hashable, ...]:
        return self.family.compat_key(job.spec)

    def prepare(self, job: Job) -> JobError | None:
        """Register the job's images with the cache and build their latents; an error instead if that fails.

        On failure nothing of the job is left registered in the cache.
        """
        registered = []
        samples = []
        try:
            for i in range(job.n):
                spec: GenerationSpec = replace(job.spec, seed=job.spec.seed + i)
                sample_id = (job.job_id, i)
                self.cache.add_sample(sample_id, spec.cache, spec.steps, self.family.cache_guidance(spec))
                registered.append(sample_id)
                samples.append(self.family.prepare(sample_id, spec))
        except Exception as error:
            for sample_id in registered:
                self.cache.remove_sample(sample_id)
            if isinstance(error, InvalidField):  # bad input the API could not see (a direct feeder)
                return JobError("invalid_request", f"{error.field}: {error.message}", 422)
            logger.exception("preparing job %s failed", job.job_id)
            return JobError("prepare_failed", f"preparing the request failed: {error}", 500)
        self._samples[job.job_id] = samples
        return None

    def steps_done(self, job: Job) -> int:
        """Denoising steps the job's images have taken (0 before ``prepare``)."""
        samples = self._samples.get(job.job_id)
        return samples[0].step if samples else 0

    def done_denoising(self, job: Job) -> bool:
        """Whether every image of the job has taken all its steps."""
        samples = self._samples.get(job.job_id, [])
        return bool(samples) and all(s.done for s in samples)

    def seeds(self, job: Job) -> list[int]:
        """The seeds of the job's images, in order."""
        return [sample.spec.seed for sample in self._samples.get(job.job_id, [])]

    def step(self, jobs: list[Job]) -> dict[str, JobError]:
        """One denoising step for every image of ``jobs`` (one compatibility key): errors by job id.

        One transformer forward serves all of them. If it raises, each job is retried alone so that
        only the job(s) whose own forward fails are reported; a scheduler step that raises fails its job.
        """
        samples = [s for job in jobs for s in self._samples[job.job_id]]
        try:
            outputs = self.family.forward(samples, self.cache)
        except Exception as error:
            if len(jobs) == 1:
                logger.exception("denoising step of job %s failed", jobs[0].job_id)
                return {jobs[0].job_id: JobError("step_failed", f"model step failed: {error}", 500)}
            logger.warning("batched step of %d jobs failed (%s); retrying each job alone", len(jobs), error)
            errors: dict[str, JobError] = {}
            for job in jobs:
                errors.update(self.step([job]))
            return errors
        errors = {}
        offset = 0
        for job in jobs:
            own = self._samples[job.job_id]
            mine = outputs[offset : offset + len(own)]
            offset += len(own)
            try:
                for sample, output in zip(own, mine, strict=True):
                    self.family.step(sample, output)
            except Exception as error:
                logger.exception("scheduler step of job %s failed", job.job_id)
                errors[job.job_id] = JobError("step_failed", f"model step failed: {error}", 500)
        return errors

    def decode(self, job: Job) -> list[Any]:
        """The job's images (PIL), decoded by the VAE; raises on failure (the caller fails the job)."""
        return self.family.decode(self._samples[job.job_id])

    def release(self, job: Job) -> list[SampleStats]:
        """Unregister the job's images from the cache and return their counters (nothing if never prepared)."""
        stats = []
        for sample in self._samples.pop(job.job_id, []):
            with contextlib.suppress(KeyError):
                stats.append(self.cache.remove_sample(sample.sample_id))
        return stats

    def warmup(self, spec: GenerationSpec) -> None:
        """One short generation end to end: proves the model runs before the engine reports ready."""
        self.cache.add_sample("__warmup__", spec.cache, spec.steps, self.family.cache_guidance(spec))
        try:
            sample = self.family.prepare("__warmup__", spec)
            while not sample.done:
                self.family.step(sample, self.family.forward([sample], self.cache)[0])
            self.family.decode([sample])
        finally:
            self.cache.remove_sample("__warmup__")
