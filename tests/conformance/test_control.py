"""Client control: get and list jobs, cancel, retry and delete, one at a time and in bulk."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import koban
from helpers import AppFactory, sql_rows, wait_for_state
from koban import Job, JobFilter, JobState


async def seed(app: koban.Koban) -> list[Job]:
    """Six jobs across two queues, two workers and some tags."""
    return await app.aenqueue_many(
        [
            Job(worker="shop.jobs.ship", args={"order": "A-1"}, tags=["eu"]),
            Job(worker="shop.jobs.ship", args={"order": "B-2"}, tags=["us", "vip"]),
            Job(worker="shop.jobs.bill", args={"invoice": 3}, queue="billing", tags=["eu"]),
            Job(worker="shop.jobs.bill", args={"invoice": 4}, queue="billing", schedule_in=600),
            Job(worker="shop.jobs.ship", args={"order": "C-3"}, tags=["eu", "vip"]),
            Job(worker="shop.jobs.mail", args={"to": "a@example.org"}, queue="mailers"),
        ]
    )


def ids(jobs: list[Job]) -> list[int]:
    return [j.id or 0 for j in jobs]


async def test_get_job(app: koban.Koban) -> None:
    [job, *_] = await seed(app)
    got = await app.aget_job(job.id or 0)
    assert got is not None and got.args == {"order": "A-1"}
    assert await app.aget_job(10**9) is None
    assert app.get_job(job.id or 0) == got


async def test_list_jobs_filters(app: koban.Koban) -> None:
    a, b, c, d, e, f = await seed(app)

    assert ids(await app.alist_jobs()) == ids([f, e, d, c, b, a])  # newest first
    assert ids(await app.alist_jobs(states=["scheduled"])) == ids([d])
    assert ids(await app.alist_jobs(states=[JobState.AVAILABLE], queues=["billing"])) == ids([c])
    assert ids(await app.alist_jobs(queues=["billing", "mailers"])) == ids([f, d, c])
    assert ids(await app.alist_jobs(workers=["shop.jobs.ship"])) == ids([e, b, a])
    assert ids(await app.alist_jobs(tags=["eu"])) == ids([e, c, a])
    assert ids(await app.alist_jobs(tags=["eu", "vip"])) == ids([e])
    assert ids(await app.alist_jobs(args_text="B-2")) == ids([b])
    assert ids(await app.alist_jobs(ids=[a.id or 0, f.id or 0])) == ids([f, a])
    assert ids(await app.alist_jobs(limit=2)) == ids([f, e])
    assert ids(app.list_jobs(JobFilter(workers=["shop.jobs.bill"]))) == ids([d, c])
    assert a.inserted_at is not None
    after = a.inserted_at + timedelta(hours=1)
    assert await app.alist_jobs(inserted_after=after) == []
    assert len(await app.alist_jobs(inserted_before=after)) == 6


async def test_list_jobs_keyset_pagination(app: koban.Koban) -> None:
    jobs = await app.aenqueue_many(Job(worker="w.page", args={"i": i}) for i in range(7))
    pages: list[list[int]] = []
    before: int | None = None
    while True:
        page = await app.alist_jobs(limit=3, before_id=before)
        if not page:
            break
        pages.append(ids(page))
        before = page[-1].id

    assert [len(p) for p in pages] == [3, 3, 1]
    assert [i for p in pages for i in p] == list(reversed(ids(jobs)))


async def test_cancel_single_and_bulk(app: koban.Koban) -> None:
    a, b, c, d, _e, f = await seed(app)

    cancelled = await app.acancel_job(a.id or 0)
    assert cancelled is not None and cancelled.state is JobState.CANCELLED
    assert cancelled.cancelled_at is not None
    # A finished job cannot be cancelled again; an unknown id is no error.
    assert await app.acancel_job(a.id or 0) is None
    assert await app.acancel_job(10**9) is None

    bulk = await app.acancel_jobs(JobFilter(queues=["billing"]))
    assert sorted(ids(bulk)) == sorted(ids([c, d]))  # the scheduled one too
    assert {j.state for j in bulk} == {JobState.CANCELLED}

    sync_cancel = app.cancel_job(b.id or 0)
    assert sync_cancel is not None and sync_cancel.state is JobState.CANCELLED
    remaining = await app.alist_jobs(states=["available"])
    assert sorted(ids(remaining)) == sorted(ids([_e, f]))


async def test_retry_single_and_bulk(apps: AppFactory) -> None:
    app = apps()

    @app.worker(max_attempts=1)
    async def fails(job: Job) -> None:
        raise ValueError("no")

    async with app:
        jobs = await app.aenqueue_many(fails.new({"i": i}) for i in range(3))
        for job in jobs:
            await wait_for_state(app, job.id or 0, JobState.DISCARDED)
        await app.stop()

        again = await app.aretry_job(jobs[0].id or 0)
        assert again is not None and again.state is JobState.AVAILABLE
        # An exhausted job gets one more attempt, or it could never be fetched.
        assert again.attempt == 1 and again.max_attempts == 2
        assert again.discarded_at is None
        assert len(again.errors) == 1  # history is kept

        bulk = await app.aretry_jobs(JobFilter(states=["discarded"]))
        assert sorted(ids(bulk)) == sorted(ids(jobs[1:]))
        # Available jobs are not retried again.
        assert await app.aretry_job(jobs[0].id or 0) is None


async def test_retry_runs_the_job_again(apps: AppFactory) -> None:
    app = apps()
    runs: list[int] = []

    @app.worker(max_attempts=1)
    async def once_broken(job: Job) -> None:
        runs.append(job.attempt)
        if job.attempt == 1:
            raise ValueError("first run fails")

    async with app:
        job = await once_broken.aenqueue()
        await wait_for_state(app, job.id or 0, JobState.DISCARDED)
        await app.aretry_job(job.id or 0)
        done = await wait_for_state(app, job.id or 0, JobState.COMPLETED)

    assert runs == [1, 2] and done.attempt == 2


def test_sync_retry_of_a_cancelled_job(app: koban.Koban) -> None:
    job = app.enqueue(Job(worker="w.retry"))
    app.cancel_job(job.id or 0)
    again = app.retry_job(job.id or 0)
    assert again is not None and again.state is JobState.AVAILABLE
    assert again.cancelled_at is None


async def test_delete_single_and_bulk(app: koban.Koban) -> None:
    a, b, c, d, e, f = await seed(app)

    assert await app.adelete_job(a.id or 0) is True
    assert await app.aget_job(a.id or 0) is None
    assert await app.adelete_job(a.id or 0) is False

    deleted = await app.adelete_jobs(JobFilter(queues=["billing"]))
    assert deleted == sorted(ids([c, d]))
    assert app.delete_job(b.id or 0) is True
    assert sorted(ids(await app.alist_jobs())) == sorted(ids([e, f]))


async def test_delete_and_retry_leave_executing_jobs_alone(app: koban.Koban) -> None:
    await app.open()
    job = await app.aenqueue(Job(worker="w.busy"))
    await app.engine.fetch("default", 1, "n", "p")

    assert await app.adelete_job(job.id or 0) is False
    assert await app.aretry_job(job.id or 0) is None
    stored = await app.aget_job(job.id or 0)
    assert stored is not None and stored.state is JobState.EXECUTING


async def test_cancelling_a_running_job_stops_it(app: koban.Koban) -> None:
    started = asyncio.Event()
    stopped = asyncio.Event()

    @app.worker
    async def long_export(job: Job) -> None:
        started.set()
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            stopped.set()
            raise

    async with app:
        job = await long_export.aenqueue()
        await asyncio.wait_for(started.wait(), 15)
        cancelled = await app.acancel_job(job.id or 0)
        assert cancelled is not None and cancelled.state is JobState.CANCELLED
        await asyncio.wait_for(stopped.wait(), 15)
        # The node's own outcome for that attempt must not overwrite the cancel.
        await app.stop()

    final = sql_rows(app.engine.url, "SELECT state FROM koban_jobs WHERE id = %s", [job.id])
    assert final == [("cancelled",)]


# Each job's state in `every_state`, by its position; "executing" jobs are claimed by a fetch.
_STATES = ["available", "scheduled", "executing", "retryable", "completed", "discarded"]


async def every_state(app: koban.Koban, url: str) -> list[Job]:
    """36 jobs over two queues and two workers, six in each state but cancelled and one of
    each state cancelled. PostgreSQL's listing indexes leave executing jobs out, so filters
    must find those another way."""
    await app.open()
    jobs = await app.aenqueue_many(
        Job(worker=f"w.{'ab'[n % 2]}", queue=f"q{n % 3 % 2 + 1}", args={"n": n}) for n in range(36)
    )
    executing = [j.id for n, j in enumerate(jobs) if _STATES[n % 6] == "executing"]
    sql_rows(url, "UPDATE koban_jobs SET queue = 'hold'")
    sql_rows(
        url, f"UPDATE koban_jobs SET queue = 'run' WHERE id IN ({','.join(map(str, executing))})"
    )
    claimed = await app.engine.fetch("run", 100, "node-1", "p")
    assert sorted(j.id for j in claimed) == sorted(executing)
    for n, job in enumerate(jobs):
        state = "cancelled" if n % 7 == 6 and _STATES[n % 6] != "executing" else _STATES[n % 6]
        queue, worker = f"q{n % 3 % 2 + 1}", f"w.{'ab'[n % 2]}"
        sql_rows(
            url,
            "UPDATE koban_jobs SET state = %s, queue = %s WHERE id = %s AND worker = %s",
            (state, queue, job.id, worker),
        )
    return jobs


def stored(url: str) -> list[tuple[int, str, str, str]]:
    """(id, state, queue, worker) of every job, read outside koban, newest first."""
    rows = sql_rows(url, "SELECT id, state, queue, worker FROM koban_jobs ORDER BY id DESC")
    return [(int(r[0]), str(r[1]), str(r[2]), str(r[3])) for r in rows]


FILTERS = [
    JobFilter(),
    JobFilter(queues=["q1"]),
    JobFilter(queues=["q2"], limit=4),
    JobFilter(workers=["w.b"]),
    JobFilter(queues=["q1"], workers=["w.a"]),
    JobFilter(states=["executing"]),
    JobFilter(states=["executing", "completed"], queues=["q2"]),
    JobFilter(states=["available", "scheduled", "retryable"], workers=["w.a"]),
    JobFilter(states=["executing", "available"], limit=3),
    JobFilter(queues=["q1"], limit=2),
]


def expected(rows: list[tuple[int, str, str, str]], flt: JobFilter, allowed: set[str]) -> list[int]:
    """The ids a filter selects among `allowed` states, newest first, from stored rows."""
    out = [
        i
        for i, state, queue, worker in rows
        if state in allowed
        and (not flt.states or state in {str(s) for s in flt.states})
        and (not flt.queues or queue in flt.queues)
        and (not flt.workers or worker in flt.workers)
        and (flt.before_id is None or i < flt.before_id)
    ]
    return out


ALL = {str(s) for s in JobState}


async def test_list_and_count_find_jobs_in_every_state(apps: AppFactory, db_url: str) -> None:
    app = apps()
    await every_state(app, db_url)
    rows = stored(db_url)
    assert {state for _, state, _, _ in rows} == ALL
    for flt in FILTERS:
        want = expected(rows, flt, ALL)
        got = ids(await app.alist_jobs(flt))
        assert got == want[: flt.limit or None], flt
        assert await app.engine.estimate_jobs(flt) == (len(want), True), flt
    # Keyset pages through a queue, across its executing jobs.
    pages: list[int] = []
    before: int | None = None
    while page := await app.alist_jobs(queues=["q1"], limit=4, before_id=before):
        pages += ids(page)
        before = page[-1].id
    assert pages == expected(rows, JobFilter(queues=["q1"]), ALL)


async def test_bulk_actions_reach_jobs_in_every_state_they_allow(
    apps: AppFactory, db_url: str
) -> None:
    unfinished = {"available", "scheduled", "executing", "retryable"}
    for action, allowed in [
        ("cancel", unfinished),
        ("retry", ALL - {"executing", "available"}),
        ("delete", ALL - {"executing"}),
    ]:
        for flt in [JobFilter(queues=["q1"]), JobFilter(workers=["w.a"], limit=3)]:
            app = apps()
            await every_state(app, db_url)
            before = stored(db_url)
            want = sorted(expected(before, flt, allowed))[: flt.limit or None]
            if action == "cancel":
                done = sorted(ids(await app.acancel_jobs(flt)))
            elif action == "retry":
                done = sorted(ids(await app.aretry_jobs(flt)))
            else:
                done = await app.adelete_jobs(flt)
            assert done == want, (action, flt)
            after = {i: state for i, state, _, _ in stored(db_url)}
            for i, state, _, _ in before:
                if i not in want:
                    assert after.get(i) == state, (action, flt, i)
            for i in want:
                new = {"cancel": "cancelled", "retry": "available", "delete": None}[action]
                assert after.get(i) == new, (action, flt, i)
            await app.close()
            sql_rows(db_url, "DELETE FROM koban_jobs")
