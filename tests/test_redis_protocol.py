"""The Lua scripts API and workers share, against a real redis-server: ownership, hand-back, one result."""

import json

import pytest

from service.queue.base import JobRecord
from service.queue.redis_protocol import (
    HAND_BACK_IDLE_MS,
    HAND_BACK_SCRIPT,
    HEARTBEAT_SCRIPT,
    LAYOUT,
    STORE_RESULT_SCRIPT,
)
from tests.servers import RedisServer

STREAM, GROUP = LAYOUT.stream, LAYOUT.group


@pytest.fixture(scope="module")
def server():
    s = RedisServer()
    yield s
    s.stop()


@pytest.fixture
def r(server):
    client = server.client()
    client.flushall()
    client.xgroup_create(STREAM, GROUP, id="0", mkstream=True)
    return client


def read(r, consumer, count=10):
    response = r.xreadgroup(GROUP, consumer, {STREAM: ">"}, count=count)
    return [entry_id for _, entries in response for entry_id, _ in entries]


def pending(r, entry_id):
    (info,) = r.xpending_range(STREAM, GROUP, min=entry_id, max=entry_id, count=1)
    return info


def test_a_heartbeat_refreshes_owned_entries_and_reports_those_another_worker_took(r):
    mine, taken = r.xadd(STREAM, {"job_id": "a"}), r.xadd(STREAM, {"job_id": "b"})
    assert read(r, "worker-1") == [mine, taken]
    r.xclaim(STREAM, GROUP, "worker-2", 0, [taken])  # worker-2 reclaimed it (worker-1 looked dead)
    lost = r.register_script(HEARTBEAT_SCRIPT)(keys=[STREAM], args=[GROUP, "worker-1", mine, taken])
    assert lost == [taken]
    assert pending(r, taken)["consumer"] == "worker-2", "the heartbeat took back an entry it no longer owned"
    assert pending(r, mine)["consumer"] == "worker-1"
    assert pending(r, mine)["times_delivered"] == 1, "a heartbeat counted as a delivery"


def test_a_handed_back_entry_is_claimable_at_once_and_costs_no_delivery(r):
    entry = r.xadd(STREAM, {"job_id": "c"})
    assert read(r, "worker-1") == [entry]
    r.register_script(HAND_BACK_SCRIPT)(keys=[STREAM], args=[GROUP, "worker-1", HAND_BACK_IDLE_MS, "1", entry])
    # another worker's reclaim (min idle 10 minutes) takes it at once
    _, claimed, _ = r.xautoclaim(STREAM, GROUP, "worker-2", 600_000, start_id="0-0", count=10)
    assert [entry_id for entry_id, _ in claimed] == [entry]
    assert pending(r, entry)["times_delivered"] == 1  # read once by worker-1 (refunded), once by worker-2


def test_a_failed_run_handed_back_keeps_its_delivery_count(r):
    entry = r.xadd(STREAM, {"job_id": "d"})
    read(r, "worker-1")
    r.register_script(HAND_BACK_SCRIPT)(keys=[STREAM], args=[GROUP, "worker-1", HAND_BACK_IDLE_MS, "0", entry])
    r.xautoclaim(STREAM, GROUP, "worker-2", 600_000, start_id="0-0", count=10)
    assert pending(r, entry)["times_delivered"] == 2  # counts toward the dead-letter bound


def test_a_hand_back_leaves_entries_of_other_workers_alone(r):
    entry = r.xadd(STREAM, {"job_id": "e"})
    read(r, "worker-2")
    handed = r.register_script(HAND_BACK_SCRIPT)(keys=[STREAM], args=[GROUP, "worker-1", HAND_BACK_IDLE_MS, "1", entry])
    assert handed == 0 and pending(r, entry)["consumer"] == "worker-2"


def test_a_job_that_ran_twice_stores_one_result(r):
    store = r.register_script(STORE_RESULT_SCRIPT)
    results = []
    for run in ("first", "second"):
        record = JobRecord(id="job-1", status="succeeded", images=[{"run": run}])
        event = json.dumps({"type": "result", "job": record.to_dict()})
        results.append(
            store(
                keys=[LAYOUT.job("job-1"), LAYOUT.results_stored, LAYOUT.events("job-1"), LAYOUT.results_refused],
                args=[json.dumps(record.to_dict()), 60, event, LAYOUT.done_channel, "job-1", 1000],
            )
        )
    assert results == [1, 0]
    assert json.loads(r.get(LAYOUT.job("job-1")))["images"] == [{"run": "first"}]
    assert len(r.xrange(LAYOUT.events("job-1"))) == 1
    assert r.get(LAYOUT.results_stored) == "1" and r.get(LAYOUT.results_refused) == "1"
