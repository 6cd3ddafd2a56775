"""A node name belongs to one running process: a second one is refused; a restart after a
crash takes the name over."""

from __future__ import annotations

import pytest

from helpers import AppFactory, wait_for_state
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
