"""The engine's scheduling policy: which waiting jobs join, and which running batch steps next.

How it works (for a newcomer)
-----------------------------
Images can share one transformer forward only when they have the same *compatibility key*
(resolution and model shape, see ``FamilyRunner.compat_key``). The scheduler keeps **one running
batch per key** (a *group*) and at most ``max_batch_size`` images in flight over all groups together.
It makes two decisions at every step boundary, and nothing else in the engine makes them:

1. **Admission.** At the start of each round, waiting jobs join while their images fit in the free
   capacity, whatever their key: a job joins the group of its key, or opens a new group. They join
   in order of fewer steps first, arrival order among equal steps: a 25-step request does not queue
   behind 50-step ones, as shortest-job-first keeps the mean wait low. A job that later jobs with
   fewer steps have passed ``max_batch_size`` times is not passed again. The first job in this order
   that does not fit stops admission (a small request never overtakes a large one of equal steps),
   so a large request is never starved by a stream of small ones. Keys never block admission: a job
   never waits behind a job of another key.
2. **Stepping.** Groups take turns. A *round* gives every running group one denoising step, so every
   image in flight advances exactly one step per round, whichever group it is in: the same progress it
   would make in one big batch. A round runs one forward per group over at most ``max_batch_size``
   images in total.

Why admission waits for the round to end: the images that join together then start their first step
in the same round and stay in phase. Per-sample caches refresh on a schedule counted from each
image's own first step (FastCache's refresh every few steps), so images in phase refresh in the same
forward: one block call for all of them, where images a step apart would each pay their own. Slots
freed mid-round stay empty for the rest of the round (at most one forward per other group).

Fairness bound (holds however the traffic mixes keys)
-----------------------------------------------------
* Once running, a job of ``S`` steps finishes after exactly ``S`` rounds.
* Once first in the admission order, a job is admitted within at most ``R`` rounds, where ``R`` is
  the largest number of steps left to any job in flight at that moment: every round frees the images
  of the jobs that finish, and no job is admitted before it. So it waits at most **one full
  generation of the longest job already running**.
* Jobs with fewer steps may go first, but at most ``max_batch_size`` of them pass any one job; with
  equal steps nobody passes. Without shorter requests in the traffic, admission is first come, first
  served and the bound above holds from the head of the queue.
* A job further back waits, in addition, for the jobs ahead of it in the order (bounded by
  ``max_queue``).

A round costs one forward per running group; with ``G`` groups that is ``G - 1`` forward overheads
more than one batch of the same images would cost: the price of not making any key wait.

The scheduler is plain bookkeeping (no model, no threads, no clock: the engine passes the time): the
engine calls it under its lock and does the model work itself. At every step boundary ``schedule``
returns a ``SchedulerOutput`` (vLLM's idea): which jobs join, which are refused, which leave and which
step now. The engine and the step runner act on that decision; they change no scheduling state
(``Job.key`` is set once, at submission; ``Job.passed`` is the scheduler's alone).
"""

from __future__ import annotations

import contextlib
from collections import deque
from collections.abc import Hashable, Iterable
from dataclasses import dataclass
from typing import Literal, NamedTuple

from service.engine.job import Job, QueueFull

LeaveReason = Literal["cancelled", "deadline_exceeded"]
"""Why the scheduler takes a job out: cancelled by its client, or past its deadline."""


class Admission(NamedTuple):
    """Admission at a step boundary: jobs that join their group now, and jobs that can never fit."""

    joined: list[Job]
    refused: list[Job]


@dataclass(frozen=True)
class SchedulerOutput:
    """One step boundary's decisions, in the order the engine acts on them.

    Attributes:
        joined: jobs admitted now (fewer steps first); the step runner prepares them and they step
            from this round on. A joined job that also leaves (cancelled meanwhile) is not prepared.
        refused: waiting jobs that can never fit (``n`` above the batch size); they fail.
        leaving: running jobs taken out now, with the reason: their slots are free already.
        group: the jobs of the compatibility key whose turn it is: one batched step now (empty when
            nothing runs).
        now: the time the decision was taken at (the joined jobs' admission time).
    """

    joined: list[Job]
    refused: list[Job]
    leaving: list[tuple[Job, LeaveReason]]
    group: list[Job]
    now: float


class Scheduler:
    """Waiting queue, running groups (one per compatibility key) and the rounds in which they step."""

    def __init__(self, max_batch_size: int, max_queue: int) -> None:
        if max_batch_size < 1:
            raise ValueError("max_batch_size must be at least 1")
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self.waiting: deque[Job] = deque()
        self._groups: dict[Hashable, list[Job]] = {}
        self._turns: list[Hashable] = []  # keys in the order they step within a round
        self._round: deque[Hashable] = deque()  # keys still to step in the current round

    # ------------------------------------------------------------------ state

    @property
    def images_running(self) -> int:
        return sum(job.n for jobs in self._groups.values() for job in jobs)

    @property
    def images_waiting(self) -> int:
        return sum(job.n for job in self.waiting)

    @property
    def free_slots(self) -> int:
        """Images that could join now without waiting: capacity minus running and waiting images."""
        return max(0, self.max_batch_size - self.images_running - self.images_waiting)

    def running(self) -> list[Job]:
        """Every running job, group by group in turn order."""
        return [job for key in self._turns for job in self._groups.get(key, ())]

    @property
    def groups(self) -> dict[Hashable, list[Job]]:
        """The running groups by key (a copy)."""
        return {key: list(jobs) for key, jobs in self._groups.items()}

    def find(self, job_id: str) -> Job | None:
        for job in (*self.waiting, *self.running()):
            if job.job_id == job_id:
                return job
        return None

    # ------------------------------------------------------------------ decisions

    def enqueue(self, job: Job) -> None:
        """Add a job (its ``key`` already set) at the back of the waiting queue; ``QueueFull`` at the bound."""
        if len(self.waiting) >= self.max_queue:
            raise QueueFull(f"queue is full ({self.max_queue} waiting)")
        self.waiting.append(job)

    @property
    def mid_round(self) -> bool:
        """Whether some running group has yet to take its step of the current round."""
        return any(self._groups.get(key) for key in self._round)

    def schedule(self, now: float) -> SchedulerOutput:
        """The decisions of one step boundary at time ``now``: admission (``admit``), then running jobs
        that leave (cancelled or past their deadline, joined ones included), then the group whose turn
        it is (``next_group``)."""
        joined, refused = self.admit()
        leaving = self.leaving(now)
        for job, _ in leaving:
            self.remove(job)
        return SchedulerOutput(joined, refused, leaving, self.next_group(), now)

    def leaving(self, now: float) -> list[tuple[Job, LeaveReason]]:
        """Running jobs that must leave at ``now``: cancelled, or past their deadline."""
        return [(job, reason) for job in self.running() if (reason := _leave_reason(job, now)) is not None]

    def drop_waiting(self, now: float) -> list[tuple[Job, LeaveReason]]:
        """Take out the waiting jobs that were cancelled or whose deadline passed; returns them."""
        dropped = [(job, reason) for job in self.waiting if (reason := _leave_reason(job, now)) is not None]
        if dropped:
            self.remove_waiting(job for job, _ in dropped)
        return dropped

    def admit(self) -> Admission:
        """Admission at a step boundary: (jobs that join their group now, jobs that can never fit).

        Only at the start of a round (nothing joins mid-round), in ``admission_order``; the first job
        whose images do not fit stops admission.
        """
        admitted: list[Job] = []
        if self.mid_round:
            return Admission(admitted, [])
        oversized = [job for job in self.waiting if job.n > self.max_batch_size]  # a feeder skipped validation
        if oversized:
            self.remove_waiting(oversized)
        used = self.images_running
        if used >= self.max_batch_size:  # full: nothing to order
            return Admission(admitted, oversized)
        for job in self.admission_order():
            if used + job.n > self.max_batch_size:
                break
            used += job.n
            admitted.append(job)
            if job.key not in self._groups:
                self._groups[job.key] = []
                self._turns.append(job.key)
            self._groups[job.key].append(job)
        if admitted:
            joined = set(map(id, admitted))
            later_joined = 0  # admitted jobs that arrived after the one at hand: each passed it
            for job in reversed(self.waiting):
                if id(job) in joined:
                    later_joined += 1
                else:
                    job.passed += later_joined
            self.remove_waiting(admitted)
        return Admission(admitted, oversized)

    def admission_order(self) -> list[Job]:
        """Waiting jobs in the order they may join: fewer steps first, arrival order among equals, and
        nobody ahead of a job already passed ``max_batch_size`` times that arrived after it."""
        order: list[Job] = []
        segment: list[Job] = []
        for job in self.waiting:  # arrival order
            segment.append(job)
            if job.passed >= self.max_batch_size:  # later jobs may not pass it: close the segment
                order.extend(sorted(segment, key=lambda j: j.spec.steps))  # stable: arrival among equals
                segment = []
        order.extend(sorted(segment, key=lambda j: j.spec.steps))
        return order

    def next_group(self) -> list[Job]:
        """The jobs of the group whose turn it is (empty when nothing runs); a round starts when the
        previous one is over, with every running group in turn order."""
        if not self.mid_round:
            self._round = deque(key for key in self._turns if self._groups.get(key))
        while self._round:
            jobs = self._groups.get(self._round.popleft())
            if jobs:
                return list(jobs)
        return []

    def remove(self, job: Job) -> None:
        """A running job left (finished, failed, cancelled): its images free their slots now."""
        jobs = self._groups.get(job.key)
        if jobs is not None and job in jobs:
            jobs.remove(job)
            if not jobs:
                self._forget(job.key)

    def remove_waiting(self, jobs: Iterable[Job]) -> None:
        drop = set(map(id, jobs))
        self.waiting = deque(job for job in self.waiting if id(job) not in drop)

    def take_waiting(self) -> list[Job]:
        """Empty the waiting queue (shutdown) and return what was in it, in order."""
        jobs = list(self.waiting)
        self.waiting.clear()
        return jobs

    def _forget(self, key: Hashable) -> None:
        self._groups.pop(key, None)
        with contextlib.suppress(ValueError):
            self._turns.remove(key)


def _leave_reason(job: Job, now: float) -> LeaveReason | None:
    if job.cancelled:
        return "cancelled"
    if job.deadline is not None and now > job.deadline:
        return "deadline_exceeded"
    return None
