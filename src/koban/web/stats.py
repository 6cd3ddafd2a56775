"""What the dashboard, the metrics and `koban stats` show about the jobs table, kept cheap.

Counting every row of a large jobs table on each page load or scrape would load the database
more than the jobs do, so counts turn into the engine's estimates once the table is large.
This module needs no web dependencies.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from koban.app import Koban
from koban.engines.base import JobFilter, Throughput
from koban.job import JobState

#: Above this many rows (estimated), counts per queue and state are estimated, not counted.
LARGE_TABLE = 1_000_000

STATES = [str(s) for s in JobState]


@dataclass(slots=True)
class JobCounts:
    """{queue: {state: n}} with every state present, and whether the numbers are exact."""

    by_queue: dict[str, dict[str, int]] = field(default_factory=dict)
    exact: bool = True

    def total(self, state: str) -> int:
        return sum(counts.get(state, 0) for counts in self.by_queue.values())


async def job_counts(app: Koban, queues: list[str] | None = None) -> JobCounts:
    """Jobs per queue and state: exact on small tables, estimated on large ones.

    `queues` adds names that must appear (with zeros) even when they hold no job; the
    estimates cover those queues and the app's configured ones.
    """
    engine = app.engine
    names = set(queues or ()) | set(app.queues)
    total, exact_total = await engine.estimate_jobs(JobFilter())
    if exact_total or total < LARGE_TABLE:
        found = await engine.count_by_queue_and_state()
        exact = True
    else:
        found = {}
        exact = False
        for queue in sorted(names):
            for state in STATES:
                n, _ = await engine.estimate_jobs(JobFilter(queues=[queue], states=[state]))
                if n:
                    found.setdefault(queue, {})[state] = n
    by_queue = {
        queue: {state: int(found.get(queue, {}).get(state, 0)) for state in STATES}
        for queue in sorted(names | set(found))
    }
    return JobCounts(by_queue, exact)


async def throughput(app: Koban, minutes: int = 60) -> list[Throughput]:
    """Completed jobs and failed attempts per minute over the last `minutes` minutes."""
    return await app.engine.throughput(minutes, now=app.clock.now() if app.clock.frozen else None)


async def estimate_jobs(app: Koban, flt: JobFilter) -> tuple[int, bool]:
    """How many jobs match `flt`, as (count, exact)."""
    return await app.engine.estimate_jobs(flt)
