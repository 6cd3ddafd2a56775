"""Nodes as separate processes on one database: a leader killed mid-job, its jobs rescued and
finished elsewhere exactly once, a new leader, cron ticks never doubled across the change; and
runtime control (pause, scale, cancel) reaching jobs on other nodes."""

from __future__ import annotations

import signal
import time
from collections import Counter
from contextlib import ExitStack
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import koban
from helpers import NodeProcess, node_process, sql_rows, wait_until
from koban import Job, JobState
from koban.engines.sqlite.rows import from_us

APP = "cluster.nodes:app"
#: Deadlines for things that take a rescue window or two; they bound a broken test only.
LONG = 30.0


def as_time(value: Any) -> datetime:
    if isinstance(value, int):  # SQLite: microseconds since the epoch
        value = from_us(value)
    assert isinstance(value, datetime)
    return value.astimezone(UTC)


def leader_row(url: str) -> tuple[str, datetime, datetime] | None:
    rows = sql_rows(url, "SELECT node, elected_at, expires_at FROM koban_leader")
    return (rows[0][0], as_time(rows[0][1]), as_time(rows[0][2])) if rows else None


def ledger(tmp_path: Path) -> list[list[str]]:
    path = tmp_path / "ledger"
    return [line.split() for line in path.read_text().splitlines()] if path.exists() else []


def cron_ticks(client: koban.Koban) -> list[datetime]:
    jobs = client.list_jobs(workers=["cluster.nodes.tick"])
    return sorted(datetime.fromisoformat(j.meta["cron_tick"]) for j in jobs)


def start_nodes(
    stack: ExitStack, url: str, tmp_path: Path, names: str, env: dict[str, str]
) -> dict[str, NodeProcess]:
    nodes = {
        name: stack.enter_context(
            node_process(APP, url, tmp_path / f"{name}.log", node=name, env=env)
        )
        for name in names
    }
    for node in nodes.values():
        node.wait_started(timeout=LONG)
    return nodes


def test_killed_leader_mid_job(db_url: str, tmp_path: Path) -> None:
    """Three nodes, six jobs running; SIGKILL the leader. Time runs 30 times faster in the
    nodes (a cron minute is 2 s), so every window is counted in that clock's seconds."""
    env = {
        "KOBAN_TEST_LEDGER": str(tmp_path / "ledger"),
        "KOBAN_TEST_RELEASE": str(tmp_path / "release"),
        "KOBAN_TEST_SCALE": "30",
        "KOBAN_TEST_BASE": str(time.time()),
        "KOBAN_TEST_LEASE": "45",
        "KOBAN_TEST_RESCUE_AFTER": "45",
        "KOBAN_TEST_CRON": "* * * * *",
    }
    client = koban.Koban(db_url)
    with ExitStack() as stack:
        stack.callback(client.engine.close_sync)
        nodes = start_nodes(stack, db_url, tmp_path, "abc", env)
        jobs = client.enqueue_many(
            [Job(worker="cluster.nodes.block", queue="work") for _ in range(6)]
        )
        ids = [j.id or 0 for j in jobs]

        def executing() -> list[Job] | None:
            found = client.list_jobs(ids=ids)
            return found if all(j.state is JobState.EXECUTING for j in found) else None

        running = wait_until(executing, LONG, interval=0.05, what="all six jobs to run")
        wait_until(lambda: cron_ticks(client), LONG, what="a first cron tick")
        victim = wait_until(lambda: leader_row(db_url), LONG, what="a leader")[0]
        victims_jobs = sorted(j.id or 0 for j in running if j.attempted_by[0] == victim)  # type: ignore[index]
        assert len(victims_jobs) == 2  # two slots per node, six jobs: every node holds two

        nodes[victim].kill()
        row = leader_row(db_url)
        assert row is not None and row[0] == victim
        old_lease_end = row[2]

        new = wait_until(
            lambda: (r := leader_row(db_url)) is not None and r[0] != victim and r,
            LONG,
            what="another node to take the leadership over",
        )
        assert new[0] in set("abc") - {victim}
        assert new[1] >= old_lease_end, "the new leader was elected before the old lease ended"

        def rescued() -> bool:
            return all(
                j.state is JobState.AVAILABLE and j.meta.get("rescued") == 1
                for j in client.list_jobs(ids=victims_jobs)
            )

        wait_until(rescued, LONG, what="the killed leader's jobs to be rescued")
        after_change = len(cron_ticks(client))
        wait_until(
            lambda: len(cron_ticks(client)) >= after_change + 2, LONG, what="two more cron ticks"
        )

        (tmp_path / "release").touch()

        def completed() -> bool:
            return all(j.state is JobState.COMPLETED for j in client.list_jobs(ids=ids))

        wait_until(completed, LONG, what="all six jobs to complete")
        for name, node in nodes.items():
            if name != victim:
                node.signal(signal.SIGTERM)
                assert node.wait(LONG) == 0, node.output()

    finished = [line for line in ledger(tmp_path) if line[0] == "done"]
    assert sorted(int(line[1]) for line in finished) == sorted(ids)  # each exactly once
    for line in finished:
        job_id, node, attempt = int(line[1]), line[2], int(line[3])
        if job_id in victims_jobs:
            assert node != victim and attempt == 2
        else:
            assert attempt == 1
    for job in client.list_jobs(ids=ids):
        if job.id in victims_jobs:
            assert job.errors[-1]["type"] == "koban.Rescued" and job.meta["rescued"] == 1
        else:  # long jobs on live nodes ran far past the rescue window, untouched
            assert job.errors == [] and "rescued" not in job.meta

    ticks = cron_ticks(client)
    assert max(Counter(ticks).values()) == 1, "a cron tick was inserted twice"
    assert ticks == [ticks[0] + timedelta(minutes=i) for i in range(len(ticks))], ticks
    # Cleanly stopped nodes unregistered; the killed one is left for the lifeline to forget.
    assert [n.name for n in client.list_nodes()] == [victim]


def test_pause_scale_and_cancel_reach_other_nodes(db_url: str, tmp_path: Path) -> None:
    env = {"KOBAN_TEST_LEDGER": str(tmp_path / "ledger"), "KOBAN_TEST_RELEASE": str(tmp_path)}
    client = koban.Koban(db_url)
    client.pause_queue("work")  # before any node runs: stored, and honoured when they start
    with ExitStack() as stack:
        stack.callback(client.engine.close_sync)
        nodes = start_nodes(stack, db_url, tmp_path, "ab", env)

        def reported(key: str) -> dict[str, Any]:
            return {n.name: n.queues.get("work", {}).get(key) for n in client.list_nodes()}

        wait_until(lambda: reported("paused") == {"a": True, "b": True}, what="nodes paused")
        job = client.enqueue(Job(worker="cluster.nodes.note", queue="work"))
        seen = {n.name: n.heartbeat_at for n in client.list_nodes()}
        wait_until(
            lambda: all(n.heartbeat_at > seen[n.name] for n in client.list_nodes()),
            what="both nodes to heartbeat again",
        )
        assert (client.get_job(job.id or 0) or job).state is JobState.AVAILABLE

        client.resume_queue("work")
        wait_until(
            lambda: (j := client.get_job(job.id or 0)) and j.state is JobState.COMPLETED,
            what="the job to run once the queue is resumed",
        )

        client.scale_queue("work", 1, node="a")
        wait_until(lambda: reported("limit") == {"a": 1, "b": 2}, what="node a to scale to 1")

        a = client.enqueue(Job(worker="cluster.nodes.waits", queue="work"))
        s = client.enqueue(Job(worker="cluster.nodes.waits_sync", queue="work"))
        wait_until(
            lambda: all(j.state is JobState.EXECUTING for j in client.list_jobs(ids=[a.id, s.id])),
            what="both jobs to run",
        )
        client.cancel_job(a.id or 0)
        client.cancel_job(s.id or 0)

        def stopped() -> set[str]:
            return {f"{line[0]} {line[1]}" for line in ledger(tmp_path)}

        wait_until(
            lambda: {f"cancelled {a.id}", f"stopped {s.id}"} <= stopped(), what="both to stop"
        )
        assert [line[3] for line in ledger(tmp_path) if line[0] == "stopped"] == ["True"]
        assert all(j.state is JobState.CANCELLED for j in client.list_jobs(ids=[a.id, s.id]))

        for node in nodes.values():
            node.signal(signal.SIGTERM)
        for node in nodes.values():
            assert node.wait(LONG) == 0, node.output()
    assert client.list_nodes() == []
    assert leader_row(db_url) is None
