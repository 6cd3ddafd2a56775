"""The app every chaos node runs (`koban start --app chaos.chaos_app:app`), set by environment:

- KOBAN_DATABASE_URL          the database
- KOBAN_CHAOS_LEDGER          directory for the per-process ledger files (see ledger.py)
- KOBAN_CHAOS_MAX_MS          longest job duration in milliseconds (default 200)
- KOBAN_CHAOS_FAIL_RATE       chance that an attempt raises (default 0.1)
- KOBAN_CHAOS_SLOTS           slots of the `chaos` queue (default 10)
- KOBAN_CHAOS_GRACE           shutdown grace in seconds (default 3)
- KOBAN_CHAOS_HEARTBEAT       seconds between node heartbeats (default 0.5)
- KOBAN_CHAOS_RESCUE_AFTER    seconds without a heartbeat before a node's jobs are rescued (3)
- KOBAN_CHAOS_LEASE           leadership lease in seconds (default 3)
- KOBAN_CHAOS_PRUNE_AFTER     if set, prune finished jobs older than this many seconds

Durations and failures are drawn from a generator seeded by (job id, attempt), so a run can be
replayed when an invariant breaks.
"""

from __future__ import annotations

import asyncio
import os
import random
import time

import koban
import koban.plugins.base

from .ledger import LedgerWriter

MAX_MS = float(os.environ.get("KOBAN_CHAOS_MAX_MS", "200"))
FAIL_RATE = float(os.environ.get("KOBAN_CHAOS_FAIL_RATE", "0.1"))
MAX_ATTEMPTS = 5


def cluster_plugins() -> list[koban.plugins.base.Plugin]:
    """Short heartbeat, lease and rescue windows, so a killed node's jobs return in seconds."""
    heartbeat = float(os.environ.get("KOBAN_CHAOS_HEARTBEAT", "0.5"))
    rescue_after = float(os.environ.get("KOBAN_CHAOS_RESCUE_AFTER", "3"))
    plugins: list[koban.plugins.base.Plugin] = [
        koban.Heartbeat(interval=heartbeat),
        koban.Leadership(lease=float(os.environ.get("KOBAN_CHAOS_LEASE", "3"))),
        koban.Lifeline(rescue_after=rescue_after, interval=heartbeat),
    ]
    prune_after = os.environ.get("KOBAN_CHAOS_PRUNE_AFTER")
    if prune_after:
        plugins.append(koban.Pruner(max_age=float(prune_after), interval=1.0))
    return plugins


app = koban.Koban(
    os.environ["KOBAN_DATABASE_URL"],
    queues={"chaos": int(os.environ.get("KOBAN_CHAOS_SLOTS", "10"))},
    shutdown_grace=float(os.environ.get("KOBAN_CHAOS_GRACE", "3")),
    plugins=cluster_plugins(),
)

_ledger: LedgerWriter | None = None


def ledger() -> LedgerWriter:
    global _ledger
    if _ledger is None:
        _ledger = LedgerWriter(os.environ["KOBAN_CHAOS_LEDGER"])
    return _ledger


class ChaosFailure(Exception):
    """The planned failure of one attempt."""


def plan(job: koban.Job) -> tuple[float, bool]:
    """(seconds to run, whether to fail) for this attempt, the same on every replay."""
    rng = random.Random(f"{job.id}:{job.attempt}")
    return rng.uniform(0, MAX_MS) / 1000, rng.random() < FAIL_RATE


def _node(job: koban.Job) -> str:
    return (job.attempted_by or ["?"])[0]


def _finish(job: koban.Job, fail: bool) -> None:
    assert job.id is not None
    ledger().write("F", job.id, job.attempt, _node(job), "fail" if fail else "ok")
    if fail:
        raise ChaosFailure(f"planned failure of job {job.id} attempt {job.attempt}")


def short_backoff(job: koban.Job) -> float:
    return 0.2


@app.worker(queue="chaos", max_attempts=MAX_ATTEMPTS, backoff=short_backoff)
async def chaos_async(job: koban.Job) -> None:
    """Sleeps on the event loop; fails when planned."""
    assert job.id is not None
    seconds, fail = plan(job)
    ledger().write("S", job.id, job.attempt, _node(job))
    await asyncio.sleep(seconds)
    _finish(job, fail)


@app.worker(queue="chaos", max_attempts=MAX_ATTEMPTS, backoff=short_backoff)
def chaos_sync(job: koban.Job) -> None:
    """Sleeps in a worker thread; fails when planned."""
    assert job.id is not None
    seconds, fail = plan(job)
    ledger().write("S", job.id, job.attempt, _node(job))
    time.sleep(seconds)
    _finish(job, fail)
