"""Lifeline: jobs of dead or restarted nodes run again; jobs on live nodes are never touched."""

from __future__ import annotations

from datetime import timedelta

import koban
from helpers import AppFactory
from koban import Heartbeat, Job, JobState, Lifeline
from koban.engines.base import Ack
from koban.runtime.node import Node

from .conftest import idle_node


async def register(app: koban.Koban, name: str, interval: float = 5.0) -> tuple[Node, Heartbeat]:
    heartbeat = Heartbeat(interval=interval)
    node = idle_node(app, name, [heartbeat, Lifeline(rescue_after=15)])
    await heartbeat.start(node)
    return node, heartbeat


async def take(app: koban.Koban, node: Node, n: int = 1) -> list[Job]:
    """Claim up to n available jobs for `node`, as its producer would."""
    producer = f"default.{node.name}"
    return await app.engine.fetch("default", n, node.name, producer, now=node.db_now())


async def test_dead_nodes_jobs_go_back_to_available_and_live_ones_stay(
    apps: AppFactory, clock: koban.FrozenClock
) -> None:
    app = apps(clock=clock)
    await app.open()
    dead, _ = await register(app, "dead")
    live, live_beat = await register(app, "live")
    lifeline = Lifeline(rescue_after=15)
    await app.aenqueue_many([Job(worker="w.a", args={"n": i}, max_attempts=3) for i in range(3)])
    [orphan, orphan2] = await take(app, dead, 2)
    [long_running] = await take(app, live, 1)

    clock.advance(10)
    await live_beat.tick(live)
    assert await lifeline.tick(live) == 0  # "dead" is only 10 s silent: not dead yet

    clock.advance(10)  # dead: 20 s silent; live: heartbeat 10 s ago, its job started 20 s ago
    await live_beat.tick(live)
    assert await lifeline.tick(live) == 2

    for job_id in (orphan.id, orphan2.id):
        job = await app.aget_job(job_id or 0)
        assert job is not None
        assert job.state is JobState.AVAILABLE
        assert job.attempt == 1
        assert job.meta["rescued"] == 1
        assert job.errors[-1]["type"] == "koban.Rescued"
        assert "dead" in job.errors[-1]["message"]
        assert job.scheduled_at == clock.now()

    job = await app.aget_job(long_running.id or 0)
    assert job is not None and job.state is JobState.EXECUTING and "rescued" not in job.meta

    # The rescued job runs again on the live node, and its late outcome from the dead node
    # (if it ever came) is ignored.
    again = await take(app, live, 2)
    assert sorted(j.id for j in again) == sorted([orphan.id, orphan2.id])
    assert all(j.attempt == 2 for j in again)
    assert await app.engine.ack([Ack(orphan.id or 0, 1, JobState.COMPLETED)], now=clock.now()) == 0
    job = await app.aget_job(orphan.id or 0)
    assert job is not None and job.state is JobState.EXECUTING and job.attempt == 2

    # A long job on a live node is never rescued, however long it runs.
    for _ in range(6):
        clock.advance(10)
        await live_beat.tick(live)
        await lifeline.tick(live)
    job = await app.aget_job(long_running.id or 0)
    assert job is not None and job.state is JobState.EXECUTING and job.attempt == 1


async def test_a_rescued_job_without_attempts_left_is_discarded(
    apps: AppFactory, clock: koban.FrozenClock
) -> None:
    app = apps(clock=clock)
    await app.open()
    dead, _ = await register(app, "dead")
    [job] = await app.aenqueue_many([Job(worker="w.a", max_attempts=1)])
    await take(app, dead)
    clock.advance(16)
    assert await Lifeline(rescue_after=15).tick(idle_node(app, "other")) == 1
    stored = await app.aget_job(job.id or 0)
    assert stored is not None and stored.state is JobState.DISCARDED
    assert stored.discarded_at == clock.now()
    assert stored.errors[-1]["type"] == "koban.Rescued"


async def test_a_rescue_that_runs_after_its_node_lost_the_database_rescues_nothing(
    apps: AppFactory, clock: koban.FrozenClock
) -> None:
    """The lifeline checks its own node's heartbeat before it rescues, but its statement may
    then wait out an outage (for a pooled connection, say). The statement checks again: a
    rescuer whose registered heartbeat went stale meanwhile takes no job, not even its own."""
    app = apps(clock=clock)
    await app.open()
    rescuer, rescuer_beat = await register(app, "rescuer")
    other, _ = await register(app, "other")
    await app.aenqueue_many([Job(worker="w.a", args={"n": i}, max_attempts=3) for i in range(2)])
    [mine] = await take(app, rescuer, 1)
    [theirs] = await take(app, other, 1)
    clock.advance(20)  # every heartbeat is 20 s old: the database was away
    rescuer.last_heartbeat = clock.now()  # the local check passed before the outage
    lifeline = Lifeline(rescue_after=15)
    assert await lifeline.tick(rescuer) == 0
    assert await app.engine.rescue_jobs(15, 10, now=rescuer.db_now(), by="rescuer") == []
    for job in (mine, theirs):
        stored = await app.aget_job(job.id or 0)
        assert stored is not None and stored.state is JobState.EXECUTING
    await rescuer_beat.tick(rescuer)  # caught up: it judges others again
    assert await lifeline.tick(rescuer) == 1
    stored = await app.aget_job(theirs.id or 0)
    assert stored is not None and stored.state is JobState.AVAILABLE


async def test_jobs_of_a_restarted_node_are_rescued_at_once(
    apps: AppFactory, clock: koban.FrozenClock
) -> None:
    """A node restarted under the same name heartbeats, but it is not running the old jobs."""
    app = apps(clock=clock)
    await app.open()
    before, _ = await register(app, "worker-1", interval=0.1)
    [job] = await app.aenqueue_many([Job(worker="w.a")])
    await take(app, before)
    clock.advance(2)
    # A new incarnation (new process): it watches the crashed one's row for two of its
    # heartbeat intervals (short here) before taking the name over.
    after, _ = await register(app, "worker-1", interval=0.1)
    assert await Lifeline(rescue_after=15).tick(after) == 1
    stored = await app.aget_job(job.id or 0)
    assert stored is not None and stored.state is JobState.AVAILABLE
    # Jobs the new incarnation takes are its own and stay.
    await take(app, after)
    clock.advance(2)
    assert await Lifeline(rescue_after=15).tick(after) == 0


async def test_long_silent_nodes_are_forgotten(apps: AppFactory, clock: koban.FrozenClock) -> None:
    app = apps(clock=clock)
    await app.open()
    await register(app, "gone")
    live, beat = await register(app, "live")
    lifeline = Lifeline(rescue_after=15, forget_after=600)
    clock.advance(300)
    await beat.tick(live)
    await lifeline.tick(live)
    assert {n.name for n in await app.alist_nodes()} == {"gone", "live"}
    clock.advance(timedelta(seconds=301).total_seconds())
    await beat.tick(live)
    await lifeline.tick(live)
    assert [n.name for n in await app.alist_nodes()] == ["live"]


async def test_a_leader_whose_own_heartbeat_is_late_rescues_nothing(
    apps: AppFactory, clock: koban.FrozenClock
) -> None:
    """After a pause longer than the window (a stopped process, a clock jump), the leader's own
    jobs would look dead: it waits for its own heartbeat before judging anyone."""
    app = apps(clock=clock)
    await app.open()
    leader, beat = await register(app, "leader")
    [job] = await app.aenqueue_many([Job(worker="w.a")])
    await take(app, leader)
    lifeline = Lifeline(rescue_after=15)
    clock.advance(60)
    assert await lifeline.tick(leader) == 0
    await beat.tick(leader)
    assert await lifeline.tick(leader) == 0
    stored = await app.aget_job(job.id or 0)
    assert stored is not None and stored.state is JobState.EXECUTING


async def test_a_job_claimed_within_the_window_is_not_rescued_though_its_nodes_heartbeat_is_late(
    apps: AppFactory, clock: koban.FrozenClock
) -> None:
    """A claim proves its node alive. A rescue judged on a stale view — a leader's statement
    delayed in the network until after the node came back and claimed a job, before its next
    heartbeat landed — must not take that job back and run it a second time."""
    app = apps(clock=clock)
    await app.open()
    flaky, _flaky_beat = await register(app, "flaky")
    leader, leader_beat = await register(app, "leader")
    lifeline = Lifeline(rescue_after=15)
    [old, fresh] = await app.aenqueue_many([Job(worker="w.a", max_attempts=3) for _ in range(2)])
    [claimed_early] = await take(app, flaky, 1)
    assert claimed_early.id == old.id

    clock.advance(20)  # flaky's last heartbeat is 20 s old: by its heartbeat alone it is dead
    [claimed_now] = await take(app, flaky, 1)  # ...but it claims a job now: it is alive
    assert claimed_now.id == fresh.id
    await leader_beat.tick(leader)
    assert await lifeline.tick(leader) == 1  # only the job claimed 20 s ago

    early = await app.aget_job(old.id or 0)
    assert early is not None and early.state is JobState.AVAILABLE
    now = await app.aget_job(fresh.id or 0)
    assert now is not None and now.state is JobState.EXECUTING and "rescued" not in now.meta

    # Silent for a whole window after its last claim too: now it is dead, and its job runs again.
    clock.advance(16)
    await leader_beat.tick(leader)
    assert await lifeline.tick(leader) == 1
    now = await app.aget_job(fresh.id or 0)
    assert now is not None and now.state is JobState.AVAILABLE and now.meta["rescued"] == 1
