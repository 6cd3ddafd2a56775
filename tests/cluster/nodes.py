"""The app the multi-process cluster tests run as `koban start --app cluster.nodes:app`.

Configured through the environment (tests.helpers.subprocess_env sets the database):

- KOBAN_TEST_LEDGER: a file every worker appends one line per event to
- KOBAN_TEST_RELEASE: `block` jobs run until this file exists
- KOBAN_TEST_SCALE, KOBAN_TEST_BASE: time runs SCALE times faster than the wall clock from the
  epoch second BASE, the same in every process (1: the real clock)
- KOBAN_TEST_LEASE, KOBAN_TEST_RESCUE_AFTER: in the clock's seconds
- KOBAN_TEST_CRON: a cron expression for the `tick` worker (catch_up="all")

Worker names are `cluster.nodes.<function>`; tests enqueue them by name.
"""

from __future__ import annotations

import asyncio
import os
import time
from datetime import UTC, datetime

import koban

SCALE = float(os.environ.get("KOBAN_TEST_SCALE", "1"))
BASE = float(os.environ.get("KOBAN_TEST_BASE", "0") or 0)


class ScaledClock(koban.Clock):
    """Time running SCALE times faster than the wall clock, agreed on by every process."""

    def now(self) -> datetime:
        return datetime.fromtimestamp(BASE + (time.time() - BASE) * SCALE, UTC)

    @property
    def frozen(self) -> bool:
        # Every time koban stores comes from this clock, as with a test's FrozenClock.
        return True


def setting(name: str, default: float) -> float:
    return float(os.environ.get(f"KOBAN_TEST_{name}", default))


cron = []
if os.environ.get("KOBAN_TEST_CRON"):
    cron.append(
        koban.Cron(os.environ["KOBAN_TEST_CRON"], "cluster.nodes.tick", catch_up="all", name="tick")
    )

app = koban.Koban(
    os.environ["KOBAN_DATABASE_URL"],
    queues={"work": 2, "cron": 1},
    clock=ScaledClock() if SCALE != 1 else None,
    shutdown_grace=2.0,
    cron=cron,
    plugins=[
        koban.Heartbeat(interval=0.2),
        koban.Leadership(lease=setting("LEASE", 1.5), renew_every=0.3),
        koban.Lifeline(rescue_after=setting("RESCUE_AFTER", 1.5), interval=0.2),
        koban.Scheduler(interval=0.2),
    ],
)


def record(line: str) -> None:
    """Append one line to the ledger; O_APPEND keeps lines of many processes whole."""
    fd = os.open(os.environ["KOBAN_TEST_LEDGER"], os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    try:
        os.write(fd, f"{line}\n".encode())
    finally:
        os.close(fd)


def where(job: koban.Job) -> str:
    return job.attempted_by[0] if job.attempted_by else "?"


@app.worker(queue="work", max_attempts=3)
def block(job: koban.Job) -> None:
    """Run (in a worker thread) until the release file exists."""
    record(f"start {job.id} {where(job)} {job.attempt}")
    while not os.path.exists(os.environ["KOBAN_TEST_RELEASE"]):
        time.sleep(0.05)
    record(f"done {job.id} {where(job)} {job.attempt}")


@app.worker(queue="work")
async def note(job: koban.Job) -> None:
    record(f"note {job.id} {where(job)}")


@app.worker(queue="cron")
async def tick(job: koban.Job) -> None:
    record(f"tick {job.meta['cron_tick']}")


@app.worker(queue="work")
async def waits(job: koban.Job) -> None:
    try:
        await asyncio.sleep(3600)
    except asyncio.CancelledError:
        record(f"cancelled {job.id} {where(job)}")
        raise


@app.worker(queue="work")
def waits_sync(job: koban.Job) -> None:
    deadline = time.monotonic() + 60
    while not job.cancelled and time.monotonic() < deadline:
        time.sleep(0.01)
    record(f"stopped {job.id} {where(job)} {job.cancelled}")
