"""Insert: single and bulk, every option, function and class workers, transactional enqueue."""

from __future__ import annotations

import dataclasses
import sqlite3
from datetime import datetime, timedelta
from typing import Any

import psycopg
import pytest

import koban
from helpers import T0, AppFactory, count_jobs, is_postgres, sqlite_path
from koban import Job, JobState
from koban.engines.postgres.engine import COPY_MIN_JOBS

#: A batch PostgreSQL inserts by COPY (and builds the returned jobs from what it sent).
BULK = COPY_MIN_JOBS * 2 + 3


def close_to(a: object, b: object, tolerance: float = 0.001) -> bool:
    assert a is not None and b is not None
    return abs((a - b).total_seconds()) <= tolerance  # type: ignore[operator]


async def test_enqueue_returns_the_stored_job(app: koban.Koban) -> None:
    @app.worker
    async def send_welcome(job: Job) -> None: ...

    job = await send_welcome.aenqueue({"user_id": 7})

    assert job.id is not None
    assert job.state is JobState.AVAILABLE
    assert job.worker == f"{__name__}.test_enqueue_returns_the_stored_job.<locals>.send_welcome"
    assert (job.queue, job.args, job.meta, job.tags) == ("default", {"user_id": 7}, {}, [])
    assert (job.priority, job.attempt, job.max_attempts, job.errors) == (0, 0, 20, [])
    assert job.inserted_at is not None and job.inserted_at.tzinfo is not None
    assert job.scheduled_at is not None and job.scheduled_at <= job.inserted_at + timedelta(
        seconds=1
    )
    stored = await app.aget_job(job.id)
    assert stored is not None
    assert (stored.id, stored.state, stored.args) == (job.id, JobState.AVAILABLE, {"user_id": 7})


def test_sync_enqueue_from_sync_code(app: koban.Koban) -> None:
    @app.worker(queue="mailers", max_attempts=3, priority=2, tags=["mail"])
    def send_digest(job: Job) -> None: ...

    job = send_digest.enqueue({"week": 12})

    stored = app.get_job(job.id or 0)
    assert stored is not None
    assert (stored.queue, stored.max_attempts, stored.priority, stored.tags) == (
        "mailers",
        3,
        2,
        ["mail"],
    )
    assert stored.args == {"week": 12}


async def test_enqueue_options_override_worker_defaults(
    apps: AppFactory, clock: koban.FrozenClock
) -> None:
    app = apps(clock=clock)

    @app.worker(queue="default", priority=5, max_attempts=4)
    async def sync_athlete(job: Job) -> None: ...

    later = await sync_athlete.aenqueue({"athlete_id": 1}, schedule_in=30)
    at = await sync_athlete.aenqueue({"athlete_id": 2}, scheduled_at=T0 + timedelta(hours=2))
    past = await sync_athlete.aenqueue({"athlete_id": 3}, scheduled_at=T0 - timedelta(hours=1))
    options = await sync_athlete.aenqueue(
        {"athlete_id": 4},
        priority=1,
        tags=["strava", "sync"],
        meta={"source": "webhook", "n": [1, 2]},
        queue="mailers",
        max_attempts=9,
    )

    assert later.state is JobState.SCHEDULED
    assert close_to(later.inserted_at, T0)
    assert close_to(later.scheduled_at, T0 + timedelta(seconds=30))
    assert at.state is JobState.SCHEDULED
    assert close_to(at.scheduled_at, T0 + timedelta(hours=2))
    assert past.state is JobState.AVAILABLE
    assert close_to(past.scheduled_at, T0 - timedelta(hours=1))
    stored = await app.aget_job(options.id or 0)
    assert stored is not None
    assert stored.priority == 1
    assert stored.tags == ["strava", "sync"]
    assert stored.meta == {"source": "webhook", "n": [1, 2]}
    assert stored.queue == "mailers"
    assert stored.max_attempts == 9
    assert stored.state is JobState.AVAILABLE


async def test_args_round_trip_json_types(app: koban.Koban) -> None:
    @app.worker
    async def echo(job: Job) -> None: ...

    args = {
        "text": "héllo ✓ \"quoted\" 'single'",
        "int": 2**53,
        "float": 1.5,
        "bool": True,
        "none": None,
        "list": [1, "two", {"three": 3}],
        "nested": {"a": {"b": []}},
    }
    job = await echo.aenqueue(args)
    stored = await app.aget_job(job.id or 0)
    assert stored is not None and stored.args == args


async def test_class_workers_enqueue_as_class_methods(app: koban.Koban) -> None:
    @app.worker
    class SyncAllWorker(koban.Worker):
        queue = "default"
        max_attempts = 3
        priority = 4

        def perform(self, job: Job) -> None: ...

    @app.worker
    class AsyncWorker(koban.Worker):
        async def perform(self, job: Job) -> None: ...

    sync_job = SyncAllWorker.enqueue({"all": True})
    async_job = await AsyncWorker.aenqueue({}, priority=0)

    assert sync_job.worker.endswith("SyncAllWorker")
    assert (sync_job.max_attempts, sync_job.priority, sync_job.args) == (3, 4, {"all": True})
    assert async_job.worker.endswith("AsyncWorker")
    assert async_job.state is JobState.AVAILABLE


async def test_enqueue_many_inserts_thousands_in_input_order(app: koban.Koban) -> None:
    @app.worker
    async def sync_athlete(job: Job) -> None: ...

    @app.worker
    class Other(koban.Worker):
        async def perform(self, job: Job) -> None: ...

    n = 3000
    new = [
        sync_athlete.new({"athlete_id": i}) if i % 3 else Other.new({"athlete_id": i}, priority=2)
        for i in range(n)
    ]
    assert all(j.id is None for j in new)

    jobs = await app.aenqueue_many(new)

    assert [j.args["athlete_id"] for j in jobs] == list(range(n))
    ids = [j.id for j in jobs]
    assert all(isinstance(i, int) for i in ids)
    assert len(set(ids)) == n
    assert ids == sorted(ids)  # input order is id order
    assert [j.priority for j in jobs[:3]] == [2, 0, 0]
    assert jobs[0].worker == Other.name and jobs[1].worker == sync_athlete.name
    assert count_jobs(app.engine.url) == n


def varied_jobs(worker: Any, n: int, *, schedules: bool = True) -> list[Job]:
    """`n` new jobs cycling through every option and the values an insert must keep intact
    (without `schedule_in` and `scheduled_at` if not `schedules`)."""
    shapes: list[dict[str, Any]] = [
        {"args": {"i": 0}},
        {"args": {"b": 1, "a": [1, 2.5, None, True]}, "schedule_in": 60},
        {
            # jsonb keeps numbers as decimals: 1e16 comes back as an int, and so must the
            # returned job's; a tuple comes back as a list.
            "args": {"f": 1e16, "big": 1.5e300, "tiny": 1e-7, "z": -0.0, "n": 2**70, "t": (1, "x")},
            "schedule_in": -5,
        },
        {
            "args": {"s": 'héllo ✓ \\ \n\t "q" \\u0000 \\N', "": "empty key"},
            "scheduled_at": T0 + timedelta(days=400, microseconds=7),
        },
        {"args": {}, "scheduled_at": T0 - timedelta(hours=1), "priority": 9, "max_attempts": 1},
        {
            "args": {"nested": {"deep": [{"x": {}}]}},
            "queue": "mailers",
            "tags": ["a", "b c", 'q"uote', "back\\slash", "tab\there", "NULL", "", "{}", "é,"],
            "meta": {"k": [1, 2.5], "n": {"x": None}, "line\nbreak": "\\"},
        },
        {"args": {"i": 6}, "queue": "odd\tqueue\\name\n", "schedule_in": 0.0000005, "priority": 3},
        {"args": {"i": 7}, "schedule_in": 1.0000015, "max_attempts": 2**31 - 1},
    ]
    if not schedules:
        shapes = [
            {k: v for k, v in shape.items() if k not in ("schedule_in", "scheduled_at")}
            for shape in shapes
        ]
    return [worker.new(**shapes[i % len(shapes)]) for i in range(n)]


def exactly(value: Any) -> Any:
    """`value` with the types of everything in it, so 1 != 1.0, (1,) != [1], and times keep
    their UTC offset; key order is not compared (jsonb sorts keys)."""
    if isinstance(value, Job):
        return {
            f.name: exactly(getattr(value, f.name)) for f in dataclasses.fields(Job) if f.compare
        }
    if isinstance(value, dict):
        return ("dict", sorted((k, exactly(v)) for k, v in value.items()))
    if isinstance(value, list | tuple):
        return (type(value).__name__, [exactly(v) for v in value])
    if isinstance(value, datetime):
        return ("datetime", value, value.utcoffset())
    return (type(value).__name__, value)


@pytest.mark.parametrize("size", [1, COPY_MIN_JOBS - 1, BULK])
@pytest.mark.parametrize("frozen", [True, False], ids=["frozen-clock", "database-clock"])
async def test_enqueue_many_returns_every_field_as_stored(
    apps: AppFactory, clock: koban.FrozenClock, size: int, frozen: bool
) -> None:
    app = apps(clock=clock) if frozen else apps()

    @app.worker
    async def sync_athlete(job: Job) -> None: ...

    jobs = await app.aenqueue_many(varied_jobs(sync_athlete, size))

    assert len(jobs) == size
    assert {j.state for j in jobs} == (
        {JobState.AVAILABLE} if size == 1 else {JobState.AVAILABLE, JobState.SCHEDULED}
    )
    for job in jobs:
        stored = await app.aget_job(job.id or 0)
        assert stored is not None
        assert exactly(job) == exactly(stored)


async def test_a_batch_due_now_returns_every_field_as_stored(app: koban.Koban) -> None:
    """On PostgreSQL, jobs due at once on the database's clock take the times' defaults."""

    @app.worker
    async def sync_athlete(job: Job) -> None: ...

    jobs = await app.aenqueue_many(varied_jobs(sync_athlete, BULK, schedules=False))

    assert {j.state for j in jobs} == {JobState.AVAILABLE}
    assert len({j.inserted_at for j in jobs} | {j.scheduled_at for j in jobs}) == 1
    for job in jobs:
        stored = await app.aget_job(job.id or 0)
        assert stored is not None
        assert exactly(job) == exactly(stored)


def test_sync_enqueue_many_returns_every_field_as_stored(
    apps: AppFactory, clock: koban.FrozenClock
) -> None:
    app = apps(clock=clock)

    @app.worker
    def sync_athlete(job: Job) -> None: ...

    jobs = app.enqueue_many(varied_jobs(sync_athlete, BULK))

    for job in jobs:
        stored = app.get_job(job.id or 0)
        assert stored is not None
        assert exactly(job) == exactly(stored)


async def test_a_batch_stores_what_single_enqueues_store(
    apps: AppFactory, clock: koban.FrozenClock
) -> None:
    """On PostgreSQL a batch goes by COPY and a single job by INSERT: the rows must agree."""
    app = apps(clock=clock)

    @app.worker
    async def sync_athlete(job: Job) -> None: ...

    batch = await app.aenqueue_many(varied_jobs(sync_athlete, BULK))
    singles = [await app.aenqueue(job) for job in varied_jobs(sync_athlete, BULK)]

    for one, other in zip(batch, singles, strict=True):
        stored = [await app.aget_job(job.id or 0) for job in (one, other)]
        assert stored[0] is not None and stored[1] is not None
        assert exactly(dataclasses.replace(stored[0], id=None)) == exactly(
            dataclasses.replace(stored[1], id=None)
        )


def test_sync_enqueue_many_and_empty_batch(app: koban.Koban) -> None:
    @app.worker
    def task(job: Job) -> None: ...

    assert app.enqueue_many([]) == []
    jobs = app.enqueue_many(task.new({"i": i}, schedule_in=60 if i % 2 else None) for i in range(5))
    assert [j.args["i"] for j in jobs] == [0, 1, 2, 3, 4]
    assert [j.state for j in jobs] == [
        JobState.AVAILABLE,
        JobState.SCHEDULED,
        JobState.AVAILABLE,
        JobState.SCHEDULED,
        JobState.AVAILABLE,
    ]


async def test_new_builds_an_unsaved_job_with_enqueue_options(app: koban.Koban) -> None:
    @app.worker(queue="mailers", max_attempts=5, tags=["a"])
    async def mail(job: Job) -> None: ...

    job = mail.new({"to": "x@example.org"}, priority=3, meta={"k": 1}, schedule_in=10)

    assert job.id is None
    assert (job.worker, job.queue, job.max_attempts, job.priority) == (mail.name, "mailers", 5, 3)
    assert (job.tags, job.meta, job.schedule_in) == (["a"], {"k": 1}, 10)
    assert count_jobs(app.engine.url) == 0
    stored = await app.aenqueue(job)
    assert stored.id is not None and stored.state is JobState.SCHEDULED


async def test_enqueue_by_worker_name_with_a_plain_job(app: koban.Koban) -> None:
    job = await app.aenqueue(Job(worker="billing.jobs.charge", args={"invoice": 3}))
    assert job.id is not None and job.worker == "billing.jobs.charge"


# ----- transactional enqueue with the caller's connection -------------------------------------
def test_enqueue_in_callers_transaction_commit_and_rollback(app: koban.Koban) -> None:
    @app.worker
    def charge(job: Job) -> None: ...

    url = app.engine.url
    if is_postgres(url):
        with psycopg.connect(url) as conn:
            kept = charge.enqueue({"n": 1}, conn=conn)
            app.enqueue_many([charge.new({"n": 2})], conn=conn)
            # Inside the transaction the caller sees the jobs; nobody else does yet.
            assert conn.execute("SELECT count(*) FROM koban_jobs").fetchone() == (2,)
            assert count_jobs(url) == 0
            conn.commit()
            assert count_jobs(url) == 2
            charge.enqueue({"n": 3}, conn=conn)
            conn.rollback()
    else:
        conn = sqlite3.connect(sqlite_path(url), timeout=30)
        try:
            kept = charge.enqueue({"n": 1}, conn=conn)
            app.enqueue_many([charge.new({"n": 2})], conn=conn)
            assert conn.execute("SELECT count(*) FROM koban_jobs").fetchone() == (2,)
            assert count_jobs(url) == 0
            conn.commit()
            assert count_jobs(url) == 2
            charge.enqueue({"n": 3}, conn=conn)
            conn.rollback()
        finally:
            conn.close()

    assert count_jobs(url) == 2
    stored = app.get_job(kept.id or 0)
    assert stored is not None and stored.args == {"n": 1}
    assert sorted(j.args["n"] for j in app.list_jobs()) == [1, 2]


async def test_async_enqueue_in_callers_transaction(app: koban.Koban) -> None:
    """From async code: a psycopg AsyncConnection, or on SQLite a sqlite3.Connection."""

    @app.worker
    async def charge(job: Job) -> None: ...

    url = app.engine.url
    if is_postgres(url):
        async with await psycopg.AsyncConnection.connect(url) as aconn:
            await charge.aenqueue({"n": 1}, conn=aconn)
            await app.aenqueue_many([charge.new({"n": 2})], conn=aconn)
            assert count_jobs(url) == 0
            await aconn.commit()
            assert count_jobs(url) == 2
            await charge.aenqueue({"n": 3}, conn=aconn)
            await aconn.rollback()
    else:
        conn = sqlite3.connect(sqlite_path(url), timeout=30, check_same_thread=False)
        try:
            await charge.aenqueue({"n": 1}, conn=conn)
            await app.aenqueue_many([charge.new({"n": 2})], conn=conn)
            assert count_jobs(url) == 0
            conn.commit()
            assert count_jobs(url) == 2
            await charge.aenqueue({"n": 3}, conn=conn)
            conn.rollback()
        finally:
            conn.close()
    assert sorted(j.args["n"] for j in await app.alist_jobs()) == [1, 2]
