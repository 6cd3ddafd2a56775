"""Runtime control across nodes: pause, resume and scale (cluster-wide, stored, or per node),
cancelling a job running on another node, and the cluster's reports."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

import koban
from helpers import AppFactory, await_until, wait_for_state
from koban import Cron, Heartbeat, Job, JobState, UnknownNodeError
from koban.errors import ConfigurationError


def node_app(apps: AppFactory, name: str) -> koban.Koban:
    # A quick heartbeat, so stored settings reach nodes fast even without notifications.
    return apps(node=name, queues={"default": 3, "other": 2}, plugins=[Heartbeat(interval=0.1)])


async def test_pause_resume_and_scale_reach_every_node_and_stick(apps: AppFactory) -> None:
    a = node_app(apps, "a")
    client = apps()
    node_a = await a.start()
    producer = node_a.producers["default"]

    await client.apause_queue("default")
    await await_until(lambda: producer.paused, what="node a to pause")
    assert not node_a.producers["other"].paused

    # A node started later honours the stored setting from its first fetch on.
    b = node_app(apps, "b")
    node_b = await b.start()
    assert node_b.producers["default"].paused

    client.scale_queue("default", 7)
    await await_until(lambda: producer.limit == 7 and node_b.producers["default"].limit == 7)
    await client.aresume_queue("default")
    await await_until(lambda: not producer.paused and not node_b.producers["default"].paused)
    client.scale_queue("default", None)  # back to each node's configured slots
    await await_until(lambda: producer.limit == 3 and node_b.producers["default"].limit == 3)

    [state] = [s for s in await client.aqueue_states() if s.name == "default"]
    assert (state.paused, state.limit) == (False, None)
    reported = {n.name: n.queues["default"] for n in client.list_nodes()}
    assert reported.keys() == {"a", "b"}


async def test_per_node_settings(apps: AppFactory) -> None:
    a, b = node_app(apps, "a"), node_app(apps, "b")
    client = apps()
    node_a, node_b = await a.start(), await b.start()

    await client.apause_queue("default", node="b")
    await client.ascale_queue("other", 1, node="a")
    await await_until(lambda: node_b.producers["default"].paused)
    await await_until(lambda: node_a.producers["other"].limit == 1)
    # The others are untouched (checked after both nodes heartbeated again).
    beats = [n.heartbeat_at for n in await client.alist_nodes()]
    await await_until(
        lambda: all(n.heartbeat_at > t for n, t in zip(client.list_nodes(), beats, strict=True))
    )
    assert not node_a.producers["default"].paused and node_b.producers["other"].limit == 2

    with pytest.raises(UnknownNodeError, match="no node named 'c'"):
        await client.apause_queue("default", node="c")
    with pytest.raises(ConfigurationError, match="limit must be a whole number"):
        client.scale_queue("default", -1)

    # A cluster-wide change replaces the per-node settings of the same kind.
    client.resume_queue("default")
    await await_until(lambda: not node_b.producers["default"].paused)
    assert node_a.producers["other"].limit == 1


async def test_cancel_reaches_a_job_running_on_another_node(apps: AppFactory) -> None:
    worker_app = node_app(apps, "runner")
    seen: dict[str, str] = {}
    released = threading.Event()

    @worker_app.worker
    async def waits(job: Job) -> None:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            seen["async"] = "cancelled"
            raise

    @worker_app.worker
    def waits_sync(job: Job) -> None:
        deadline = time.monotonic() + 30
        while not job.cancelled and time.monotonic() < deadline and not released.is_set():
            time.sleep(0.01)
        seen["sync"] = "stopped at a safe point" if job.cancelled else "ran out"

    await worker_app.start()
    client = apps()
    try:
        a = await waits.aenqueue()  # type: ignore[attr-defined]
        s = await waits_sync.aenqueue()  # type: ignore[attr-defined]
        await wait_for_state(client, a.id or 0, JobState.EXECUTING)
        await wait_for_state(client, s.id or 0, JobState.EXECUTING)

        cancelled = await client.acancel_job(a.id or 0)
        assert cancelled is not None and cancelled.state is JobState.CANCELLED
        client.cancel_job(s.id or 0)
        await await_until(lambda: len(seen) == 2, what="both jobs to stop")
        assert seen == {"async": "cancelled", "sync": "stopped at a safe point"}
        for job_id in (a.id, s.id):
            job = await client.aget_job(job_id or 0)
            assert job is not None and job.state is JobState.CANCELLED
            assert job.cancelled_at is not None
        assert worker_app.node is not None and worker_app.node.running_jobs == 0
    finally:
        released.set()


async def test_reports(apps: AppFactory, clock: koban.FrozenClock) -> None:
    app = apps(node="solo", clock=clock)

    @app.worker
    async def nightly(job: Job) -> None:
        return None

    app.cron = [Cron("0 0 * * *", nightly, timezone="Europe/Warsaw", name="nightly")]
    await app.aenqueue_many([Job(worker="x.y", queue="mail"), Job(worker="x.y", queue="mail")])
    node = await app.start()
    await await_until(lambda: node.is_leader)
    [info] = app.list_nodes()
    assert info.name == "solo" and info.leader
    assert set(info.queues) == {"default"}
    assert info.meta["cluster_started_at"]
    states = {s.name: s for s in app.queue_states()}
    assert states["mail"].counts == {"available": 2}
    assert "default" in states
    [entry] = app.cron_entries()
    # The clock is frozen at 2030-01-02 03:04:05 UTC, 04:04:05 in Warsaw.
    assert entry.next_run is not None and entry.next_run.isoformat() == "2030-01-03T00:00:00+01:00"
    assert entry.next_run_utc is not None
    assert entry.next_run_utc.isoformat() == "2030-01-02T23:00:00+00:00"
    assert entry.last_tick is None and entry.worker == nightly.name  # type: ignore[attr-defined]


async def test_a_job_the_database_no_longer_holds_is_stopped_without_a_signal(
    apps: AppFactory,
) -> None:
    """The cancel notification is lost: the node's next heartbeat notices and stops the job."""
    worker_app = node_app(apps, "runner")
    stopped = asyncio.Event()

    @worker_app.worker
    async def waits(job: Job) -> None:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            stopped.set()
            raise

    await worker_app.start()
    job = await waits.aenqueue()  # type: ignore[attr-defined]
    await wait_for_state(worker_app, job.id or 0, JobState.EXECUTING)
    # Straight to the engine: the row changes, no node is told.
    [cancelled] = await worker_app.engine.cancel_jobs(koban.JobFilter(ids=[job.id or 0]))
    assert cancelled.state is JobState.CANCELLED
    await asyncio.wait_for(stopped.wait(), timeout=10)
    stored = await worker_app.aget_job(job.id or 0)
    assert stored is not None and stored.state is JobState.CANCELLED
