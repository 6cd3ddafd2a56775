"""The cron scheduler against a real database: each tick inserted exactly once, catch-up after a
full stop by each policy, @reboot once per cluster start, errors naming the entry."""

from __future__ import annotations

import asyncio
from collections import Counter
from datetime import UTC, datetime, timedelta

import pytest

import koban
from helpers import T0, AppFactory
from koban import ConfigurationError, Cron, Heartbeat, Job, Scheduler, UnknownWorkerError
from koban.plugins.scheduler import cron_job
from koban.runtime.node import Node

from .conftest import idle_node


def with_worker(app: koban.Koban) -> koban.Koban:
    @app.worker(queue="cron", max_attempts=3)
    async def sync_all(job: Job) -> None:
        return None

    return app


def scheduler_node(app: koban.Koban, name: str) -> tuple[Node, Scheduler]:
    scheduler = Scheduler()
    scheduler.use(app._resolve_cron())
    node = idle_node(app, name, [scheduler])
    node.is_leader = True
    return node, scheduler


async def cron_ticks(app: koban.Koban) -> list[str]:
    jobs = await app.alist_jobs(workers=[app.cron[0].worker_name] if app.cron else None)
    return sorted(j.meta["cron_tick"] for j in jobs if "cron_tick" in j.meta)


def hours(*hs: int, day: datetime = T0) -> list[str]:
    base = day.replace(minute=0, second=0)
    return [(base.replace(hour=h)).isoformat() for h in hs]


WORKER = "cluster.test_scheduler.with_worker.<locals>.sync_all"


async def test_two_schedulers_never_insert_a_tick_twice(
    apps: AppFactory, clock: koban.FrozenClock
) -> None:
    """Two leaders at once (an old one that has not noticed yet): still one job per tick."""
    entries = [Cron("* * * * *", WORKER, catch_up="all", name="minutely")]
    a = with_worker(apps(clock=clock, cron=entries))
    b = with_worker(apps(clock=clock, cron=entries))
    await a.open()
    await b.open()
    (na, sa), (nb, sb) = scheduler_node(a, "a"), scheduler_node(b, "b")
    await asyncio.gather(sa.tick(na), sb.tick(nb))  # first seen at T0: counting starts
    for _ in range(20):
        clock.advance(60)
        await asyncio.gather(sa.tick(na), sb.tick(nb))
    ticks = await cron_ticks(a)
    assert len(ticks) == 20
    assert max(Counter(ticks).values()) == 1
    minute = T0.replace(second=0)
    assert ticks == [(minute + timedelta(minutes=m)).isoformat() for m in range(1, 21)]
    [record] = await a.engine.list_cron()
    assert record.last_tick == minute + timedelta(minutes=20)


async def test_the_database_refuses_a_second_insert_of_a_tick(
    apps: AppFactory, clock: koban.FrozenClock
) -> None:
    entry = Cron("0 * * * *", WORKER, name="hourly")
    app = with_worker(apps(clock=clock, cron=[entry]))
    await app.open()
    [(_, worker)] = app._resolve_cron()
    tick = T0.replace(minute=0, second=0)
    again = []
    for _ in range(2):
        jobs = await app.engine.insert_cron_jobs(
            entry.name, entry.signature, lambda rec: ([cron_job(entry, worker, tick)], None)
        )
        again.append(jobs[0])
    assert not again[0].conflict and again[1].conflict and again[0].id == again[1].id
    assert len(await app.alist_jobs()) == 1


@pytest.mark.parametrize(
    ("policy", "caught_up"),
    [("latest", [9]), ("all", [5, 6, 7, 8, 9]), ("none", [])],
)
async def test_catch_up_after_the_whole_cluster_was_down(
    apps: AppFactory, clock: koban.FrozenClock, policy: str, caught_up: list[int]
) -> None:
    entry = Cron("0 * * * *", WORKER, catch_up=policy, name="hourly")  # type: ignore[arg-type]
    app = with_worker(apps(clock=clock, cron=[entry]))
    await app.open()
    node, scheduler = scheduler_node(app, "first")
    await scheduler.tick(node)  # 03:04: the entry is first seen; nothing is due
    assert await cron_ticks(app) == []
    clock.set(T0.replace(hour=4, minute=0, second=10))
    await scheduler.tick(node)
    assert await cron_ticks(app) == hours(4)

    # Every node stops at 04:30 and the cluster comes back at 09:02 with fresh processes.
    clock.set(T0.replace(hour=9, minute=2, second=0))
    node, scheduler = scheduler_node(app, "second")
    await scheduler.tick(node)
    assert await cron_ticks(app) == hours(4, *caught_up)
    await scheduler.tick(node)  # nothing twice
    assert await cron_ticks(app) == hours(4, *caught_up)
    [record] = await app.engine.list_cron()
    assert record.last_tick == T0.replace(hour=9, minute=0, second=0)

    clock.set(T0.replace(hour=10, minute=0, second=5))
    await scheduler.tick(node)
    assert await cron_ticks(app) == hours(4, *caught_up, 10)
    jobs = await app.alist_jobs()
    assert all(j.queue == "cron" and j.meta["cron"] == "hourly" for j in jobs)


async def test_reboot_runs_once_per_cluster_start(
    apps: AppFactory, clock: koban.FrozenClock
) -> None:
    entry = Cron("@reboot", WORKER, name="on boot")
    app = with_worker(apps(clock=clock, cron=[entry]))
    await app.open()

    async def join(name: str) -> tuple[Node, Scheduler, Heartbeat]:
        node, scheduler = scheduler_node(app, name)
        beat = Heartbeat()
        node.plugins.append(beat)
        await beat.start(node)
        return node, scheduler, beat

    n1, s1, b1 = await join("one")
    assert n1.cluster_started_at == T0
    await s1.tick(n1)
    await s1.tick(n1)
    assert len(await app.alist_jobs()) == 1

    clock.advance(10)
    n2, s2, b2 = await join("two")  # joins the running cluster
    assert n2.cluster_started_at == T0
    await s2.tick(n2)
    await b1.stop(n1)  # "one" leaves; "two" goes on: still the same cluster
    await s2.tick(n2)
    assert len(await app.alist_jobs()) == 1

    await b2.stop(n2)  # every node has stopped
    clock.advance(3600)
    n3, s3, _ = await join("three")
    assert n3.cluster_started_at == clock.now()
    await s3.tick(n3)
    jobs = await app.alist_jobs()
    assert sorted(j.meta["cron_tick"] for j in jobs) == [T0.isoformat(), clock.now().isoformat()]


async def test_a_changed_schedule_starts_afresh(apps: AppFactory, clock: koban.FrozenClock) -> None:
    old = with_worker(apps(clock=clock, cron=[Cron("0 * * * *", WORKER, name="sync")]))
    await old.open()
    node, scheduler = scheduler_node(old, "n")
    await scheduler.tick(node)
    clock.set(T0.replace(hour=4, minute=0, second=1))
    await scheduler.tick(node)
    new = with_worker(apps(clock=clock, cron=[Cron("30 * * * *", WORKER, name="sync")]))
    await new.open()
    node, scheduler = scheduler_node(new, "n2")
    clock.set(T0.replace(hour=4, minute=10))
    await scheduler.tick(node)
    [record] = await new.engine.list_cron()
    assert record.signature == "30 * * * * UTC" and record.last_tick is None
    clock.set(T0.replace(hour=4, minute=30, second=2))
    await scheduler.tick(node)
    assert await cron_ticks(new) == [*hours(4), T0.replace(hour=4, minute=30, second=0).isoformat()]


async def test_daylight_saving_days_in_the_database(
    apps: AppFactory, clock: koban.FrozenClock
) -> None:
    """02:30 in Warsaw: once on the spring-forward day and once, not twice, on fall-back."""
    inserted = []
    for start in (datetime(2024, 3, 30, 22, tzinfo=UTC), datetime(2024, 10, 26, 22, tzinfo=UTC)):
        clock.set(start)  # local midnight; the entry is first seen then
        entry = Cron("30 2 * * *", WORKER, timezone="Europe/Warsaw", name=f"dst {start.month}")
        app = with_worker(apps(clock=clock, cron=[entry]))
        await app.open()
        node, scheduler = scheduler_node(app, "n")
        while clock.now() < start + timedelta(hours=24):
            await scheduler.tick(node)
            clock.advance(600)
        inserted = await cron_ticks(app)
    assert inserted == ["2024-03-31T01:00:00+00:00", "2024-10-27T00:30:00+00:00"]


async def test_entry_options_and_worker_given_as_object(
    apps: AppFactory, clock: koban.FrozenClock
) -> None:
    app = apps(clock=clock)

    @app.worker(queue="slow", priority=5, tags=["nightly"])
    async def refresh(job: Job) -> None:
        return None

    app.cron = [
        Cron(
            "0 4 * * *",
            refresh,
            args={"full": True},
            queue="fast",
            priority=1,
            max_attempts=2,
            tags=["cron"],
            meta={"team": "ops"},
        )
    ]
    await app.open()
    node, scheduler = scheduler_node(app, "n")
    clock.set(T0.replace(hour=4, minute=0, second=1))
    await scheduler.tick(node)  # first seen now: 04:00 has passed already
    clock.advance(days=1)
    [job] = await scheduler.tick(node)
    assert (job.queue, job.priority, job.max_attempts, job.tags) == ("fast", 1, 2, ["cron"])
    assert job.args == {"full": True}
    assert job.meta["team"] == "ops" and job.meta["cron"] == app.cron[0].name
    [info] = await app.acron_entries()
    assert info.last_tick == T0.replace(day=3, hour=4, minute=0, second=0)
    assert info.next_run_utc == T0.replace(day=4, hour=4, minute=0, second=0)


async def test_entries_are_checked_before_the_node_starts(apps: AppFactory) -> None:
    with pytest.raises(ConfigurationError, match=r"two cron entries are named 'x'"):
        apps(cron=[Cron("@daily", "a.b", name="x"), Cron("@hourly", "a.c", name="x")])
    with pytest.raises(ConfigurationError, match=r"cron= takes koban.Cron entries"):
        apps(cron=["0 0 * * *"])
    app = apps(cron=[Cron("@daily", "shop.jobs.missing", name="nightly")])
    with pytest.raises(UnknownWorkerError, match=r"cron entry 'nightly': unknown worker"):
        await app.start()
    assert app.node is None
    bad = with_worker(apps(cron=[Cron("@daily", WORKER, args={"when": object()}, name="bad")]))
    with pytest.raises(ConfigurationError, match=r"cron entry 'bad'.*not JSON"):
        await bad.start()
    bad_priority = with_worker(apps(cron=[Cron("@daily", WORKER, priority=12, name="p")]))
    with pytest.raises(ConfigurationError, match=r"cron entry 'p'.*priority"):
        await bad_priority.start()
