"""Output processing: encode finished images off the model thread and deliver each job's result.

The model thread decodes latents (VAE, on the device) and hands the PIL images with their cache
counters to this processor; PNG/JPEG/WebP encoding and base64 run on its own thread, so the next
denoising step does not wait for them. An image that cannot be encoded fails its job alone.
"""

from __future__ import annotations

import base64
import io
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from fastcache_core.stats import SampleStats
from service import telemetry
from service.engine.image_stats import ImageStats
from service.engine.job import Job, JobResult, failed

logger = logging.getLogger(__name__)


def encode_image(image: Any, output_format: str) -> str:
    """Base64 of the image in ``png``, ``jpeg`` or ``webp``."""
    buffer = io.BytesIO()
    fmt = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}[output_format]
    if fmt == "JPEG" and image.mode not in ("RGB", "L"):
        image = image.convert("RGB")
    image.save(buffer, format=fmt)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


class OutputProcessor:
    """Encodes images and finishes jobs on a worker thread, in the order they were handed over."""

    def __init__(self, model_name: str) -> None:
        self.model_name = model_name
        # one thread: results leave in completion order, and encoding never competes with itself
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"outputs-{model_name}")

    def submit(self, job: Job, images: list[Any], seeds: list[int], stats: list[SampleStats]) -> None:
        """Encode ``images`` of a finished ``job`` and deliver its result, off the calling thread."""
        self._pool.submit(self._deliver, job, images, seeds, stats)

    def close(self) -> None:
        """Wait until every handed-over job is delivered."""
        self._pool.shutdown(wait=True)

    def _deliver(self, job: Job, images: list[Any], seeds: list[int], stats: list[SampleStats]) -> None:
        try:
            encoded = [encode_image(image, job.output_format) for image in images]
        except Exception as error:
            logger.exception("encoding the images of job %s failed", job.job_id)
            job.finish(failed("encode_failed", f"encoding the image failed: {error}", 500))
            return
        done = time.time()
        results = []
        for data, seed, sample_stats in zip(encoded, seeds, stats, strict=True):
            results.append(
                {
                    "b64_json": data,
                    "seed": seed,
                    "stats": ImageStats.from_sample(
                        sample_stats,
                        queue_wait_seconds=(job.admitted_at or done) - job.submitted_at,
                        compute_seconds=done - (job.first_step_at or done),
                        batch_sizes=job.batch_sizes,
                    ).model_dump(),
                }
            )
            telemetry.record_image(self.model_name, sample_stats)
        job.finish(JobResult("succeeded", images=results))
