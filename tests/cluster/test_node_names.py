"""A node name belongs to one running process: a second one is refused; a restart after a
crash takes the name over."""

from __future__ import annotations

import asyncio

import pytest

from helpers import AppFactory, await_until, wait_for_state
from koban import Heartbeat, Job, JobState
from koban.errors import ConfigurationError

from .conftest import idle_node


async def test_a_second_node_under_a_running_nodes_name_is_refused_and_harms_nothing(
    apps: AppFactory,
) -> None:
    beat = Heartbeat(interval=0.1)
    first = apps(node="worker-1", plugins=[beat])

    @first.worker()
    async def noop(job: Job) -> None:
        return None

    await first.start()

    second = apps(node="worker-1", plugins=[Heartbeat(interval=0.1)])
    with pytest.raises(ConfigurationError) as refused:
        await second.start()
    message = str(refused.value)
    assert "'worker-1'" in message and "in use by a running node" in message
    assert "--node" in message
    assert second.node is None

    # The running node kept its registration and goes on working.
    [info] = [n for n in await first.alist_nodes() if n.name == "worker-1"]
    assert info.meta["incarnation"] == beat.incarnation
    job = await noop.aenqueue()
    await wait_for_state(first, job.id or 0, JobState.COMPLETED)


async def test_a_restart_under_the_name_of_a_crashed_node_takes_the_name_over(
    apps: AppFactory,
) -> None:
    crashed = apps(node="worker-1")
    await crashed.open()
    # A node that registered and then died without unregistering: its row stays, frozen.
    beat = Heartbeat(interval=0.1)
    ghost = idle_node(crashed, "worker-1", [beat])
    await beat.start(ghost)
    ghost_incarnation = beat.incarnation
    # An operator's per-node setting rewrites the dead row's meta: not a sign of life.
    await crashed.apause_queue("default", node="worker-1")

    restarted = apps(node="worker-1", plugins=[Heartbeat(interval=0.1)])
    await restarted.start()
    [info] = [n for n in await restarted.alist_nodes() if n.name == "worker-1"]
    assert info.meta["incarnation"] != ghost_incarnation


async def test_two_nodes_started_at_once_under_one_name_leave_it_to_the_later_one(
    apps: AppFactory,
) -> None:
    """Both looked for a namesake before either registered, so neither was refused. The later
    registration keeps the name; the earlier node, at its next heartbeat, leaves the row alone
    and stops fetching, instead of both restarting each other's row (and the lifeline rescuing
    both nodes' running jobs) at every heartbeat."""
    beat = Heartbeat(interval=0.1)
    earlier = apps(node="worker-1", plugins=[beat])

    @earlier.worker()
    async def noop(job: Job) -> None:
        return None

    node = await earlier.start()
    # The other process's registration, as its own Heartbeat.start writes it.
    later = Heartbeat(interval=0.1)
    twin = idle_node(earlier, "worker-1", [later])
    await later._beat(twin, takeover=True)
    [row] = [n for n in await earlier.alist_nodes() if n.name == "worker-1"]
    assert row.meta["incarnation"] == later.incarnation

    await await_until(lambda: node.failure is not None, timeout=10)
    assert node.failed.is_set()
    message = str(node.failure)
    assert "'worker-1'" in message and "registered by another process" in message
    assert "--node" in message
    assert all(not p._fetching for p in node.producers.values())
    for _ in range(3):  # its heartbeats leave the row to the later node
        await asyncio.sleep(0.15)
        [now] = [n for n in await earlier.alist_nodes() if n.name == "worker-1"]
        assert now.meta["incarnation"] == later.incarnation
        assert now.started_at == row.started_at
    job = await noop.aenqueue()  # nothing on the earlier node takes it
    await asyncio.sleep(0.3)
    stored = await earlier.aget_job(job.id or 0)
    assert stored is not None and stored.state is JobState.AVAILABLE
    await earlier.close()  # a clean stop does not delete the later node's row
    await earlier.open()
    assert [n.meta["incarnation"] for n in await earlier.alist_nodes()] == [later.incarnation]


async def test_serve_stops_and_raises_when_the_node_loses_its_name(apps: AppFactory) -> None:
    app = apps(node="worker-1", plugins=[Heartbeat(interval=0.1)])
    serving = asyncio.create_task(app.serve())
    await await_until(lambda: app.node is not None and app.node.last_heartbeat, timeout=10)
    other = Heartbeat(interval=0.1)
    await other._beat(idle_node(app, "worker-1", [other]), takeover=True)
    with pytest.raises(ConfigurationError, match="registered by another process"):
        await asyncio.wait_for(serving, 20)
    assert app.node is None
