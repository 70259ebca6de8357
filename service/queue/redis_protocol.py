"""What the API replicas and the workers agree on in Redis: key layout, Lua scripts, client settings.

Layout (prefix ``fastcache:``):

* ``jobs`` - the job stream; workers read it through the consumer group ``fastcache-workers``,
  acknowledge and delete an entry only after its result is stored, and reclaim entries of dead
  workers (``XAUTOCLAIM``). ``jobs:dead`` is the dead-letter stream (trimmed to a MAXLEN).
* ``job:<id>`` - the job record (JSON: status, progress, then images or error), with a TTL.
* ``events:<id>`` - per-step progress then the result, as a stream (SSE replays it from the start);
  once the result is in, the stream lives ``EVENTS_AFTER_RESULT_SECONDS`` more (the record keeps the
  result for the job TTL, and SSE answers a late subscriber from it): a finished job rests in Redis
  once, not twice.
* ``cancel:<id>`` - cancellation flag; ``idem:<key>`` - Idempotency-Key -> [fingerprint, job id].
* ``model`` - what the workers' model accepts (limits), for request validation on the API.
* ``url_secret`` - the HMAC key of the API's signed ``/v1/files`` URLs, made by the first replica
  that needs one (``SET NX``) unless ``--result-url-secret`` gives it.
* ``stats:results_stored`` - results stored (one per job); ``stats:results_refused`` - results of a
  second run of a job (after a reclaim race) that were refused because one was already stored.
* channel ``done`` - completion wake-up hint (the API also polls: pub/sub alone is lossy).

Every multi-key change is one Lua script, so a Redis failure can never leave half of it done, and
a client retrying after an unknown outcome finds either all of it or nothing.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, cast

StreamEntry = tuple[str, dict[str, str]]
"""A stream entry as the service's clients read it (``decode_responses=True``): (entry id, fields)."""


@dataclass(frozen=True)
class RedisLayout:
    """Key names shared by the API backend and the workers."""

    prefix: str = "fastcache:"
    group: str = "fastcache-workers"

    @property
    def stream(self) -> str:
        return f"{self.prefix}jobs"

    @property
    def dead_letter(self) -> str:
        return f"{self.prefix}jobs:dead"

    @property
    def model(self) -> str:
        return f"{self.prefix}model"

    @property
    def url_secret(self) -> str:
        return f"{self.prefix}url_secret"

    @property
    def done_channel(self) -> str:
        return f"{self.prefix}done"

    @property
    def results_stored(self) -> str:
        return f"{self.prefix}stats:results_stored"

    @property
    def results_refused(self) -> str:
        return f"{self.prefix}stats:results_refused"

    @property
    def job_prefix(self) -> str:
        return f"{self.prefix}job:"

    def job(self, job_id: str) -> str:
        return f"{self.job_prefix}{job_id}"

    def attempts(self, job_id: str) -> str:
        return f"{self.job_prefix}{job_id}:attempts"

    def events(self, job_id: str) -> str:
        return f"{self.prefix}events:{job_id}"

    def cancel(self, job_id: str) -> str:
        return f"{self.prefix}cancel:{job_id}"

    def idempotency(self, key: str) -> str:
        return f"{self.prefix}idem:{key}"


LAYOUT = RedisLayout()

EVENTS_MAXLEN = 1000
EVENTS_AFTER_RESULT_SECONDS = 60  # a subscriber that was following the job reads the result event in time
HAND_BACK_IDLE_MS = 365 * 24 * 3600 * 1000  # "idle for a year": any worker's XAUTOCLAIM takes it at once

# KEYS[1] stream, KEYS[2] new job record, KEYS[3] idempotency key ('' for none)
# ARGV[1] fingerprint, ARGV[2] job id, ARGV[3] record JSON, ARGV[4] submission JSON, ARGV[5] TTL seconds,
# ARGV[6] max queued entries, ARGV[7] stream MAXLEN, ARGV[8] job record key prefix
# -> {'created', id, ''} | {'existing', id, record JSON} | {'conflict', id, ''} | {'full', '', ''}
SUBMIT_SCRIPT = """
if KEYS[3] ~= '' then
  local known = redis.call('GET', KEYS[3])
  if known then
    local entry = cjson.decode(known)
    if entry[1] ~= ARGV[1] then return {'conflict', entry[2], ''} end
    local record = redis.call('GET', ARGV[8] .. entry[2])
    if record then return {'existing', entry[2], record} end
    -- the job expired before its key did: the key starts a new job
  end
end
if redis.call('XLEN', KEYS[1]) >= tonumber(ARGV[6]) then return {'full', '', ''} end
redis.call('SET', KEYS[2], ARGV[3], 'EX', tonumber(ARGV[5]))
redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[7], '*', 'job_id', ARGV[2], 'submission', ARGV[4])
if KEYS[3] ~= '' then
  redis.call('SET', KEYS[3], cjson.encode({ARGV[1], ARGV[2]}), 'EX', tonumber(ARGV[5]))
end
return {'created', ARGV[2], ''}
"""

# KEYS[1] job record, KEYS[2] results counter, KEYS[3] events stream, KEYS[4] refused counter
# ARGV[1] final record JSON, ARGV[2] TTL seconds, ARGV[3] result event JSON, ARGV[4] done channel, ARGV[5] job id,
# ARGV[6] events MAXLEN, ARGV[7] seconds the events stream lives on (default: the TTL)
# Stores a finished record, its result event and the wake-up, unless a finished record is already
# there: one result per job id, however often the job ran. Returns 1 when stored, 0 when refused.
STORE_RESULT_SCRIPT = """
local current = redis.call('GET', KEYS[1])
if current then
  local status = cjson.decode(current)['status']
  if status == 'succeeded' or status == 'failed' or status == 'cancelled' then
    redis.call('INCR', KEYS[4])
    return 0
  end
end
redis.call('SET', KEYS[1], ARGV[1], 'EX', tonumber(ARGV[2]))
redis.call('INCR', KEYS[2])
redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[6], '*', 'event', ARGV[3])
redis.call('EXPIRE', KEYS[3], math.min(tonumber(ARGV[7] or ARGV[2]), tonumber(ARGV[2])))
redis.call('PUBLISH', ARGV[4], ARGV[5])
return 1
"""

# KEYS[1] job record; ARGV[1] status, ARGV[2] steps done, ARGV[3] TTL. Progress never overwrites a result.
UPDATE_PROGRESS_SCRIPT = """
local current = redis.call('GET', KEYS[1])
if not current then return 0 end
local record = cjson.decode(current)
if record['status'] == 'succeeded' or record['status'] == 'failed' or record['status'] == 'cancelled' then
  return 0
end
record['status'] = ARGV[1]
record['steps_done'] = tonumber(ARGV[2])
redis.call('SET', KEYS[1], cjson.encode(record), 'EX', tonumber(ARGV[3]))
return 1
"""

# KEYS[1] stream; ARGV[1] group, ARGV[2] this consumer, ARGV[3..] entry ids.
# Refreshes the idle time of the entries this consumer still owns (a heartbeat that is not a
# delivery) and returns the ids it no longer owns: reclaimed by another worker, or acknowledged.
HEARTBEAT_SCRIPT = """
local lost = {}
for i = 3, #ARGV do
  local pending = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[i], ARGV[i], 1)
  if pending[1] and pending[1][2] == ARGV[2] then
    redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[i], 'JUSTID')
  else
    table.insert(lost, ARGV[i])
  end
end
return lost
"""

# KEYS[1] stream; ARGV[1] group, ARGV[2] this consumer, ARGV[3] idle ms to set, ARGV[4] '1' to refund
# the delivery, ARGV[5..] entry ids. Hands entries this consumer owns back to the group: they look
# idle for ages, so the next XAUTOCLAIM of any worker takes them; with a refund, the read that
# brought them here does not count towards the dead-letter bound. Returns how many were handed back.
HAND_BACK_SCRIPT = """
local handed = 0
for i = 5, #ARGV do
  local pending = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[i], ARGV[i], 1)
  if pending[1] and pending[1][2] == ARGV[2] then
    local count = tonumber(pending[1][4])
    if ARGV[4] == '1' and count > 0 then count = count - 1 end
    redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[i], 'IDLE', ARGV[3], 'RETRYCOUNT', count, 'JUSTID')
    handed = handed + 1
  end
end
return handed
"""


def client_options(timeout: float, asynchronous: bool) -> dict[str, Any]:
    """Connection settings of every Redis client of the service: bounded waits, retries with backoff.

    A lost connection is retried by redis-py itself (``Retry`` with exponential backoff and jitter),
    so API and workers reconnect on their own; what still fails after the retries is an outage, which
    the API answers with 503 and the worker rides out.
    """
    from redis.asyncio.retry import Retry as AsyncRetry
    from redis.backoff import ExponentialWithJitterBackoff
    from redis.retry import Retry

    backoff = ExponentialWithJitterBackoff(cap=0.5, base=0.05)
    return {
        "decode_responses": True,
        "socket_timeout": timeout,
        "socket_connect_timeout": min(timeout, 2.0),
        "retry": AsyncRetry(backoff, retries=2) if asynchronous else Retry(backoff, retries=2),
        "health_check_interval": 10,
    }


def read_entries(reply: object) -> list[StreamEntry]:
    """The entries of an XREAD / XREADGROUP reply, over all the streams read, in order.

    redis-py annotates the reply as the union of every protocol's shape; the clients made with
    ``client_options`` get its default (legacy) shape ``[[stream, [(id, fields), ...]], ...]``, or
    ``None`` / ``[]`` when nothing arrived.
    """
    streams = cast("list[tuple[str, list[StreamEntry]]]", reply or [])
    return [entry for _, entries in streams for entry in entries]


def compact_json(value: object) -> str:
    """JSON without the spaces after separators: what every job record and event in Redis is written as."""
    return json.dumps(value, separators=(",", ":"))


def as_text(value: bytes | str) -> str:
    """A reply value as text: a no-op for the clients made with ``client_options`` (they decode replies)."""
    return value.decode() if isinstance(value, bytes) else value
