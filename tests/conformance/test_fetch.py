"""Fetch and ack at the engine contract: order, limits, exclusivity, attempt-guarded acks."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import koban
from helpers import T0, AppFactory, sql_rows
from koban import Job, JobFilter, JobState
from koban.engines.base import Ack


async def test_fetch_order_is_priority_then_scheduled_at_then_id(
    apps: AppFactory, clock: koban.FrozenClock
) -> None:
    app = apps(clock=clock)
    await app.open()
    at = [T0 - timedelta(minutes=m) for m in range(10)]
    specs = [  # (priority, scheduled_at)
        (3, at[9]),
        (0, at[1]),
        (0, at[5]),
        (1, at[9]),
        (0, at[5]),  # same priority and time as the third: id breaks the tie
        (9, at[9]),
        (0, at[2]),
    ]
    jobs = await app.aenqueue_many(
        Job(worker="w.fetch", priority=p, scheduled_at=s, args={"i": i})
        for i, (p, s) in enumerate(specs)
    )
    expected = [j.id for j in sorted(jobs, key=lambda j: (j.priority, j.scheduled_at, j.id))]

    first = await app.engine.fetch("default", 2, "node-a", "p1", now=T0)
    single = await app.engine.fetch("default", 1, "node-a", "p1", now=T0)
    rest = await app.engine.fetch("default", 10, "node-a", "p1", now=T0)

    # The limit picks the first jobs in order, not any jobs later sorted.
    assert [j.id for j in first] == expected[:2]
    assert [j.id for j in single] == expected[2:3]
    assert [j.id for j in rest] == expected[3:]
    assert await app.engine.fetch("default", 10, "node-a", "p1", now=T0) == []


async def test_fetch_claims_one_attempt(apps: AppFactory, clock: koban.FrozenClock) -> None:
    app = apps(clock=clock)
    await app.open()
    job = await app.aenqueue(Job(worker="w.claim", max_attempts=2))

    [fetched] = await app.engine.fetch("default", 5, "node-a", "default.abc", now=T0)

    assert fetched.id == job.id
    assert fetched.state is JobState.EXECUTING
    assert fetched.attempt == 1
    assert fetched.attempted_by == ["node-a", "default.abc"]
    assert fetched.attempted_at is not None
    assert abs((fetched.attempted_at - T0).total_seconds()) < 1e-3
    stored = await app.aget_job(job.id or 0)
    assert stored is not None and stored.state is JobState.EXECUTING and stored.attempt == 1


async def test_a_fetched_job_carries_its_json_fields_exactly(
    apps: AppFactory, clock: koban.FrozenClock
) -> None:
    """Args, meta and errors reach the worker as stored: text, nesting, numbers, escapes, and
    the errors and meta a failed attempt recorded."""
    app = apps(clock=clock)
    await app.open()
    args = {
        "s": 'héllo ✓ \\ \n\t "q" {} []',
        "nested": {"list": [1, 2.5, -3, True, None, {"k": []}], "empty": {}},
        "big": 12345678901234567890,
        "": "empty key",
    }
    job = await app.aenqueue(Job(worker="w.json", args=args, meta={"m": [1, {}]}, max_attempts=3))
    [first] = await app.engine.fetch("default", 5, "node-a", "p1", now=T0)
    assert (first.args, first.meta, first.errors) == (args, {"m": [1, {}]}, [])
    error = {"attempt": 1, "error": "ValueError: ✗ {}", "at": "2026-01-01T00:00:00+00:00"}
    failed = Ack(first.id or 0, 1, JobState.AVAILABLE, delay=0.0, error=error, meta={"out": {}})
    assert await app.engine.ack([failed], now=T0) == 1

    [second] = await app.engine.fetch("default", 5, "node-a", "p1", now=T0)
    stored = await app.aget_job(job.id or 0)
    assert stored is not None
    assert second.attempt == 2
    assert (second.args, second.meta, second.errors) == (stored.args, stored.meta, stored.errors)
    assert second.args == args
    assert second.errors and second.errors[-1]["error"] == "ValueError: ✗ {}"
    assert second.meta["m"] == [1, {}] and second.meta["out"] == {}


async def test_fetch_takes_only_available_jobs_of_its_queue(app: koban.Koban) -> None:
    await app.open()
    mine = await app.aenqueue(Job(worker="w.q"))
    await app.aenqueue(Job(worker="w.q", queue="other"))
    await app.aenqueue(Job(worker="w.q", schedule_in=3600))

    fetched = await app.engine.fetch("default", 10, "n", "p")

    assert [j.id for j in fetched] == [mine.id]
    assert await app.engine.fetch("default", 10, "n", "p") == []
    assert await app.engine.fetch("default", 0, "n", "p") == []


async def test_fetch_never_claims_past_max_attempts(app: koban.Koban) -> None:
    await app.open()
    spent = await app.aenqueue(Job(worker="w.spent", max_attempts=2))
    fresh = await app.aenqueue(Job(worker="w.spent", max_attempts=2))
    # An available row whose attempts are used up (as left by an interrupted rescue):
    # fetching it would run it a third time.
    sql_rows(app.engine.url, "UPDATE koban_jobs SET attempt = 2 WHERE id = %s", [spent.id])

    fetched = await app.engine.fetch("default", 10, "n", "p")

    assert [j.id for j in fetched] == [fresh.id]
    stored = await app.aget_job(spent.id or 0)
    assert stored is not None and stored.state is JobState.AVAILABLE and stored.attempt == 2


async def test_concurrent_fetchers_never_share_a_job(app: koban.Koban) -> None:
    await app.open()
    jobs = await app.aenqueue_many(Job(worker="w.race", args={"i": i}) for i in range(400))

    async def drain(producer: str) -> list[int]:
        got: list[int] = []
        while True:
            batch = await app.engine.fetch("default", 7, "node", producer)
            if not batch:
                return got
            got += [j.id or 0 for j in batch]

    claimed = await asyncio.gather(*(drain(f"p{i}") for i in range(6)))

    flat = [i for ids in claimed for i in ids]
    assert sorted(flat) == sorted(j.id for j in jobs)  # every job, each exactly once
    assert len(flat) == len(set(flat))
    rows = sql_rows(app.engine.url, "SELECT state, attempt, count(*) FROM koban_jobs GROUP BY 1, 2")
    assert [tuple(r) for r in rows] == [("executing", 1, 400)]


# ----- ack ---------------------------------------------------------------------------------
async def test_ack_applies_only_to_the_same_executing_attempt(app: koban.Koban) -> None:
    await app.open()
    job = await app.aenqueue(Job(worker="w.ack", max_attempts=3))
    [fetched] = await app.engine.fetch("default", 1, "n", "p")
    assert fetched.attempt == 1

    # An ack for another attempt (a stale node after a rescue) changes nothing.
    assert await app.engine.ack([Ack(fetched.id or 0, 2, JobState.COMPLETED)]) == 0
    assert await app.engine.ack([Ack(fetched.id or 0, 0, JobState.RETRYABLE, delay=1.0)]) == 0
    stored = await app.aget_job(job.id or 0)
    assert stored is not None and stored.state is JobState.EXECUTING

    assert await app.engine.ack([Ack(fetched.id or 0, 1, JobState.COMPLETED)]) == 1
    stored = await app.aget_job(job.id or 0)
    assert stored is not None and stored.state is JobState.COMPLETED
    assert stored.completed_at is not None

    # A second ack for a job no longer executing is ignored too.
    error = {"attempt": 1, "at": "x", "type": "E", "message": "late", "traceback": None}
    late = Ack(fetched.id or 0, 1, JobState.RETRYABLE, delay=0.0, error=error)
    assert await app.engine.ack([late]) == 0
    stored = await app.aget_job(job.id or 0)
    assert stored is not None and stored.state is JobState.COMPLETED and stored.errors == []


async def test_ack_does_not_overwrite_a_cancelled_job(app: koban.Koban) -> None:
    await app.open()
    job = await app.aenqueue(Job(worker="w.ack"))
    [fetched] = await app.engine.fetch("default", 1, "n", "p")
    [cancelled] = await app.engine.cancel_jobs(JobFilter(ids=[job.id or 0]))
    assert cancelled.state is JobState.CANCELLED

    assert await app.engine.ack([Ack(fetched.id or 0, fetched.attempt, JobState.COMPLETED)]) == 0

    stored = await app.aget_job(job.id or 0)
    assert stored is not None and stored.state is JobState.CANCELLED and stored.completed_at is None


async def test_ack_batch_records_every_outcome(apps: AppFactory, clock: koban.FrozenClock) -> None:
    app = apps(clock=clock)
    await app.open()
    await app.aenqueue_many(Job(worker="w.batch", args={"i": i}, max_attempts=5) for i in range(5))
    fetched = await app.engine.fetch("default", 5, "n", "p", now=T0)
    a, b, c, d, e = sorted(fetched, key=lambda j: j.id or 0)

    def err(job: Job, kind: str) -> dict[str, object]:
        return {"attempt": job.attempt, "at": T0.isoformat(), "type": kind, "message": kind}

    count = await app.engine.ack(
        [
            Ack(a.id or 0, 1, JobState.COMPLETED),
            Ack(b.id or 0, 1, JobState.RETRYABLE, delay=30.0, error=err(b, "ValueError")),
            Ack(c.id or 0, 1, JobState.SCHEDULED, delay=60.0, snooze=True),
            Ack(d.id or 0, 1, JobState.CANCELLED, error=err(d, "koban.Cancel")),
            Ack(e.id or 0, 1, JobState.DISCARDED, error=err(e, "koban.Discard")),
        ],
        now=T0,
    )

    assert count == 5
    got = {j.id: j for j in await app.alist_jobs()}
    assert got[a.id].state is JobState.COMPLETED and got[a.id].completed_at is not None
    assert got[b.id].state is JobState.RETRYABLE
    assert abs((got[b.id].scheduled_at - (T0 + timedelta(seconds=30))).total_seconds()) < 1e-3  # type: ignore[operator]
    assert [x["type"] for x in got[b.id].errors] == ["ValueError"]
    assert got[c.id].state is JobState.SCHEDULED
    assert got[c.id].attempt == 0 and got[c.id].meta == {"snoozed": 1}
    assert abs((got[c.id].scheduled_at - (T0 + timedelta(seconds=60))).total_seconds()) < 1e-3  # type: ignore[operator]
    assert got[d.id].state is JobState.CANCELLED and got[d.id].cancelled_at is not None
    assert got[e.id].state is JobState.DISCARDED and got[e.id].discarded_at is not None
    assert [x["type"] for x in got[e.id].errors] == ["koban.Discard"]
