"""Soak: three nodes take a steady stream of jobs for a long time with pruning on. The jobs
table and every node's memory must level off rather than grow with the number of jobs run.

KOBAN_SOAK=1 runs 30 minutes; CI=true runs 2 minutes; KOBAN_SOAK_SECONDS sets any length.
Without one of them the test is skipped: it is too long for the default local run.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest

import koban
from helpers import sql_rows, wait_until

from .driver import ChaosCluster
from .ledger import read_ledger

if os.environ.get("KOBAN_SOAK_SECONDS"):
    SECONDS = float(os.environ["KOBAN_SOAK_SECONDS"])
elif os.environ.get("KOBAN_SOAK") == "1":
    SECONDS = 1800.0
elif os.environ.get("CI") == "true":
    SECONDS = 120.0
else:
    SECONDS = 0.0

RATE = 100  # jobs per second
PRUNE_AFTER = 5.0  # seconds a finished job is kept
SAMPLE_EVERY = 5.0
WORKERS = ("chaos.chaos_app.chaos_async", "chaos.chaos_app.chaos_sync")


@dataclass(frozen=True, slots=True)
class Sample:
    at: float  # seconds since the stream began
    rows: int
    table_bytes: int
    rss_kib: dict[str, int]  # node name -> resident memory


pytestmark = [
    pytest.mark.skipif(
        not SECONDS, reason="a long soak: set KOBAN_SOAK=1 (30 min) or CI=true (2 min)"
    ),
    pytest.mark.timeout(SECONDS + 300),
]


@pytest.fixture
def cluster(pg_url: str, tmp_path: Path) -> Iterator[ChaosCluster]:
    nodes = ChaosCluster(
        pg_url,
        tmp_path,
        size=3,
        env={"KOBAN_CHAOS_MAX_MS": "200", "KOBAN_CHAOS_PRUNE_AFTER": str(PRUNE_AFTER)},
    )
    try:
        yield nodes
    finally:
        nodes.kill_all()


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError(f"no VmRSS for process {pid}")


def sample(url: str, cluster: ChaosCluster, began: float) -> Sample:
    rows, size = sql_rows(
        url, "SELECT count(*), pg_total_relation_size('koban_jobs') FROM koban_jobs"
    )[0]
    memory = {cluster.names[slot]: rss_kib(node.pid) for slot, node in cluster.nodes.items()}
    return Sample(time.monotonic() - began, int(rows), int(size), memory)


def test_table_and_memory_stay_bounded_under_a_steady_stream(
    cluster: ChaosCluster, pg_url: str
) -> None:
    # koban leaves dead rows to autovacuum (the jobs table carries settings for it). A server
    # run with autovacuum off, as this CI image's is, gets the same VACUUM from the test.
    autovacuum = sql_rows(pg_url, "SHOW autovacuum")[0][0] == "on"
    print(f"autovacuum is {'on' if autovacuum else 'off: the test vacuums every 10 s'}")
    cluster.start()
    app = koban.Koban(pg_url)
    samples: list[Sample] = []
    inserted = 0
    # Batches whose insert failed with a broken connection: committed or not, nobody knows.
    uncertain = 0
    began = time.monotonic()
    next_sample = began + SAMPLE_EVERY
    next_vacuum = began + 10.0
    try:
        # A steady stream: a batch every 100 ms, paced against the clock so it never drifts.
        tick = 0
        while time.monotonic() - began < SECONDS:
            tick += 1
            try:
                app.enqueue_many(
                    koban.Job(worker=WORKERS[i % 2], queue="chaos", max_attempts=3)
                    for i in range(RATE // 10)
                )
                inserted += RATE // 10
            except (psycopg.OperationalError, koban.DatabaseError) as exc:
                # The shared server may drop connections (another suite's test, a restart):
                # a producer retries on the next tick, as an application would.
                print(f"enqueue failed at {time.monotonic() - began:.1f} s: {exc}")
                uncertain += RATE // 10
            if time.monotonic() >= next_sample:
                samples.append(sample(pg_url, cluster, began))
                next_sample += SAMPLE_EVERY
            if not autovacuum and time.monotonic() >= next_vacuum:
                sql_rows(pg_url, "VACUUM koban_jobs")
                next_vacuum += 10.0
            time.sleep(max(0.0, began + tick * 0.1 - time.monotonic()))
    finally:
        app.engine.close_sync()
    unfinished = "SELECT count(*) FROM koban_jobs WHERE state NOT IN ('completed', 'discarded')"
    wait_until(lambda: sql_rows(pg_url, unfinished)[0][0] == 0, timeout=60, what="the backlog")
    cluster.check_alive()
    cluster.stop()
    assert not cluster.crashes, "\n\n".join(cluster.crashes)

    for s in samples:
        print(
            f"{s.at:7.1f} s  rows={s.rows:6d}  table={s.table_bytes / 2**20:6.1f} MiB  "
            + "  ".join(f"{n}={kib / 1024:.1f}MiB" for n, kib in sorted(s.rss_kib.items()))
        )

    # Every job ran: the ledger saw each one end (the pruner has deleted most rows by now).
    ended = {e.job_id for e in read_ledger(cluster.ledger_dir) if e.kind == "F"}
    assert inserted <= len(ended) <= inserted + uncertain, (
        f"{len(ended)} jobs ran; {inserted} were inserted (and {uncertain} maybe)"
    )

    # The table holds about PRUNE_AFTER seconds of jobs, not the whole run's.
    steady = samples[len(samples) // 4 :]
    ceiling = RATE * (PRUNE_AFTER + 10)
    assert max(s.rows for s in steady) <= ceiling, (
        f"the jobs table grew to {max(s.rows for s in steady)} rows (ceiling {ceiling}) after "
        f"{inserted} inserts: pruning does not keep up"
    )
    # On disk it levels off too, once autovacuum reuses the space of pruned rows: the second
    # half of the run may not grow it by more than half of what the first half reached.
    half = samples[len(samples) // 2 :]
    first_half_peak = max(s.table_bytes for s in samples[: len(samples) // 2])
    assert max(s.table_bytes for s in half) <= 1.5 * first_half_peak + 2 * 2**20, (
        f"the table kept growing on disk: {first_half_peak} bytes by half time, "
        f"{max(s.table_bytes for s in half)} after"
    )
    # Node memory: after warming up, no node keeps growing with the jobs it has run.
    warm = samples[len(samples) // 4]
    last = samples[-1]
    for name, kib in last.rss_kib.items():
        start = warm.rss_kib.get(name)
        if start is None:
            continue
        assert kib <= 1.1 * start + 4 * 1024, (
            f"node {name} grew from {start / 1024:.1f} MiB at {warm.at:.0f} s to "
            f"{kib / 1024:.1f} MiB at {last.at:.0f} s"
        )
