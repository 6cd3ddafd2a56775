"""Process faults: three node processes run a batch of jobs while a driver SIGKILLs or SIGTERMs
a random node every few seconds and starts a fresh one. Afterwards the database and the
independent ledger must agree that nothing was lost, doubled or run past its attempts.

Both engines: on SQLite the three processes share one database file. Default: a CI-sized run
(KOBAN_CHAOS_JOBS; by default 8,000 jobs on PostgreSQL and 4,000 on SQLite, of 0-100 ms each).
KOBAN_SOAK=1 runs the full 20,000 jobs of 0-200 ms on each.
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import koban
from helpers import sql_rows

from .driver import ChaosCluster
from .invariants import check, read_jobs, rescues, summarise
from .ledger import read_ledger

SOAK = os.environ.get("KOBAN_SOAK") == "1"
#: Jobs per run: SQLite's single writer makes its CI run smaller, not its soak.
JOBS = {
    "postgres": int(os.environ.get("KOBAN_CHAOS_JOBS", "20000" if SOAK else "8000")),
    "sqlite": int(os.environ.get("KOBAN_CHAOS_JOBS", "20000" if SOAK else "4000")),
}
MAX_MS = 200 if SOAK else 100
WORKERS = ("chaos.chaos_app.chaos_async", "chaos.chaos_app.chaos_sync")
#: Bounds a broken run; a healthy CI-sized run takes a fraction of it.
DEADLINE = 1800.0 if SOAK else 150.0
#: Share of strikes that are SIGKILL rather than SIGTERM.
KILL_SHARE = float(os.environ.get("KOBAN_CHAOS_KILL_SHARE", "0.5"))


@pytest.fixture
def cluster(db_url: str, tmp_path: Path) -> Iterator[ChaosCluster]:
    nodes = ChaosCluster(db_url, tmp_path, size=3, env={"KOBAN_CHAOS_MAX_MS": str(MAX_MS)})
    try:
        yield nodes
    finally:
        nodes.kill_all()


def enqueue_batch(url: str, count: int) -> None:
    app = koban.Koban(url)
    try:
        for offset in range(0, count, 1000):
            app.enqueue_many(
                koban.Job(worker=WORKERS[i % 2], queue="chaos", max_attempts=5, args={"n": i})
                for i in range(offset, min(count, offset + 1000))
            )
    finally:
        app.engine.close_sync()


def unfinished(url: str) -> int:
    query = (
        "SELECT count(*) FROM koban_jobs WHERE state NOT IN ('completed', 'discarded', 'cancelled')"
    )
    return int(sql_rows(url, query)[0][0])


@pytest.mark.timeout(DEADLINE + 120)
def test_nodes_killed_at_random_lose_and_double_nothing(cluster: ChaosCluster, db_url: str) -> None:
    rng = random.Random(int(os.environ.get("KOBAN_CHAOS_SEED", str(time.time_ns()))))
    count = JOBS["sqlite" if db_url.startswith("sqlite") else "postgres"]
    enqueue_batch(db_url, count)
    cluster.start()
    deadline = time.monotonic() + DEADLINE
    strikes = 0
    while True:
        # Let the cluster work for a few seconds, watching for the end of the batch.
        pause_until = time.monotonic() + rng.uniform(1.0, 3.0)
        while unfinished(db_url) and time.monotonic() < pause_until:
            time.sleep(0.1)
        if not unfinished(db_url):
            break
        assert time.monotonic() < deadline, (
            f"{unfinished(db_url)} of {count} jobs still unfinished after {DEADLINE} s "
            f"and {strikes} strikes"
        )
        cluster.strike(rng, KILL_SHARE)
        strikes += 1
    cluster.stop()

    jobs = read_jobs(db_url)
    events = read_ledger(cluster.ledger_dir)
    print(summarise(jobs, events, cluster.exits))
    assert not cluster.crashes, "\n\n".join(cluster.crashes)
    assert strikes >= 3, "the run ended before the chaos began; raise KOBAN_CHAOS_JOBS"
    assert rescues(jobs) >= 1, "no node was killed while running jobs: nothing was rescued"
    problems = check(jobs, events, cluster.exits, expected_jobs=count)
    assert not problems, f"{len(problems)} violations, first 30:\n" + "\n".join(problems[:30])
