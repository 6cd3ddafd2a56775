"""Unique jobs: on the worker or per enqueue, state presets, replace=, enqueue_many, and twenty
processes inserting the same job at once."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from datetime import timedelta
from pathlib import Path

import pytest

import koban
from helpers import AppFactory, count_jobs, subprocess_env, wait_until
from koban import Job, JobFilter, JobState, Unique
from koban.engines.base import Ack
from koban.engines.postgres.engine import COPY_MIN_JOBS
from koban.errors import ConfigurationError, JobValidationError
from koban.unique import ALL_STATES, INCOMPLETE_STATES


def app_with_workers(apps: AppFactory, **options: object) -> tuple[koban.Koban, object, object]:
    app = apps(**options)

    @app.worker(unique=Unique(period=None, keys=("athlete_id",)))
    async def sync_athlete(job: Job) -> None:
        return None

    @app.worker
    async def plain(job: Job) -> None:
        return None

    return app, sync_athlete, plain


async def test_unique_on_the_worker_and_per_enqueue(apps: AppFactory) -> None:
    app, sync_athlete, plain = app_with_workers(apps)
    first = await sync_athlete.aenqueue({"athlete_id": 7, "page": 1})  # type: ignore[attr-defined]
    dup = await sync_athlete.aenqueue({"athlete_id": 7, "page": 2})  # type: ignore[attr-defined]
    assert not first.conflict and dup.conflict and dup.id == first.id
    assert dup.args == {"athlete_id": 7, "page": 1}  # the existing job, unchanged
    other = await sync_athlete.aenqueue({"athlete_id": 8})  # type: ignore[attr-defined]
    assert not other.conflict
    forced = await sync_athlete.aenqueue({"athlete_id": 7}, unique=False)  # type: ignore[attr-defined]
    assert not forced.conflict and forced.id not in (first.id, other.id)
    # Per enqueue on a worker without a unique setting.
    a = await plain.aenqueue({"x": 1}, unique=Unique(period=None))  # type: ignore[attr-defined]
    b = await plain.aenqueue({"x": 1}, unique=Unique(period=None))  # type: ignore[attr-defined]
    assert b.conflict and b.id == a.id
    assert len(await app.alist_jobs()) == 4


async def test_state_presets(apps: AppFactory, clock: koban.FrozenClock) -> None:
    app, _, plain = app_with_workers(apps, clock=clock)
    await app.open()

    async def run_to(state: JobState, unique: Unique) -> Job:
        job = await plain.aenqueue({"k": str(state)}, unique=unique)  # type: ignore[attr-defined]
        if state is JobState.CANCELLED:
            await app.acancel_job(job.id or 0)
        else:
            [got] = await app.engine.fetch("default", 1, "n", "p", now=clock.now())
            assert got.id == job.id
            await app.engine.ack([Ack(job.id or 0, 1, state)], now=clock.now())
        return job

    async def blocks(state: JobState, unique: Unique) -> bool:
        await run_to(state, unique)
        again = await plain.aenqueue({"k": str(state)}, unique=unique)  # type: ignore[attr-defined]
        await app.adelete_jobs(JobFilter(states=list(JobState)))
        return again.conflict

    default = Unique(period=None)
    assert await blocks(JobState.COMPLETED, default)
    assert not await blocks(JobState.CANCELLED, default)
    assert not await blocks(JobState.DISCARDED, default)
    incomplete = Unique(period=None, states=INCOMPLETE_STATES)
    assert not await blocks(JobState.COMPLETED, incomplete)
    forever = Unique(period=None, states=ALL_STATES)
    assert await blocks(JobState.CANCELLED, forever)
    # A running job always holds its key, whatever the states say.
    assert JobState.EXECUTING in Unique(states=(JobState.AVAILABLE,)).states


async def test_period_buckets(apps: AppFactory, clock: koban.FrozenClock) -> None:
    _, _, plain = app_with_workers(apps, clock=clock)
    hourly = Unique(period=timedelta(hours=1))
    clock.set(clock.now().replace(minute=0, second=0))
    a = await plain.aenqueue({"n": 1}, unique=hourly)  # type: ignore[attr-defined]
    clock.advance(minutes=59)
    assert (await plain.aenqueue({"n": 1}, unique=hourly)).conflict  # type: ignore[attr-defined]
    clock.advance(minutes=2)
    b = await plain.aenqueue({"n": 1}, unique=hourly)  # type: ignore[attr-defined]
    assert not b.conflict and b.id != a.id


async def test_replace_updates_the_waiting_duplicate(
    apps: AppFactory, clock: koban.FrozenClock
) -> None:
    app, _, plain = app_with_workers(apps, clock=clock)
    await app.open()
    debounce = Unique(period=None, fields=("worker",), states=INCOMPLETE_STATES)
    first = await plain.aenqueue({"v": 1}, unique=debounce, schedule_in=3600)  # type: ignore[attr-defined]
    assert first.state is JobState.SCHEDULED
    later = await plain.aenqueue(  # type: ignore[attr-defined]
        {"v": 2},
        unique=debounce,
        schedule_in=600,
        priority=3,
        tags=["again"],
        replace=("scheduled_at", "args", "priority", "tags"),
    )
    assert later.conflict and later.id == first.id
    assert later.scheduled_at == clock.now() + timedelta(seconds=600)
    assert (later.args, later.priority, later.tags) == ({"v": 2}, 3, ["again"])
    assert later.state is JobState.SCHEDULED
    now = await plain.aenqueue({"v": 3}, unique=debounce, replace=["scheduled_at"])  # type: ignore[attr-defined]
    assert now.conflict and now.state is JobState.AVAILABLE and now.args == {"v": 2}
    stored = await app.aget_job(first.id or 0)
    assert stored is not None and stored.state is JobState.AVAILABLE and stored.priority == 3

    # A job that has started is left as it is.
    await app.engine.fetch("default", 1, "n", "p", now=clock.now())
    running = await plain.aenqueue({"v": 4}, unique=debounce, replace=["args"])  # type: ignore[attr-defined]
    assert running.conflict and running.state is JobState.EXECUTING and running.args == {"v": 2}


async def test_replace_needs_unique_and_known_fields(apps: AppFactory) -> None:
    _, _, plain = app_with_workers(apps)
    with pytest.raises(JobValidationError, match=r"replace= for worker .* needs a unique job"):
        plain.new({}, replace=["args"])  # type: ignore[attr-defined]
    with pytest.raises(JobValidationError, match=r"Unique.replace must be chosen from"):
        plain.new({}, unique=Unique(), replace=["state"])  # type: ignore[attr-defined]
    with pytest.raises(ConfigurationError, match=r"Unique.states must be job states"):
        Unique(states=("done",))  # type: ignore[arg-type]
    app = apps()
    with pytest.raises(ConfigurationError, match=r"unique must be a koban.Unique"):
        app.worker(unique=3600)(lambda job: None)


async def test_enqueue_many_respects_unique(apps: AppFactory) -> None:
    app, sync_athlete, _ = app_with_workers(apps)
    existing = await sync_athlete.aenqueue({"athlete_id": 1})  # type: ignore[attr-defined]
    jobs = await app.aenqueue_many(
        [
            sync_athlete.new({"athlete_id": 1}),  # type: ignore[attr-defined]
            sync_athlete.new({"athlete_id": 2}),  # type: ignore[attr-defined]
            sync_athlete.new({"athlete_id": 2, "again": True}),  # type: ignore[attr-defined]
            sync_athlete.new({"athlete_id": 3}),  # type: ignore[attr-defined]
        ]
    )
    assert [j.conflict for j in jobs] == [True, False, True, False]
    assert jobs[0].id == existing.id and jobs[2].id == jobs[1].id
    assert len(await app.alist_jobs()) == 3
    sync = app.enqueue_many([sync_athlete.new({"athlete_id": 3})])  # type: ignore[attr-defined]
    assert sync[0].conflict and sync[0].id == jobs[3].id


async def test_a_large_batch_with_some_unique_jobs_still_dedupes(apps: AppFactory) -> None:
    """A batch big enough for PostgreSQL's COPY takes the INSERT path once a job is unique."""
    app, sync_athlete, plain = app_with_workers(apps)
    existing = await sync_athlete.aenqueue({"athlete_id": 1})  # type: ignore[attr-defined]
    batch = [plain.new({"i": i}) for i in range(COPY_MIN_JOBS * 2)]  # type: ignore[attr-defined]
    batch[10:10] = [sync_athlete.new({"athlete_id": 1})]  # type: ignore[attr-defined]
    batch[50:50] = [sync_athlete.new({"athlete_id": 2})] * 2  # type: ignore[attr-defined]

    jobs = await app.aenqueue_many(batch)

    assert [i for i, j in enumerate(jobs) if j.conflict] == [10, 51]
    assert jobs[10].id == existing.id and jobs[51].id == jobs[50].id
    inserted = [j.id or 0 for j in jobs if not j.conflict]
    assert inserted == sorted(inserted) and len(set(inserted)) == len(batch) - 2
    assert len(await app.alist_jobs()) == len(batch) - 1


INSERTER = textwrap.dedent(
    """
    import os, sys, time
    import koban
    app = koban.Koban(os.environ["KOBAN_DATABASE_URL"])
    go, ready = sys.argv[1], sys.argv[2]
    open(ready, "w").close()
    while not os.path.exists(go):
        time.sleep(0.005)
    job = app.enqueue(
        koban.Job(worker="shop.jobs.sync_athlete", args={"athlete_id": 42}, queue="sync",
                  unique=koban.Unique(period=None, keys=("athlete_id",)))
    )
    print(job.id, job.conflict, flush=True)
    """
)


def test_twenty_processes_insert_the_same_unique_job_once(db_url: str, tmp_path: Path) -> None:
    go = tmp_path / "go"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", INSERTER, str(go), str(tmp_path / f"ready{i}")],
            env=subprocess_env(db_url),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(20)
    ]
    try:
        # Every process imports koban and waits on the flag, then all insert at once.
        wait_until(
            lambda: len(list(tmp_path.glob("ready*"))) == 20, timeout=60, what="inserters ready"
        )
        go.touch()
        outputs = [p.communicate(timeout=60) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert all(p.returncode == 0 for p in procs), [err for _out, err in outputs if err]
    results = [out.split() for out, _err in outputs]
    ids = {r[0] for r in results}
    assert len(ids) == 1, results
    assert sorted(r[1] for r in results) == ["False"] + ["True"] * 19
    assert count_jobs(db_url) == 1
