"""Every Prometheus metric of the service, defined in one place, plus logging setup.

Names are prefixed ``fastcache_`` and carry base units (``_seconds``, ``_bytes``, ``_total``).
Engine metrics carry a ``model`` label so one dashboard can split by model; the pod comes from the
scrape target.
"""

from __future__ import annotations

import logging
import os
import resource
import sys
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

if TYPE_CHECKING:  # annotations only: telemetry stays a leaf module (no import cycle with the engine)
    from fastcache_core.stats import SampleStats
    from service.engine.job import JobResult

REGISTRY = CollectorRegistry(auto_describe=True)

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300)
FRACTION_BUCKETS = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0)

REQUEST_DURATION = Histogram(
    "fastcache_request_duration_seconds",
    "Time from receiving a generation request to its outcome.",
    ["route", "status", "model"],
    buckets=LATENCY_BUCKETS,
    registry=REGISTRY,
)
QUEUE_WAIT = Histogram(
    "fastcache_queue_wait_seconds",
    "Time a request waited before its images joined the batch.",
    ["route", "status", "model"],
    buckets=LATENCY_BUCKETS,
    registry=REGISTRY,
)
QUEUE_DEPTH = Gauge("fastcache_queue_depth", "Requests waiting to join the batch.", ["model"], registry=REGISTRY)
IN_FLIGHT = Gauge(
    "fastcache_inflight_requests", "Requests whose images are being denoised.", ["model"], registry=REGISTRY
)
RUNNING_GROUPS = Gauge(
    "fastcache_running_groups",
    "Compatibility groups (e.g. resolutions) with images in flight, one batch each.",
    ["model"],
    registry=REGISTRY,
)
BATCH_SIZE = Histogram(
    "fastcache_batch_size",
    "Images per transformer forward (one per denoising step).",
    ["model"],
    buckets=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64),
    registry=REGISTRY,
)
STEP_DURATION = Histogram(
    "fastcache_step_duration_seconds",
    "Wall time of one batched denoising step.",
    ["model"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
    registry=REGISTRY,
)
BLOCK_DECISIONS = Counter(
    "fastcache_block_decisions_total",
    "Transformer block evaluations by outcome.",
    ["model", "result"],
    registry=REGISTRY,
)
TOKENS_COMPUTED_FRACTION = Histogram(
    "fastcache_tokens_computed_fraction",
    "Share of image tokens that ran through the blocks, per image.",
    ["model"],
    buckets=FRACTION_BUCKETS,
    registry=REGISTRY,
)
CACHE_HIT_RATIO = Histogram(
    "fastcache_cache_hit_ratio",
    "Share of block evaluations served by the cache, per image.",
    ["model"],
    buckets=FRACTION_BUCKETS,
    registry=REGISTRY,
)
MAC_FRACTION = Histogram(
    "fastcache_mac_fraction",
    "Estimated transformer MACs spent relative to uncached, per image.",
    ["model"],
    buckets=FRACTION_BUCKETS,
    registry=REGISTRY,
)
IMAGES = Counter("fastcache_images_generated_total", "Images generated.", ["model"], registry=REGISTRY)
DEVICE_MEMORY_ALLOCATED = Gauge(
    "fastcache_device_memory_allocated_bytes",
    "Memory held for the model: CUDA allocated, or process RSS on CPU.",
    ["device"],
    registry=REGISTRY,
)
DEVICE_MEMORY_PEAK = Gauge(
    "fastcache_device_memory_peak_bytes", "Peak of the above since start.", ["device"], registry=REGISTRY
)
REJECTED = Counter(
    "fastcache_rejected_requests_total", "Requests refused before running, by reason.", ["reason"], registry=REGISTRY
)
READY = Gauge("fastcache_ready", "1 when this process can serve (model warmed, queue reachable).", registry=REGISTRY)
# Redis scale-out (API side and worker side)
STREAM_LENGTH = Gauge("fastcache_stream_length", "Entries in the job stream.", registry=REGISTRY)
STREAM_PENDING = Gauge("fastcache_stream_pending_entries", "Delivered but unacknowledged jobs.", registry=REGISTRY)
STREAM_LAG = Gauge(
    "fastcache_stream_lag_entries", "Jobs in the stream not yet delivered to any worker.", registry=REGISTRY
)
RECLAIMED = Counter("fastcache_reclaimed_jobs_total", "Jobs reclaimed from a worker that stopped.", registry=REGISTRY)
DEAD_LETTERED = Counter(
    "fastcache_dead_lettered_jobs_total", "Jobs moved to the dead-letter stream.", registry=REGISTRY
)
HANDED_BACK = Counter(
    "fastcache_handed_back_jobs_total",
    "Stream entries a worker read but did not start, handed back for another worker.",
    registry=REGISTRY,
)
REDIS_ERRORS = Counter(
    "fastcache_redis_errors_total", "Redis operations that failed (connection lost, timeout).", registry=REGISTRY
)
RESULTS_PRUNED = Counter(
    "fastcache_results_pruned_total",
    "Finished job results dropped from the in-process store.",
    ["reason"],
    registry=REGISTRY,
)
RESULT_UPLOADS = Counter(
    "fastcache_result_uploads_total",
    "Attempts to upload a finished job's images to the object store (error: retried with backoff).",
    ["outcome"],
    registry=REGISTRY,
)
RESULT_OBJECTS_PRUNED = Counter(
    "fastcache_result_objects_pruned_total",
    "Image files older than the job TTL deleted from the directory result store.",
    registry=REGISTRY,
)

for _reason in ("queue_full", "not_ready", "unauthorized", "invalid", "body_too_large"):
    REJECTED.labels(reason=_reason)


def record_image(model: str, stats: SampleStats) -> None:
    """Per-image cache counters at completion."""
    BLOCK_DECISIONS.labels(model=model, result="computed").inc(stats.blocks_computed)
    BLOCK_DECISIONS.labels(model=model, result="approximated").inc(stats.blocks_approximated)
    TOKENS_COMPUTED_FRACTION.labels(model=model).observe(stats.tokens_computed_fraction)
    CACHE_HIT_RATIO.labels(model=model).observe(stats.cache_hit_rate)
    MAC_FRACTION.labels(model=model).observe(stats.mac_fraction)
    IMAGES.labels(model=model).inc()


OUTCOME_STATUS = {"succeeded": "200", "cancelled": "499"}  # 499: the client gave up (nginx's convention)


def record_request(route: str, result: JobResult, model: str, submitted_at: float, admitted_at: float | None) -> None:
    """A finished job's duration and queue wait, labelled with its route and HTTP-like outcome status."""
    import time

    error = result.error
    status = OUTCOME_STATUS.get(result.status, str(error.status if error is not None else 500))
    REQUEST_DURATION.labels(route=route, status=status, model=model).observe(max(0.0, time.time() - submitted_at))
    if admitted_at is not None:
        QUEUE_WAIT.labels(route=route, status=status, model=model).observe(max(0.0, admitted_at - submitted_at))


def update_memory(device: str) -> None:
    """Refresh the memory gauges: CUDA allocator figures, or this process's RSS on CPU."""
    if device.startswith("cuda"):
        import torch

        index = torch.device(device).index or 0
        DEVICE_MEMORY_ALLOCATED.labels(device=device).set(torch.cuda.memory_allocated(index))
        DEVICE_MEMORY_PEAK.labels(device=device).set(torch.cuda.max_memory_allocated(index))
        return
    import psutil

    rss = psutil.Process(os.getpid()).memory_info().rss
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    DEVICE_MEMORY_ALLOCATED.labels(device=device).set(rss)
    DEVICE_MEMORY_PEAK.labels(device=device).set(max(rss, peak_kib * 1024))


def render(device: str) -> bytes:
    """The exposition text of every metric, memory refreshed first."""
    update_memory(device)
    return generate_latest(REGISTRY)


def configure_logging(level: str = "info") -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
