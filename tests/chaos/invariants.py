"""What must hold after any run, however it was disturbed: checked from the database AND the
ledger, and reported as a list of plain-language violations (empty means all held).

Pure functions over rows and events, so `test_invariants.py` can show each check catches
the fault it names.
"""

from __future__ import annotations

import signal
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .ledger import Event

FINISHED = {"completed", "discarded", "cancelled"}


@dataclass(frozen=True, slots=True)
class JobRow:
    id: int
    state: str
    attempt: int
    max_attempts: int
    errors: list[dict[str, Any]] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class Exit:
    """How a node process ended: the signal the driver sent (None: on its own) and when."""

    pid: int
    node: str
    sent: int | None
    returncode: int
    at_ns: int

    @property
    def killed(self) -> bool:
        return self.sent == signal.SIGKILL


def read_jobs(url: str) -> list[JobRow]:
    """Every job row, for the checks below."""
    import json

    from helpers import sql_rows

    rows = sql_rows(url, "SELECT id, state, attempt, max_attempts, errors FROM koban_jobs")
    out = []
    for job_id, state, attempt, max_attempts, errors in rows:
        if isinstance(errors, str):  # SQLite keeps JSON as text
            errors = json.loads(errors)
        out.append(JobRow(job_id, state, attempt, max_attempts, list(errors or [])))
    return out


def check(
    jobs: Sequence[JobRow],
    events: Iterable[Event],
    exits: Mapping[int, Exit],
    *,
    expected_jobs: int,
) -> list[str]:
    """Every violated invariant, described so that the failing job and process can be found."""
    problems: list[str] = []
    by_id = {j.id: j for j in jobs}
    if len(jobs) != expected_jobs:
        problems.append(f"expected {expected_jobs} jobs in the table, found {len(jobs)}")

    starts: dict[tuple[int, int], list[Event]] = defaultdict(list)
    finishes: dict[tuple[int, int], list[Event]] = defaultdict(list)
    for e in events:
        (starts if e.kind == "S" else finishes)[(e.job_id, e.attempt)].append(e)

    # Every job ended, and within its attempts.
    for job in jobs:
        if job.state not in FINISHED:
            problems.append(f"job {job.id} ended {job.state}, not completed/discarded/cancelled")
        if job.attempt > job.max_attempts:
            problems.append(f"job {job.id} has attempt {job.attempt} > max {job.max_attempts}")

    for (job_id, attempt), ss in starts.items():
        job = by_id.get(job_id)
        if job is None:
            problems.append(f"ledger ran job {job_id}, which is not in the table")
            continue
        # One attempt number is handed to one process only: fetch is exclusive.
        if len(ss) > 1:
            pids = ", ".join(str(s.pid) for s in ss)
            problems.append(f"job {job_id} attempt {attempt} was started {len(ss)} times ({pids})")
        if not 1 <= attempt <= job.attempt:
            problems.append(
                f"job {job_id} ran attempt {attempt}, outside 1..{job.attempt} in the table"
            )
        if attempt > job.max_attempts:
            problems.append(f"job {job_id} ran attempt {attempt} > max {job.max_attempts}")

    for (job_id, attempt), fs in finishes.items():
        started = {s.pid for s in starts.get((job_id, attempt), [])}
        for f in fs:
            if f.pid not in started:
                problems.append(f"job {job_id} attempt {attempt} finished in {f.pid} unstarted")

    problems += _check_outcomes(jobs, starts, finishes, exits)
    problems += _check_overlap(starts, finishes, exits)
    return problems


def _check_outcomes(
    jobs: Sequence[JobRow],
    starts: Mapping[tuple[int, int], list[Event]],
    finishes: Mapping[tuple[int, int], list[Event]],
    exits: Mapping[int, Exit],
) -> list[str]:
    """Each finish the node lived to record is in the table; none completes a job twice."""
    problems: list[str] = []
    by_id = {j.id: j for j in jobs}

    def survived(pid: int) -> bool:
        # A node killed with SIGKILL may lose outcomes it had not recorded yet: that attempt
        # runs again (at-least-once). Any other node must have recorded every outcome.
        end = exits.get(pid)
        return end is None or not end.killed

    for (job_id, attempt), fs in finishes.items():
        job = by_id.get(job_id)
        if job is None:
            continue
        for f in fs:
            if f.outcome == "ok":
                completed_here = job.state == "completed" and job.attempt == attempt
                if not completed_here and survived(f.pid):
                    problems.append(
                        f"job {job_id} attempt {attempt} succeeded in live or cleanly stopped "
                        f"process {f.pid}, but the table says {job.state} at attempt "
                        f"{job.attempt}: an outcome was lost or the job completed twice"
                    )
            elif f.outcome == "fail" and survived(f.pid):
                recorded = [e for e in job.errors if e.get("attempt") == attempt]
                if not recorded:
                    problems.append(
                        f"job {job_id} attempt {attempt} failed in process {f.pid} and its error "
                        "is not recorded"
                    )
                elif not any(f"attempt {attempt}" in str(e.get("message")) for e in recorded):
                    problems.append(
                        f"job {job_id} attempt {attempt}: the recorded error is not this "
                        f"attempt's: {recorded}"
                    )

    for job in jobs:
        if job.state == "completed":
            ok = [f for f in finishes.get((job.id, job.attempt), []) if f.outcome == "ok"]
            if not ok:
                problems.append(
                    f"job {job.id} is completed at attempt {job.attempt}, but no process ran "
                    "that attempt to a successful end"
                )
        for error in job.errors:
            missing = {"attempt", "at", "type", "message"} - set(error)
            if missing:
                problems.append(f"job {job.id} has an error entry without {sorted(missing)}")
    # An attempt that started on a node that then stopped cleanly must have finished there:
    # jobs are far shorter than the grace period.
    for (job_id, attempt), ss in starts.items():
        for s in ss:
            end = exits.get(s.pid)
            if end is not None and end.sent == signal.SIGTERM and end.returncode == 0:
                done = [f for f in finishes.get((job_id, attempt), []) if f.pid == s.pid]
                if not done:
                    problems.append(
                        f"job {job_id} attempt {attempt} started in process {s.pid}, which "
                        "stopped cleanly, but never finished there"
                    )
    return problems


def _check_overlap(
    starts: Mapping[tuple[int, int], list[Event]],
    finishes: Mapping[tuple[int, int], list[Event]],
    exits: Mapping[int, Exit],
) -> list[str]:
    """No two attempts of one job ran at once while both their processes were alive."""
    problems: list[str] = []
    spans: dict[int, list[tuple[int, int, int, int]]] = defaultdict(list)
    for (job_id, attempt), ss in starts.items():
        for s in ss:
            done = [f.at_ns for f in finishes.get((job_id, attempt), []) if f.pid == s.pid]
            end = exits.get(s.pid)
            until = min(done) if done else (end.at_ns if end else 2**63)
            spans[job_id].append((s.at_ns, until, attempt, s.pid))
    for job_id, runs in spans.items():
        runs.sort()
        # The attempt that ends last among those started so far: any later start must wait.
        _s, latest_end, latest_attempt, latest_pid = runs[0]
        for start, end, attempt, pid in runs[1:]:
            if start < latest_end:
                problems.append(
                    f"job {job_id}: attempt {attempt} (process {pid}) started "
                    f"{(latest_end - start) / 1e6:.1f} ms before attempt {latest_attempt} "
                    f"(process {latest_pid}) ended"
                )
            if end > latest_end:
                latest_end, latest_attempt, latest_pid = end, attempt, pid
    return problems


def summarise(jobs: Sequence[JobRow], events: Sequence[Event], exits: Mapping[int, Exit]) -> str:
    """One line for the test log: what happened in this run."""
    states: dict[str, int] = defaultdict(int)
    for job in jobs:
        states[job.state] += 1
    kills = sum(1 for e in exits.values() if e.sent == signal.SIGKILL)
    terms = sum(1 for e in exits.values() if e.sent == signal.SIGTERM)
    reruns = sum(1 for e in events if e.kind == "S") - len(jobs)
    return (
        f"{len(jobs)} jobs {dict(states)}; {sum(1 for e in events if e.kind == 'S')} attempts "
        f"({reruns} beyond one per job); {kills} SIGKILLs, {terms} SIGTERMs"
    )
