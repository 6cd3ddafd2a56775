"""What must hold after any run, however it was disturbed: checked from the database AND the
ledger, and reported as a list of plain-language violations (empty means all held).

Pure functions over rows and events, so `test_invariants.py` can show each check catches
the fault it names.
"""

from __future__ import annotations

import signal
from collections import defaultdict
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .ledger import Event

FINISHED = {"completed", "discarded", "cancelled"}
#: The error type the lifeline records for an attempt it took back from a dead node.
RESCUED = "koban.Rescued"


@dataclass(frozen=True, slots=True)
class JobRow:
    id: int
    state: str
    attempt: int
    max_attempts: int
    errors: list[dict[str, Any]] = field(default_factory=list)
    #: When the table says the job completed, in wall-clock ns (None: not completed).
    completed_at_ns: int | None = None


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
    from datetime import datetime

    from helpers import sql_rows

    rows = sql_rows(
        url, "SELECT id, state, attempt, max_attempts, errors, completed_at FROM koban_jobs"
    )
    out = []
    for job_id, state, attempt, max_attempts, errors, completed_at in rows:
        if isinstance(errors, str):  # SQLite keeps JSON as text
            errors = json.loads(errors)
        done: int | None = None
        if isinstance(completed_at, int):  # SQLite: microseconds since the epoch
            done = completed_at * 1000
        elif isinstance(completed_at, str):
            done = int(datetime.fromisoformat(completed_at).timestamp() * 1e9)
        elif completed_at is not None:
            done = int(completed_at.timestamp() * 1e9)
        out.append(JobRow(job_id, state, attempt, max_attempts, list(errors or []), done))
    return out


def check(
    jobs: Sequence[JobRow],
    events: Iterable[Event],
    exits: Mapping[int, Exit],
    *,
    expected_jobs: int,
    isolated: Collection[int] = (),
) -> list[str]:
    """Every violated invariant, described so that the failing job and process can be found.

    `isolated` are processes that were cut off from the database while alive: their rescued
    attempts kept running beside the attempts that replaced them, which at-least-once allows.
    """
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
    rescued = {
        (job.id, e.get("attempt")) for job in jobs for e in job.errors if e.get("type") == RESCUED
    }
    problems += _check_overlap(starts, finishes, exits, rescued, isolated)
    return problems


def _check_outcomes(
    jobs: Sequence[JobRow],
    starts: Mapping[tuple[int, int], list[Event]],
    finishes: Mapping[tuple[int, int], list[Event]],
    exits: Mapping[int, Exit],
) -> list[str]:
    """Every attempt that ran to its end was either recorded or rescued, never both.

    The outcome of an attempt is applied only while the job is still executing that attempt,
    and a rescue only while the node is gone, so exactly one of them wins: a node killed before
    recording (or cut off from the database for longer than the rescue window) has its attempt
    rescued, and its late outcome must then be ignored. Completing a job twice would need both.
    """
    problems: list[str] = []
    by_id = {j.id: j for j in jobs}

    for (job_id, attempt), fs in finishes.items():
        job = by_id.get(job_id)
        if job is None:
            continue
        entries = [e for e in job.errors if e.get("attempt") == attempt]
        rescued = any(e.get("type") == RESCUED for e in entries)
        failures = [e for e in entries if e.get("type") != RESCUED]
        for f in fs:
            if f.outcome == "ok":
                recorded = job.state == "completed" and job.attempt == attempt
            else:
                recorded = bool(failures)
                if failures and not any(
                    f"attempt {attempt}" in str(e["message"]) for e in failures
                ):
                    problems.append(
                        f"job {job_id} attempt {attempt}: the recorded error is not this "
                        f"attempt's: {failures}"
                    )
            if recorded and rescued:
                problems.append(
                    f"job {job_id} attempt {attempt} ({f.outcome} in process {f.pid}) was both "
                    "rescued and recorded: the node recorded a result for a job it no longer "
                    "owned"
                )
            elif not recorded and not rescued:
                problems.append(
                    f"job {job_id} attempt {attempt} ended {f.outcome} in process {f.pid}, but "
                    f"the table neither records that nor a rescue ({job.state} at attempt "
                    f"{job.attempt}): an outcome was lost"
                )

    for job in jobs:
        if job.state == "completed":
            ok = [f for f in finishes.get((job.id, job.attempt), []) if f.outcome == "ok"]
            if not ok:
                problems.append(
                    f"job {job.id} is completed at attempt {job.attempt}, but no process ran "
                    "that attempt to a successful end"
                )
            elif job.completed_at_ns is not None and job.completed_at_ns < ok[0].wall_ns:
                # The outcome is recorded after the code returns: a completion stamped earlier
                # was recorded by someone else (a stale node's late result).
                problems.append(
                    f"job {job.id} was completed {(ok[0].wall_ns - job.completed_at_ns) / 1e6:.1f}"
                    f" ms before attempt {job.attempt} succeeded: someone else's result"
                )
        for error in job.errors:
            missing = {"attempt", "at", "type", "message"} - set(error)
            if missing:
                problems.append(f"job {job.id} has an error entry without {sorted(missing)}")
        # Every attempt that did not end the job well left a record: its error, or the rescue
        # of a node that died running it.
        unsuccessful = range(1, job.attempt + (0 if job.state == "completed" else 1))
        recorded = {e.get("attempt") for e in job.errors}
        silent = [a for a in unsuccessful if a not in recorded]
        if silent:
            problems.append(
                f"job {job.id} ({job.state} at attempt {job.attempt}) has no error or rescue "
                f"recorded for attempt(s) {silent}"
            )
    # An attempt that started on a node that then stopped cleanly must have finished there:
    # jobs are far shorter than the grace period. (A rescued attempt is stopped by its node
    # once it sees the rescue, which is not a loss.)
    rescued = {(j.id, e.get("attempt")) for j in jobs for e in j.errors if e.get("type") == RESCUED}
    for (job_id, attempt), ss in starts.items():
        if (job_id, attempt) in rescued:
            continue
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
    rescued: Collection[tuple[int, Any]],
    isolated: Collection[int],
) -> list[str]:
    """No two attempts of one job ran at once while both their processes were alive (unless
    the first was rescued from a process cut off from the database)."""
    problems: list[str] = []
    spans: dict[int, list[tuple[int, int, int, int]]] = defaultdict(list)
    for (job_id, attempt), ss in starts.items():
        for s in ss:
            if s.pid in isolated and (job_id, attempt) in rescued:
                continue
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
        f"({reruns} beyond one per job); {rescues(jobs)} rescued; "
        f"{kills} SIGKILLs, {terms} SIGTERMs"
    )


def rescues(jobs: Sequence[JobRow]) -> int:
    """Attempts the lifeline took back from a dead node."""
    return sum(1 for job in jobs for e in job.errors if e.get("type") == RESCUED)
