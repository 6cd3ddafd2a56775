"""Pruner and reindexer: finished jobs deleted by age in bounded batches; indexes rebuilt."""

from __future__ import annotations

from datetime import timedelta

import pytest

import koban
from helpers import AppFactory, is_postgres, sql_rows
from koban import Job, JobFilter, JobState, Pruner, Reindexer
from koban.engines.base import Ack
from koban.errors import ConfigurationError

from .conftest import idle_node

DAY = 86400.0


async def finish(app: koban.Koban, clock: koban.FrozenClock, state: JobState, n: int) -> list[int]:
    """n jobs that end in `state` at the clock's time; returns their ids."""
    jobs = await app.aenqueue_many([Job(worker="w.x", args={"i": i}) for i in range(n)])
    ids = [j.id or 0 for j in jobs]
    if state is JobState.CANCELLED:
        await app.acancel_jobs(JobFilter(ids=ids))
        return ids
    fetched = await app.engine.fetch("default", n, "n", "p", now=clock.now())
    assert sorted(j.id for j in fetched) == sorted(ids)
    await app.engine.ack([Ack(i, 1, state) for i in ids], now=clock.now())
    return ids


async def remaining(app: koban.Koban) -> set[int]:
    return {j.id or 0 for j in await app.alist_jobs()}


async def test_finished_jobs_older_than_max_age_are_deleted(
    apps: AppFactory, clock: koban.FrozenClock
) -> None:
    app = apps(clock=clock)
    await app.open()
    await finish(app, clock, JobState.COMPLETED, 3)
    await finish(app, clock, JobState.CANCELLED, 2)
    old_discarded = await finish(app, clock, JobState.DISCARDED, 2)
    clock.advance(days=30)
    recent = await finish(app, clock, JobState.COMPLETED, 2)
    [waiting] = await app.aenqueue_many([Job(worker="w.x", schedule_in=DAY)])
    clock.advance(days=31)  # the first batch finished 61 days ago, the second 31

    node = idle_node(app, "leader")
    node.is_leader = True
    pruner = Pruner(max_age=timedelta(days=60), by_state={"discarded": None}, batch=2)
    assert await pruner.tick(node) == 5
    assert await remaining(app) == {*old_discarded, *recent, waiting.id}
    assert await pruner.tick(node) == 0

    # Per-state ages: discarded jobs kept for 90 days, then pruned.
    longer = Pruner(by_state={"discarded": timedelta(days=90)})
    assert await longer.tick(node) == 0
    clock.advance(days=30)  # discarded: 91 days ago; the recent completed ones: 61
    assert await longer.tick(node) == 4
    assert await remaining(app) == {waiting.id}


async def test_each_batch_is_bounded(apps: AppFactory, clock: koban.FrozenClock) -> None:
    app = apps(clock=clock)
    await app.open()
    await finish(app, clock, JobState.COMPLETED, 5)
    clock.advance(days=2)
    ages = {"completed": DAY}
    assert await app.engine.prune_jobs(ages, 2, now=clock.now()) == 2
    assert await app.engine.prune_jobs(ages, 2, now=clock.now()) == 2
    assert await app.engine.prune_jobs(ages, 2, now=clock.now()) == 1
    assert await app.engine.prune_jobs(ages, 2, now=clock.now()) == 0
    node = idle_node(app, "leader")
    node.is_leader = True
    # A tick stops after max_batches and asks to run again right away.
    await finish(app, clock, JobState.COMPLETED, 5)
    clock.advance(days=2)
    pruner = Pruner(max_age=DAY, batch=1, max_batches=3)
    assert await pruner.tick(node) == 3
    assert pruner.next_delay(3) == 0.0
    assert await pruner.tick(node) == 2
    assert pruner.next_delay(2) == pruner.interval


def test_pruner_settings_are_checked() -> None:
    with pytest.raises(ConfigurationError, match=r"'finished' is not a finished state"):
        Pruner(by_state={"finished": 10})
    with pytest.raises(ConfigurationError, match=r"max_age must be"):
        Pruner(max_age=-1)
    assert Pruner(max_age=None).max_age == {}


async def test_reindex(apps: AppFactory, db_url: str, clock: koban.FrozenClock) -> None:
    app = apps(clock=clock)
    await app.open()
    await app.aenqueue_many([Job(worker="w.x", args={"i": i}) for i in range(10)])
    if not is_postgres(db_url):
        assert await app.engine.reindex() == []
        return
    # A concurrent reindex that died leaves an invalid *_ccnew copy; the reindexer drops it.
    sql_rows(db_url, "CREATE INDEX koban_jobs_state_idx_ccnew ON koban_jobs (state)")
    sql_rows(
        db_url,
        "UPDATE pg_index SET indisvalid = false WHERE indexrelid = "
        "'koban_jobs_state_idx_ccnew'::regclass",
    )
    rebuilt = await app.engine.reindex()
    assert {"koban_jobs_fetch_idx", "koban_jobs_unique_idx", "koban_jobs_finished_idx"} <= set(
        rebuilt
    )
    rows = sql_rows(
        db_url,
        "SELECT c.relname, i.indisvalid FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid "
        "WHERE i.indrelid = 'koban_jobs'::regclass",
    )
    assert all(valid for _name, valid in rows)
    assert "koban_jobs_state_idx_ccnew" not in {name for name, _ in rows}
    assert sorted(rebuilt) == sorted(name for name, _ in rows)


async def test_reindexer_runs_on_its_schedule(
    apps: AppFactory, db_url: str, clock: koban.FrozenClock
) -> None:
    app = apps(clock=clock)
    await app.open()
    node = idle_node(app, "leader")
    node.is_leader = True
    reindexer = Reindexer()  # daily at midnight UTC; the clock starts at 03:04
    assert await reindexer.tick(node) == []
    clock.advance(hours=20)
    assert await reindexer.tick(node) == []
    clock.advance(hours=1)  # past midnight
    rebuilt = await reindexer.tick(node)
    assert bool(rebuilt) == is_postgres(db_url)
    assert await reindexer.tick(node) == []  # once per scheduled time
    assert await Reindexer(schedule=None).tick(node) == []
