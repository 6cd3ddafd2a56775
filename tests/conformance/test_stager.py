"""The stager: due scheduled and retryable jobs become available; nothing else moves."""

from __future__ import annotations

from datetime import timedelta

import koban
from helpers import T0, AppFactory, wait_for_state
from koban import Job, JobState
from koban.engines.base import Ack
from koban.plugins.stager import Stager


async def test_stage_moves_only_due_jobs(apps: AppFactory, clock: koban.FrozenClock) -> None:
    app = apps(clock=clock)
    await app.open()
    scheduled = await app.aenqueue(Job(worker="w.stage", schedule_in=60))
    other_queue = await app.aenqueue(Job(worker="w.stage", queue="mailers", schedule_in=90))
    retry = await app.aenqueue(Job(worker="w.stage", max_attempts=3))
    [fetched] = await app.engine.fetch("default", 1, "n", "p", now=T0)
    assert fetched.id == retry.id
    error = {"attempt": 1, "at": T0.isoformat(), "type": "E", "message": "m", "traceback": None}
    ack = Ack(retry.id or 0, 1, JobState.RETRYABLE, delay=30.0, error=error)
    assert await app.engine.ack([ack], now=T0) == 1

    assert await app.engine.stage(100, now=T0 + timedelta(seconds=29)) == []
    assert await app.engine.stage(100, now=T0 + timedelta(seconds=30)) == ["default"]
    assert (await app.aget_job(retry.id or 0)).state is JobState.AVAILABLE  # type: ignore[union-attr]
    assert (await app.aget_job(scheduled.id or 0)).state is JobState.SCHEDULED  # type: ignore[union-attr]

    queues = await app.engine.stage(100, now=T0 + timedelta(seconds=120))
    assert sorted(set(queues)) == ["default", "mailers"]
    for job in (scheduled, other_queue):
        stored = await app.aget_job(job.id or 0)
        assert stored is not None and stored.state is JobState.AVAILABLE
        assert stored.attempt == 0
    # Staging keeps the job's place in line: scheduled_at is when it was due, not now.
    stored = await app.aget_job(scheduled.id or 0)
    assert stored is not None and stored.scheduled_at is not None
    assert abs((stored.scheduled_at - (T0 + timedelta(seconds=60))).total_seconds()) < 1e-3
    assert await app.engine.stage(100, now=T0 + timedelta(days=1)) == []


async def test_stage_respects_its_limit(apps: AppFactory, clock: koban.FrozenClock) -> None:
    app = apps(clock=clock)
    await app.open()
    await app.aenqueue_many(Job(worker="w.stage", schedule_in=10 + i) for i in range(5))
    later = T0 + timedelta(minutes=1)

    assert await app.engine.stage(2, now=later) == ["default"]
    assert len(await app.alist_jobs(states=["available"])) == 2
    await app.engine.stage(10, now=later)
    assert len(await app.alist_jobs(states=["available"])) == 5


async def test_node_runs_scheduled_jobs_once_due(
    apps: AppFactory, clock: koban.FrozenClock, fast_stager: Stager
) -> None:
    app = apps(clock=clock, plugins=[fast_stager])
    ran: list[int] = []

    @app.worker
    async def reminder(job: Job) -> None:
        ran.append(job.id or 0)

    async with app:
        job = await reminder.aenqueue(schedule_in=3600)
        soon = await reminder.aenqueue(schedule_in=5)
        clock.advance(6)
        await wait_for_state(app, soon.id or 0, JobState.COMPLETED)
        waiting = await app.aget_job(job.id or 0)
        assert waiting is not None and waiting.state is JobState.SCHEDULED
        clock.advance(3600)
        await wait_for_state(app, job.id or 0, JobState.COMPLETED)

    assert ran == [soon.id, job.id]
