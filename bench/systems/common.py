"""What every system driver shares: the command line, the workloads' timing, the result line.

A driver is a script run with its system's own interpreter (each peer lives in its own
virtualenv), so this module uses the standard library only (`CountPoll` imports psycopg when
first used) and works on Python 3.11+.

Protocol: `python <driver>.py WORKLOAD --dsn DSN [options]` prints, as its last line of
output, one JSON object with the measurements. Workloads:

- ``burndown``  enqueue --jobs no-op jobs in bulk (untimed), then time one node until every
                job's outcome is recorded in the database.
- ``latency``   start one node, let a second process insert jobs one at a time at --rate per
                second for --seconds, report insert-to-start latency percentiles.
- ``enqueue``   time --jobs inserts, one per call (``--mode single``) or in batches of
                --batch (``--mode bulk``).
- ``send``      internal: the inserting process of ``latency``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Protocol


class System(Protocol):
    """One job system under test. Every method may assume `reset` ran first."""

    name: str

    async def reset(self) -> None:
        """Create the schema if missing and delete every job."""

    async def enqueue_bulk(self, count: int, batch: int) -> None:
        """Insert `count` no-op jobs using the system's bulk API, `batch` per call."""

    async def insert_one(self, args: dict[str, Any]) -> None:
        """Insert one job with `args` through the system's single-insert client API."""

    async def unfinished(self) -> int:
        """How many jobs are not yet recorded as finished in the database."""

    async def run_node(
        self, on_start: Callable[[dict[str, Any]], None], stop: asyncio.Event
    ) -> None:
        """Run one node until `stop` is set; call `on_start(args)` as each job starts."""


class CountPoll:
    """A count the harness polls while a run drains, on one connection kept open between polls
    (a new connection per poll would add its set-up to the end of every timed run). For the
    drivers whose environment has psycopg; it is imported on first use."""

    def __init__(self, dsn: str, sql: str) -> None:
        self.dsn = dsn
        self.sql = sql
        self._conn: Any = None

    async def __call__(self) -> int:
        if self._conn is None:
            import psycopg

            self._conn = await psycopg.AsyncConnection.connect(self.dsn, autocommit=True)
        cur = await self._conn.execute(self.sql)
        row = await cur.fetchone()
        return int(row[0]) if row else 0

    async def close(self) -> None:
        if self._conn is not None:
            await self._conn.close()
            self._conn = None


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100) by linear interpolation; NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


async def wait_until(
    predicate: Callable[[], Awaitable[bool]], timeout: float, every: float = 0.02
) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await predicate():
            return True
        await asyncio.sleep(every)
    return False


async def burndown(system: System, jobs: int, batch: int, timeout: float) -> dict[str, Any]:
    """Bulk-enqueue `jobs`, then time one node from start until all are recorded finished."""
    await system.reset()
    await system.enqueue_bulk(jobs, batch)
    # Statistics as autovacuum would have gathered them after a bulk insert: without them
    # some peers' fetch plans crawl (procrastinate: 35 instead of ~1,000 jobs/s at 50,000).
    analyze = getattr(system, "analyze", None)
    if analyze is not None:
        await analyze()
    started = 0
    all_started = asyncio.Event()

    def on_start(_args: dict[str, Any]) -> None:
        nonlocal started
        started += 1
        if started >= jobs:
            all_started.set()

    stop = asyncio.Event()
    t0 = time.perf_counter()
    node = asyncio.create_task(system.run_node(on_start, stop))
    samples: list[tuple[float, int, float]] = []

    async def sample_memory() -> None:
        while True:
            samples.append((round(time.perf_counter() - t0, 2), started, rss_mb()))
            await asyncio.sleep(1.0)

    sampler = asyncio.create_task(sample_memory())
    try:
        try:
            await asyncio.wait_for(_first(all_started.wait(), node), timeout)
        except TimeoutError:
            # Too slow to finish within the cap: report the rate reached so far, marked.
            elapsed = time.perf_counter() - t0
            return {
                "jobs": jobs,
                "timed_out": True,
                "started": started,
                "seconds": elapsed,
                "jobs_per_s": started / elapsed,
                "rss_mb": samples,
            }
        t_started = time.perf_counter()

        async def drained() -> bool:
            return await system.unfinished() == 0

        if not await wait_until(drained, timeout):
            raise TimeoutError(f"{system.name}: jobs still unfinished after {timeout} s")
        t1 = time.perf_counter()
    finally:
        sampler.cancel()
        stop.set()
        await _finish(node)
    seconds = t1 - t0
    return {
        "jobs": jobs,
        "timed_out": False,
        "seconds": seconds,
        "jobs_per_s": jobs / seconds,
        "last_start_s": t_started - t0,
        "rss_mb": samples,
    }


def rss_mb() -> float:
    """This process's resident memory in MiB (Linux), or NaN where /proc is missing."""
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
        return round(pages * os.sysconf("SC_PAGE_SIZE") / 2**20, 1)
    except (OSError, ValueError, IndexError):
        return float("nan")


async def _first(wait: Awaitable[Any], node: asyncio.Task[None]) -> None:
    """Wait for `wait`, but fail fast if the node crashes first."""
    waiter = asyncio.ensure_future(wait)
    done, _ = await asyncio.wait({waiter, node}, return_when=asyncio.FIRST_COMPLETED)
    if node in done:
        waiter.cancel()
        node.result()  # raises the node's error
        raise RuntimeError("the node stopped before every job ran")


async def _finish(node: asyncio.Task[None], grace: float = 20.0) -> None:
    try:
        await asyncio.wait_for(asyncio.shield(node), grace)
    except TimeoutError:
        node.cancel()
        await asyncio.gather(node, return_exceptions=True)
    except Exception:
        pass


async def latency(
    system: System, driver: str, dsn: str, rate: float, seconds: float, timeout: float
) -> dict[str, Any]:
    """Insert-to-start latency with a sender process inserting at a fixed rate."""
    await system.reset()
    count = max(1, int(rate * seconds))
    latencies: list[float] = []
    sent_at: list[float] = []
    done = asyncio.Event()

    def on_start(args: dict[str, Any]) -> None:
        sent = args.get("t")
        if sent is None:
            return
        latencies.append(time.time() - float(sent))
        sent_at.append(float(sent))
        if len(latencies) >= count:
            done.set()

    stop = asyncio.Event()
    node = asyncio.create_task(system.run_node(on_start, stop))
    try:
        await asyncio.sleep(1.0)  # let the node connect and start listening
        sender = await asyncio.create_subprocess_exec(
            sys.executable, driver, "send", "--dsn", dsn, "--rate", str(rate),
            "--jobs", str(count),
            stdout=subprocess.PIPE,
        )  # fmt: skip
        await asyncio.wait_for(_first(done.wait(), node), seconds + timeout)
        out, _ = await sender.communicate()
        sent = json.loads(out.decode().strip().splitlines()[-1])
    finally:
        stop.set()
        await _finish(node)
    ms = [x * 1000 for x in latencies]
    first = min(sent_at)
    buckets: dict[int, list[float]] = {}
    for at, value in zip(sent_at, ms, strict=True):
        buckets.setdefault(int(at - first), []).append(value)
    timeline = [
        [sec, len(v), round(percentile(v, 50), 2), round(percentile(v, 99), 2)]
        for sec, v in sorted(buckets.items())
    ]
    return {
        "timeline": timeline,
        "sent_wall_start": first,
        "jobs": count,
        "rate": rate,
        "achieved_rate": sent["achieved_rate"],
        "p50_ms": percentile(ms, 50),
        "p95_ms": percentile(ms, 95),
        "p99_ms": percentile(ms, 99),
        "max_ms": max(ms),
    }


async def send(system: System, rate: float, count: int) -> dict[str, Any]:
    """Insert `count` jobs one at a time on a fixed schedule of `rate` per second."""
    t0 = time.perf_counter()

    for i in range(count):
        delay = t0 + i / rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        await system.insert_one({"t": time.time(), "i": i})
    elapsed = time.perf_counter() - t0
    return {"sent": count, "achieved_rate": count / elapsed if elapsed else float("inf")}


async def enqueue(system: System, jobs: int, mode: str, batch: int) -> dict[str, Any]:
    await system.reset()
    t0 = time.perf_counter()
    if mode == "bulk":
        await system.enqueue_bulk(jobs, batch)
    else:
        for i in range(jobs):
            await system.insert_one({"i": i})
    seconds = time.perf_counter() - t0
    return {"jobs": jobs, "mode": mode, "seconds": seconds, "jobs_per_s": jobs / seconds}


def parse(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    p.add_argument("workload", choices=["burndown", "latency", "enqueue", "send", "reset"])
    p.add_argument("--dsn", required=True)
    p.add_argument("--jobs", type=int, default=20_000)
    p.add_argument("--batch", type=int, default=5_000)
    p.add_argument("--mode", choices=["single", "bulk"], default="bulk")
    p.add_argument("--rate", type=float, default=100.0)
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--timeout", type=float, default=600.0)
    p.add_argument("--option", action="append", default=[], help="driver-specific KEY=VALUE")
    return p.parse_args(argv)


def options(ns: argparse.Namespace) -> dict[str, str]:
    return dict(item.split("=", 1) for item in ns.option)


def run(
    make: Callable[[argparse.Namespace], System], loop_runner: Callable[[Any], Any] | None = None
) -> None:
    """Entry point of a driver script: parse, run the workload, print the result line."""
    ns = parse()
    driver = os.path.abspath(sys.argv[0])

    async def main() -> dict[str, Any]:
        system = make(ns)
        try:
            if ns.workload == "burndown":
                return await burndown(system, ns.jobs, ns.batch, ns.timeout)
            if ns.workload == "latency":
                return await latency(system, driver, ns.dsn, ns.rate, ns.seconds, ns.timeout)
            if ns.workload == "enqueue":
                return await enqueue(system, ns.jobs, ns.mode, ns.batch)
            if ns.workload == "send":
                return await send(system, ns.rate, ns.jobs)
            await system.reset()
            return {}
        finally:
            close = getattr(system, "close", None)
            if close is not None:
                await close()

    result = (loop_runner or asyncio.run)(main())
    result["system"] = getattr(make, "system_name", "")
    result["python"] = sys.version.split()[0]
    sys.stdout.flush()
    print(json.dumps(result), flush=True)
