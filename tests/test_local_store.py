"""The in-process job store is bounded: finished results expire on a timer and fit a byte cap."""

import asyncio
import time

import pytest

from fastcache_core import CacheParams
from service.engine.families import GenerationSpec
from service.queue import local
from service.queue.base import JobSubmission
from service.queue.local import LocalBackend
from service.settings import Settings
from tests.engine_tools import close_engine, make_engine


@pytest.fixture(scope="module")
def engine():
    from tests.tiny_pipelines import tiny_dit_pipeline

    e = make_engine(tiny_dit_pipeline(num_layers=2), max_batch_size=4)
    yield e
    close_engine(e)


def submission(seed: int) -> JobSubmission:
    spec = GenerationSpec("1", None, 2, 1.5, seed, 16, 16, CacheParams())
    return JobSubmission(spec=spec, n=1, output_format="png", route="jobs", timeout_seconds=60)


async def run_jobs(backend: LocalBackend, count: int) -> list[str]:
    ids = []
    for seed in range(count):
        record = await backend.submit(submission(seed))
        assert (await backend.wait(record.id, 60)).status == "succeeded"
        ids.append(record.id)
    return ids


def test_finished_results_are_pruned_on_a_timer_after_their_ttl(engine, monkeypatch):
    monkeypatch.setattr(local, "PRUNE_INTERVAL_SECONDS", 0.05)

    async def scenario():
        backend = LocalBackend(Settings(job_ttl_seconds=60), engine)
        await backend.start()
        (old, fresh) = await run_jobs(backend, 2)
        backend._jobs[old].record.finished_at = time.time() - 61  # finished past the TTL
        deadline = time.monotonic() + 30
        while await backend.get(old) is not None:  # no request arrives: the timer must prune it
            assert time.monotonic() < deadline, "the expired result was never pruned"
            await asyncio.sleep(0.05)
        assert await backend.get(fresh) is not None
        backend._prune_task.cancel()

    asyncio.run(scenario())


def test_stored_results_fit_the_byte_cap_oldest_dropped_first(engine):
    async def scenario():
        backend = LocalBackend(Settings(max_result_bytes=1024), engine)
        await backend.start()
        ids = await run_jobs(backend, 6)
        sizes = [len(backend._jobs[i].record.images[0]["b64_json"]) if i in backend._jobs else None for i in ids]
        backend._prune_task.cancel()
        return ids, sizes, backend.stored_result_bytes, [await backend.get(i) is not None for i in ids]

    ids, sizes, stored, present = asyncio.run(scenario())
    assert present[-1], "the newest result was dropped"
    assert not present[0], "the oldest result survived past the byte cap"
    assert present == sorted(present), "a newer result was dropped before an older one"
    assert stored <= max(1024, max(s for s in sizes if s))
