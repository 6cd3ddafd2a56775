"""Network partition: the cluster's leader runs in its own network namespace and is cut off from
the database (its packets vanish, its connections hang) while another node keeps working.

It must stop acting as leader before the other node takes the lease, claim nothing while cut
off, have its jobs rescued once its heartbeat expires, and, when the network comes back, record
no result for the jobs it no longer owns. Default: a 10 s cut with short windows;
KOBAN_SOAK=1 (or KOBAN_CHAOS_PARTITION=30) holds it for 30 s. Where network namespaces are not
allowed, the node runs beside the test behind a relay that is frozen instead.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest
from psycopg.conninfo import conninfo_to_dict

import koban
from helpers import sql_rows, wait_until

from .driver import ChaosCluster
from .invariants import RESCUED, check, read_jobs, summarise
from .ledger import read_ledger
from .netpartition import Partition, RelayPartition, namespaces_supported

SOAK = os.environ.get("KOBAN_SOAK") == "1"
PARTITION_SECONDS = float(os.environ.get("KOBAN_CHAOS_PARTITION", "30" if SOAK else "10"))
RESCUE_AFTER = 3.0
LEASE = 3.0

#: Why network namespaces cannot be used here (None: they can). KOBAN_CHAOS_NO_NETNS=1 forces
#: the relay partition, to test it where namespaces work.
NO_NAMESPACES = (
    "KOBAN_CHAOS_NO_NETNS=1" if os.environ.get("KOBAN_CHAOS_NO_NETNS") == "1"
    else namespaces_supported()
)  # fmt: skip


@pytest.fixture
def net(pg_url: str) -> Iterator[Partition | RelayPartition]:
    params = conninfo_to_dict(pg_url)
    where = (str(params.get("host", "127.0.0.1")), int(params.get("port", 5432)))
    if NO_NAMESPACES:
        # Said once per run, so a reader of the log knows which partition was tested.
        print(f"no network namespace ({NO_NAMESPACES}): partitioning through a frozen relay")
        partition: Partition | RelayPartition = RelayPartition(*where)
    else:
        partition = Partition(*where)
    try:
        yield partition
    finally:
        partition.close()


@pytest.fixture
def cluster(pg_url: str, tmp_path: Path) -> Iterator[ChaosCluster]:
    nodes = ChaosCluster(
        pg_url,
        tmp_path,
        size=0,
        env={
            "KOBAN_CHAOS_MAX_MS": "1500",
            "KOBAN_CHAOS_RESCUE_AFTER": str(RESCUE_AFTER),
            "KOBAN_CHAOS_LEASE": str(LEASE),
        },
    )
    try:
        yield nodes
    finally:
        nodes.kill_all()


def with_address(url: str, host: str, port: int) -> str:
    """`url` with its host and port replaced."""
    parts = urlsplit(url)
    userinfo = parts.netloc.rpartition("@")[0]
    return urlunsplit(
        parts._replace(netloc=f"{userinfo}@{host}:{port}" if userinfo else f"{host}:{port}")
    )


def leader(url: str) -> str | None:
    rows = sql_rows(url, "SELECT node FROM koban_leader WHERE expires_at > now()")
    return rows[0][0] if rows else None


def log_time(text: str, pattern: str) -> float:
    """The wall-clock time of the first log line matching `pattern` (both nodes share a
    clock: they run on this machine)."""
    for line in text.splitlines():
        if re.search(pattern, line):
            stamp = " ".join(line.split(" ", 2)[:2])
            return datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f").timestamp()
    raise AssertionError(f"no log line matches {pattern!r}")


@pytest.mark.timeout(PARTITION_SECONDS + 240)
def test_a_cut_off_leader_yields_and_its_jobs_are_rescued_not_doubled(
    net: Partition | RelayPartition, cluster: ChaosCluster, pg_url: str
) -> None:
    count = 400
    app = koban.Koban(pg_url)
    try:
        app.enqueue_many(
            koban.Job(worker="chaos.chaos_app.chaos_async", queue="chaos", max_attempts=5)
            for _ in range(count)
        )
    finally:
        app.engine.close_sync()

    # The node to cut off starts first, so it is the leader; it reaches PostgreSQL through
    # the veth pair and the relay.
    isolated = cluster.add(with_address(pg_url, *net.relay_address), net.prefix)
    isolated_name = cluster.names[isolated]
    wait_until(lambda: leader(pg_url) == isolated_name, what="the isolated node to lead")
    other = cluster.add()
    other_name = cluster.names[other]

    def held() -> list[tuple[int, int]]:
        return [
            (job_id, attempt)
            for job_id, attempt in sql_rows(
                pg_url,
                "SELECT id, attempt FROM koban_jobs "
                "WHERE state = 'executing' AND attempted_by[1] = %s",
                (isolated_name,),
            )
        ]

    wait_until(lambda: len(held()) >= 5, what="the isolated node to run jobs")
    cut_at = time.monotonic_ns()
    net.cut()
    # What it held at the cut, once statements that reached the server just before it have
    # finished (none can be added while it is cut off).
    readings: list[list[tuple[int, int]]] = []

    def settled() -> bool:
        readings.append(held())
        return len(readings) > 1 and readings[-1] == readings[-2]

    wait_until(settled, interval=0.3, what="the cut-off node's jobs to settle")
    taken = readings[-1]

    # Its heartbeat expires; the other node takes the lease and rescues those jobs.
    wait_until(lambda: leader(pg_url) == other_name, timeout=30, what="the other node to lead")

    def rescued() -> bool:
        rows = sql_rows(
            pg_url,
            "SELECT count(*) FROM koban_jobs WHERE id = ANY(%s) AND errors::text LIKE %s",
            ([job_id for job_id, _ in taken], f"%{RESCUED}%"),
        )
        return rows[0][0] == len(taken)

    wait_until(rescued, timeout=30, what="the cut-off node's jobs to be rescued")
    remaining = PARTITION_SECONDS - (time.monotonic_ns() - cut_at) / 1e9
    if remaining > 0:
        time.sleep(remaining)  # hold the partition for its full length
    healed_at = time.monotonic_ns()
    net.heal()

    query = (
        "SELECT count(*) FROM koban_jobs WHERE state NOT IN ('completed', 'discarded', 'cancelled')"
    )
    wait_until(lambda: sql_rows(pg_url, query)[0][0] == 0, timeout=90, what="every job to end")
    # The isolated node is alive and back in the cluster.
    wait_until(
        lambda: sql_rows(
            pg_url,
            "SELECT count(*) FROM koban_nodes "
            "WHERE name = %s AND heartbeat_at > now() - interval '2 seconds'",
            (isolated_name,),
        )[0][0],
        timeout=60,
        what="the isolated node to heartbeat again",
    )
    cut_pid = cluster.nodes[isolated].pid
    cluster.stop()

    jobs = read_jobs(pg_url)
    events = read_ledger(cluster.ledger_dir)
    print(summarise(jobs, events, cluster.exits), f"; {len(taken)} held at the cut")
    assert not cluster.crashes, "\n\n".join(cluster.crashes)

    # Nothing was lost, doubled or recorded for an attempt that had been rescued.
    problems = check(jobs, events, cluster.exits, expected_jobs=count, isolated={cut_pid})
    assert not problems, "\n".join(problems[:30])

    # It claimed nothing while cut off (a second of slack for a fetch answered at the cut).
    late = [
        e
        for e in events
        if e.kind == "S" and e.pid == cut_pid and cut_at + 1_000_000_000 < e.at_ns < healed_at
    ]
    assert not late, f"the cut-off node started {len(late)} attempts while cut off: {late[:5]}"

    # It finished the jobs it held while cut off, and those results were not recorded.
    by_id = {j.id: j for j in jobs}
    finished_while_cut = [
        e
        for e in events
        if e.kind == "F" and e.pid == cut_pid and (e.job_id, e.attempt) in set(taken)
    ]
    assert finished_while_cut, "the cut-off node finished none of its jobs: nothing was tested"
    for e in finished_while_cut:
        job = by_id[e.job_id]
        assert not (job.state == "completed" and job.attempt == e.attempt), (
            f"job {e.job_id} kept the result of rescued attempt {e.attempt} from the cut-off node"
        )

    # It stepped down before the other node took the lease over.
    logs = cluster.logs()
    stepped_down = log_time(logs[isolated_name], rf"node {isolated_name} stops acting as leader")
    took_over = log_time(logs[other_name], rf"node {other_name} is now the cluster's leader")
    assert stepped_down < took_over, "two nodes acted as leader at once"
