"""Fault injection helpers: probe every route while a fault lasts, then account for every accepted job.

Each fault test keeps a ``FaultLedger``: the answers by HTTP status during the fault (a request that
got no answer counts as ``dropped``), the jobs the service accepted, and after recovery how many of
them finished and how many results were stored more than once. ``LEDGERS`` collects them for the
session; ``tests/conftest.py`` prints them as the reliability table at the end of the run (these are
the figures in the README's Reliability section), and writes them as JSON to
``$FASTCACHE_RELIABILITY_REPORT`` when that is set.
"""

from __future__ import annotations

import json
import threading
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import httpx

from tests.servers import wait_until

ALLOWED_DURING_FAULT = {200, 202, 429, 503}
LEDGERS: list[FaultLedger] = []


@dataclass
class FaultLedger:
    """What one fault-injection test saw."""

    fault: str
    injected: int = 0
    answers: Counter = field(default_factory=Counter)  # status code (str) or "dropped" -> count
    bad_answers: list[str] = field(default_factory=list)
    accepted: set[str] = field(default_factory=set)
    finished: int = 0
    duplicates: int = 0
    openai_accepted: int = 0  # the OpenAI response carries no job id: counted, then found by elimination
    unacknowledged: int = 0  # jobs the service created although the client got no 2xx (e.g. 503 mid-pause)
    final_statuses: Counter = field(default_factory=Counter)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    # ------------------------------------------------------------------ probing

    def request(self, client: httpx.Client, method: str, path: str, **kwargs: Any) -> httpx.Response | None:
        """Send one request during the fault and record its answer; ``None`` if there was none."""
        try:
            response = client.request(method, path, **kwargs)
        except httpx.TransportError as error:
            with self._lock:
                self.answers["dropped"] += 1
                self.bad_answers.append(f"{method} {path}: no answer ({type(error).__name__})")
            return None
        problem = self._check(path, response)
        with self._lock:
            self.answers[str(response.status_code)] += 1
            if problem:
                self.bad_answers.append(f"{method} {path}: {problem}")
        return response

    def _check(self, path: str, response: httpx.Response) -> str | None:
        status = response.status_code
        if status not in ALLOWED_DURING_FAULT:
            return f"{status} {response.text[:300]}"
        if status in (429, 503) and "retry-after" not in response.headers:
            return f"{status} without Retry-After"
        if status == 503 and path.startswith("/v1/images"):
            error = response.json().get("error", {})
            if error.get("type") != "server_error" or not error.get("message"):
                return f"503 without an OpenAI error object: {response.text[:200]}"
        elif (
            status == 503
            and path != "/readyz"
            and not response.headers.get("content-type", "").startswith("application/problem+json")
        ):
            return f"503 that is not problem+json: {response.text[:200]}"
        if status == 503 and path == "/readyz" and not response.json().get("reason"):
            return "/readyz 503 without a reason"
        return None

    def probe_round(self, client: httpx.Client, known_job: str, cancelled_job: str) -> None:
        """Every route once: submit (async, sync, OpenAI), status, events, cancel, readiness."""
        key = uuid.uuid4().hex
        accepted = self.request(
            client,
            "POST",
            "/v1/jobs",
            json={"prompt": "1", "steps": 3, "timeout_seconds": 300},
            headers={"Idempotency-Key": key},
        )
        if accepted is not None and accepted.status_code == 202:
            self.accepted.add(accepted.json()["id"])
        self.request(client, "GET", f"/v1/jobs/{known_job}")
        self.request(client, "DELETE", f"/v1/jobs/{cancelled_job}")
        generated = self.request(client, "POST", "/generate", json={"prompt": "2", "steps": 2, "timeout_seconds": 300})
        if generated is not None and generated.status_code == 200:
            self.accepted.add(generated.json()["id"])
        openai = self.request(
            client,
            "POST",
            "/v1/images/generations",
            json={"prompt": "3", "size": "16x16", "steps": 2, "timeout_seconds": 300},
        )
        if openai is not None and openai.status_code == 200:
            self.openai_accepted += 1
        self.request(client, "GET", "/readyz")
        events = self.request(client, "GET", f"/v1/jobs/{known_job}/events")
        if events is not None and events.status_code == 200:
            assert "event: result" in events.text

    def assert_answers_allowed(self) -> None:
        assert not self.bad_answers, f"{self.fault}: answers outside 2xx/429/503:\n" + "\n".join(self.bad_answers)
        assert sum(self.answers.values()) > 0, "no request was sent during the fault"

    # ------------------------------------------------------------------ accounting after recovery

    def settle(self, client: httpx.Client, redis_client: Any, timeout: float = 240) -> None:
        """Wait until every accepted job is terminal; count finished jobs and duplicate results."""
        ids = sorted(self.accepted)

        def status(job_id: str) -> str:
            response = client.get(f"/v1/jobs/{job_id}")
            assert response.status_code == 200, f"accepted job {job_id} is gone: {response.status_code}"
            return response.json()["status"]

        wait_until(
            lambda: all(status(j) in ("succeeded", "failed", "cancelled") for j in ids),
            timeout,
            lambda: (
                f"{self.fault}: accepted jobs not finished: "
                f"{[(j, status(j)) for j in ids if status(j) not in ('succeeded', 'failed', 'cancelled')]}"
            ),
        )
        self.finished = len(ids)
        self.final_statuses = Counter(status(j) for j in ids)
        self.duplicates = sum(max(0, result_events(redis_client, j) - 1) for j in ids)
        assert all(result_events(redis_client, j) == 1 for j in ids), f"{self.fault}: a job has no or two results"
        # jobs the service created without a client seeing an id: OpenAI-route results, and submits that
        # timed out while Redis was paused and ran once it resumed; they too must finish exactly once
        others = [
            k[len("fastcache:job:") :]
            for k in redis_client.scan_iter("fastcache:job:*")
            if not k.endswith(":attempts") and k[len("fastcache:job:") :] not in self.accepted
        ]

        def others_finished() -> bool:
            records = [json.loads(redis_client.get(f"fastcache:job:{j}") or '{"status": "gone"}') for j in others]
            return all(r["status"] in ("succeeded", "failed", "cancelled") for r in records)

        wait_until(others_finished, timeout, lambda: f"{self.fault}: jobs without a client answer not finished")
        self.unacknowledged = len(others) - self.openai_accepted
        assert self.unacknowledged >= 0
        self.duplicates += sum(max(0, result_events(redis_client, j) - 1) for j in others)
        stored = int(redis_client.get("fastcache:stats:results_stored") or 0)
        jobs = len(ids) + len(others)
        assert stored == jobs, f"{self.fault}: {stored} results stored for {jobs} jobs"
        assert redis_client.xlen("fastcache:jobs") == 0, "entries left in the job stream"
        assert self.duplicates == 0

    def record(self) -> None:
        LEDGERS.append(self)
        print(f"\nreliability {self.fault}: {json.dumps(self.figures())}")

    def figures(self) -> dict[str, Any]:
        return {
            "fault": self.fault,
            "faults_injected": self.injected,
            "jobs_accepted": len(self.accepted) + self.openai_accepted,
            "jobs_finished": self.finished + self.openai_accepted,
            "duplicates": self.duplicates,
            "final_statuses": dict(sorted(self.final_statuses.items())),
            "unacknowledged_jobs_finished": self.unacknowledged,
            "answers_by_status": dict(sorted(self.answers.items())),
        }


def result_events(redis_client: Any, job_id: str) -> int:
    """How many result events the job's event stream holds (1 when its result was stored once)."""
    entries = redis_client.xrange(f"fastcache:events:{job_id}")
    return sum(1 for _, fields in entries if json.loads(fields["event"])["type"] == "result")
