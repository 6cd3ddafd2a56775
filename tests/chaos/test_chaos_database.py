"""Database faults on PostgreSQL: the server kills every node connection, drops only the
listening one, or restarts. Nodes must recover on their own within seconds, lose nothing, never
crash, and report each incident once rather than in a storm of warnings.

The restart touches the server every test shares, so it runs only with
KOBAN_CHAOS_PG_RESTART=1 or in CI (CI=true), when nothing else runs beside it. It restarts the
cluster found under /etc/postgresql with pg_ctlcluster, or runs KOBAN_CHAOS_PG_RESTART_CMD.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

import koban
from helpers import sql_rows, wait_until
from koban.engines.postgres.engine import PostgresEngine

from .driver import ChaosCluster
from .invariants import RESCUED, JobRow, check, read_jobs, summarise
from .ledger import Event, read_ledger
from .logs import kinds, stamped, storms

WORKERS = ("chaos.chaos_app.chaos_async", "chaos.chaos_app.chaos_sync")
#: Most warning lines one node may write for one incident: one per part that noticed it
#: (notifier, acker, producer, and each plugin), never one per connection or per retry.
WARNINGS_PER_INCIDENT = 8
RESTART_ALLOWED = os.environ.get("KOBAN_CHAOS_PG_RESTART") == "1" or os.environ.get("CI") == "true"
#: The chaos nodes' rescue window and lifeline interval (chaos_app's defaults).
RESCUE_AFTER = 3.0
LIFELINE_INTERVAL = 0.5
#: The lifeline's report of a rescue, as `kinds` names it.
RESCUE_KIND = "koban.lifeline: rescued N job(s)"


@pytest.fixture
def cluster(pg_url: str, tmp_path: Path) -> Iterator[ChaosCluster]:
    nodes = ChaosCluster(pg_url, tmp_path, size=2, env={"KOBAN_CHAOS_MAX_MS": "50"})
    try:
        yield nodes
    finally:
        nodes.kill_all()


def enqueue_spread(url: str, count: int, seconds: float) -> None:
    """`count` jobs whose scheduled times spread over the next `seconds`: a steady flow."""
    app = koban.Koban(url)
    try:
        app.enqueue_many(
            koban.Job(
                worker=WORKERS[i % 2],
                queue="chaos",
                max_attempts=5,
                args={"n": i},
                schedule_in=seconds * i / count,
            )
            for i in range(count)
        )
    finally:
        app.engine.close_sync()


def finished(url: str) -> int:
    query = "SELECT count(*) FROM koban_jobs WHERE state IN ('completed', 'discarded', 'cancelled')"
    return int(sql_rows(url, query)[0][0])


def wait_for_progress(url: str, jobs: int, what: str) -> None:
    """Wait until `jobs` more jobs have finished: the nodes are working (again)."""
    target = finished(url) + jobs
    wait_until(lambda: finished(url) >= target, timeout=20, what=what)


def terminate(url: str, where: str = "true") -> int:
    """Terminate the server processes of every other session on this database matching
    `where`; return how many."""
    rows = sql_rows(
        url,
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
        f"WHERE datname = current_database() AND pid <> pg_backend_pid() AND ({where})",
    )
    return len(rows)


def assert_clean_run(
    cluster: ChaosCluster,
    url: str,
    count: int,
    incidents: int,
    *,
    back_at_ns: int | None = None,
) -> None:
    """Every job ran to its end exactly as the ledger says; no node crashed or stormed.

    `back_at_ns`: the wall-clock time the database came back after an outage that outlasted
    the rescue window. The nodes then lost it long enough for their claims to be rescued, in
    as many lifeline ticks as the claims take to age past the window; `assert_rescues` checks
    those rescues instead of a count of their log lines.
    """
    wait_until(lambda: finished(url) == count, timeout=60, what=f"all {count} jobs to finish")
    cluster.stop()
    jobs = read_jobs(url)
    events = read_ledger(cluster.ledger_dir)
    print(summarise(jobs, events, cluster.exits))
    assert not cluster.crashes, "\n\n".join(cluster.crashes)
    problems = check(jobs, events, cluster.exits, expected_jobs=count)
    assert not problems, "\n".join(problems[:30])
    allowed: tuple[str, ...] = ()
    if back_at_ns is not None:
        assert_rescues(jobs, events, cluster.logs(), back_at_ns)
        allowed = (RESCUE_KIND,)
    for name, text in cluster.logs().items():
        assert not storms(text, incidents, allowed=allowed), f"node {name} stormed:\n" + "\n".join(
            storms(text, incidents, allowed=allowed)
        )
        total = sum(kinds(text).values())
        assert total <= WARNINGS_PER_INCIDENT * incidents, (
            f"node {name} wrote {total} warnings for {incidents} incident(s): {kinds(text)}"
        )


async def test_one_failed_statement_clears_every_dead_pooled_connection(pg_url: str) -> None:
    """After the server kills a node's sessions, the first failing statement must rid the pool
    of every dead connection. Otherwise each later statement draws another dead one, and every
    part of the node fails, recovers and warns again, once per pooled connection."""
    engine = PostgresEngine(pg_url)
    await engine.open()
    try:
        pool = engine._async_pool()
        while (
            pool.get_stats().get("pool_available", 0) < 4
        ):  # grow the pool: overlapping statements
            await asyncio.gather(*(engine.count_by_queue_and_state() for _ in range(8)))
        assert terminate(pg_url) >= 3
        failures = 0
        for _ in range(8):
            try:
                await engine.fetch("chaos", 1, "node", "producer")
            except psycopg.OperationalError:
                failures += 1
        assert failures == 1
    finally:
        await engine.close()


def test_nodes_survive_their_connections_being_terminated(
    cluster: ChaosCluster, pg_url: str
) -> None:
    count = 1500
    enqueue_spread(pg_url, count, seconds=8)
    cluster.start()
    incidents = 3
    for incident in range(incidents):
        wait_for_progress(pg_url, 50, f"jobs to flow before incident {incident + 1}")
        assert terminate(pg_url) >= 2 * 2, "expected each node to hold at least two connections"
    wait_for_progress(pg_url, 50, "jobs to flow again after the last incident")
    assert_clean_run(cluster, pg_url, count, incidents)


#: The listening connection is the one whose last statement was LISTEN or its health check.
LISTENER = "query IN ('LISTEN koban_signal', 'SELECT 1')"


def test_a_dropped_listening_connection_is_reopened(cluster: ChaosCluster, pg_url: str) -> None:
    count = 600
    enqueue_spread(pg_url, count, seconds=5)
    cluster.start()
    wait_until(lambda: listeners(pg_url) == 2, what="both nodes to LISTEN")
    wait_for_progress(pg_url, 50, "jobs to flow")
    assert terminate(pg_url, LISTENER) == 2
    # Both nodes notice, say so once, and listen again.
    wait_until(lambda: listeners(pg_url) == 2, timeout=20, what="both nodes to LISTEN again")
    for name, text in cluster.logs().items():
        assert "notifier lost its connection" in text, name
    wait_until(
        lambda: all("notifier reconnected" in t for t in cluster.logs().values()),
        what="each node to log its reconnection",
    )
    wait_for_progress(pg_url, 50, "jobs to flow after the listener came back")
    assert_clean_run(cluster, pg_url, count, incidents=1)


def listeners(url: str) -> int:
    return int(
        sql_rows(
            url,
            "SELECT count(*) FROM pg_stat_activity "
            f"WHERE datname = current_database() AND pid <> pg_backend_pid() AND {LISTENER}",
        )[0][0]
    )


def rescue_problems(
    jobs: list[JobRow], events: list[Event], logs: dict[str, str], back_at_ns: int
) -> list[str]:
    """What is wrong with the rescues of one outage that ended at `back_at_ns` (wall clock).

    Only attempts claimed before the outage may be rescued: a node that claims a job once the
    database is back heartbeats again within the rescue window, and a job on a live node is
    never taken from it. Those claims age past the window one by one while their node has not
    yet heartbeated again, so the leader may rescue them in several ticks, each with its own
    log line; once that node heartbeats, rescues stop. So each node's rescue lines span no more
    than the rescue window (and a tick of slack): rescues that go on are a storm.
    """
    problems: list[str] = []
    started = {(e.job_id, e.attempt): e.wall_ns for e in events if e.kind == "S"}
    for job in jobs:
        for error in job.errors:
            if error.get("type") != RESCUED:
                continue
            at = started.get((job.id, error.get("attempt")))  # type: ignore[arg-type]
            if at is not None and at >= back_at_ns:
                problems.append(
                    f"job {job.id} attempt {error.get('attempt')} was claimed "
                    f"{(at - back_at_ns) / 1e9:.2f} s after the database came back, yet rescued"
                )
    for name, text in logs.items():
        lines = stamped(text, "koban.lifeline", "rescued ")
        if lines and lines[-1][0] - lines[0][0] > RESCUE_AFTER + 2 * LIFELINE_INTERVAL:
            problems.append(
                f"node {name} went on rescuing for {lines[-1][0] - lines[0][0]:.1f} s:\n"
                + "\n".join(message for _at, message in lines)
            )
    return problems


def assert_rescues(
    jobs: list[JobRow], events: list[Event], logs: dict[str, str], back_at_ns: int
) -> None:
    for name, text in logs.items():  # for the report: when each rescue was logged
        for at, message in stamped(text, "koban.lifeline", "rescued "):
            print(f"{name} at {at - back_at_ns / 1e9:+.2f} s: {message}")
    problems = rescue_problems(jobs, events, logs, back_at_ns)
    assert not problems, "\n".join(problems[:30])


def reachable(url: str) -> bool:
    try:
        return bool(sql_rows(url, "SELECT 1"))
    except psycopg.OperationalError:
        return False


def restart_postgres() -> None:
    """Restart the server (fast shutdown), the way an upgrade or failover would.

    KOBAN_CHAOS_PG_RESTART_CMD overrides the command, for a server not run by pg_ctlcluster.
    """
    command = os.environ.get("KOBAN_CHAOS_PG_RESTART_CMD")
    if command:
        subprocess.run(command, shell=True, check=True, timeout=120)
        return
    versions = sorted(os.listdir("/etc/postgresql"))
    assert versions, "no PostgreSQL cluster configured under /etc/postgresql"
    subprocess.run(
        ["pg_ctlcluster", "--skip-systemctl-redirect", versions[-1], "main", "restart"],
        check=True,
        timeout=120,
    )


@pytest.mark.skipif(
    not RESTART_ALLOWED,
    reason="restarts the shared PostgreSQL: set KOBAN_CHAOS_PG_RESTART=1 (CI=true runs it)",
)
def test_nodes_survive_a_postgres_restart(cluster: ChaosCluster, pg_url: str) -> None:
    count = 1200
    enqueue_spread(pg_url, count, seconds=8)
    cluster.start()
    wait_for_progress(pg_url, 100, "jobs to flow before the restart")
    started = time.monotonic()
    restart_postgres()
    wait_until(lambda: reachable(pg_url), timeout=60, what="PostgreSQL to accept connections")
    back_at_ns = time.time_ns()
    print(f"PostgreSQL was unreachable for at most {time.monotonic() - started:.1f} s")
    try:
        wait_for_progress(pg_url, 100, "jobs to flow after the restart")
    except AssertionError:
        for name, text in cluster.logs().items():  # what the nodes saw, for the report
            print(f"----- node {name} -----\n{text[-6000:]}")
        raise
    print(f"restart and recovery took {time.monotonic() - started:.1f} s")
    assert_clean_run(cluster, pg_url, count, incidents=1, back_at_ns=back_at_ns)
