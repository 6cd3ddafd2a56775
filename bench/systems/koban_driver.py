"""koban under the benchmark, on PostgreSQL or SQLite (the URL decides).

Options (--option KEY=VALUE): slots (the queue's slots, default 100), sync=1 (a sync worker,
run in the thread pool, instead of an async one).

A workload of koban's own, `cpu`: --jobs CPU-bound jobs (default 200), each the same ~20 ms of
pure Python (`burn_cpu`), burned down once by sync workers in the thread pool and once by
executor="process" workers in a pool of `processes` worker processes (option, default one per
CPU); the queue gets `cpu_slots` slots in both runs (option, default twice `processes`). Prints
jobs/s for each and their ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import asyncio

import common
import psycopg

import koban

UNFINISHED = ("available", "scheduled", "executing", "retryable")
#: Loop count of one `cpu` job: about 20 ms of pure Python on the 2-core benchmark machine.
CPU_LOOPS = 400_000
_on_start: Callable[[dict[str, Any]], None] = lambda _args: None  # noqa: E731


class KobanSystem:
    name = "koban"

    def __init__(self, ns: argparse.Namespace) -> None:
        opts = common.options(ns)
        self.dsn = ns.dsn
        self.slots = int(opts.get("slots", "100"))
        self.sync = opts.get("sync", "0") == "1"
        self.history = int(opts.get("history", "0"))
        # Two counts, each matching an index's predicate: the listing indexes leave executing
        # jobs out (migration 4) and koban_jobs_executing_idx holds them.
        self._unfinished = common.CountPoll(
            self.dsn,
            "SELECT (SELECT count(*) FROM koban_jobs WHERE state IN "
            "('available', 'scheduled', 'retryable')) + (SELECT count(*) FROM koban_jobs "
            "WHERE state = 'executing')",
        )
        self.app = koban.Koban(self.dsn, queues={"default": self.slots}, shutdown_grace=5.0)
        if self.sync:

            def noop(job: koban.Job) -> None:
                _on_start(job.args)

        else:

            async def noop(job: koban.Job) -> None:  # type: ignore[misc]
                _on_start(job.args)

        noop.__qualname__ = "noop_sync" if self.sync else "noop"
        self.worker = self.app.worker(queue="default", max_attempts=3)(noop)

    async def reset(self) -> None:
        if self.dsn.startswith("sqlite"):
            await asyncio.to_thread(self._reset_sqlite)
            return
        await asyncio.to_thread(self.app.migrate)
        async with await psycopg.AsyncConnection.connect(self.dsn, autocommit=True) as conn:
            await conn.execute("TRUNCATE koban_jobs, koban_nodes, koban_leader, koban_queues")
            if self.history:
                # Finished jobs kept as history, vacuumed and analyzed as autovacuum would
                # have done by the time a table grew this large.
                await conn.execute(
                    "INSERT INTO koban_jobs (state, worker, args, attempt, inserted_at, "
                    "scheduled_at, attempted_at, completed_at) SELECT 'completed', "
                    "'bench.history', jsonb_build_object('i', g), 1, t, t, t, t "
                    "FROM generate_series(1, %s) AS g, (SELECT now() - interval '1 hour') AS x(t)",
                    (self.history,),
                )
                await conn.execute("VACUUM ANALYZE koban_jobs")

    def _reset_sqlite(self) -> None:
        path = Path(self.dsn.split("sqlite:///", 1)[1])
        for suffix in ("", "-wal", "-shm"):
            Path(str(path) + suffix).unlink(missing_ok=True)
        self.app.migrate()

    async def enqueue_bulk(self, count: int, batch: int) -> None:
        for start in range(0, count, batch):
            jobs = [self.worker.new({"i": i}) for i in range(start, min(count, start + batch))]
            await self.app.aenqueue_many(jobs)

    async def analyze(self) -> None:
        if self.dsn.startswith("sqlite"):
            return
        async with await psycopg.AsyncConnection.connect(self.dsn, autocommit=True) as conn:
            await conn.execute("ANALYZE koban_jobs")

    async def insert_one(self, args: dict[str, Any]) -> None:
        await self.worker.aenqueue(args)

    async def unfinished(self) -> int:
        if not self.dsn.startswith("sqlite"):
            return await self._unfinished()
        await self.app.open()
        counts = await self.app.engine.count_by_queue_and_state()
        return sum(
            n for by_state in counts.values() for s, n in by_state.items() if s in UNFINISHED
        )

    async def run_node(
        self, on_start: Callable[[dict[str, Any]], None], stop: asyncio.Event
    ) -> None:
        global _on_start
        _on_start = on_start
        await self.app.start()
        try:
            await stop.wait()
        finally:
            await self.app.stop()

    async def close(self) -> None:
        await self._unfinished.close()
        await self.app.close()


def make(ns: argparse.Namespace) -> KobanSystem:
    return KobanSystem(ns)


make.system_name = "koban"  # type: ignore[attr-defined]


# ----- the `cpu` workload ---------------------------------------------------------------------
def burn_cpu() -> int:
    """The same fixed amount of pure-Python work for every `cpu` job (it holds the GIL)."""
    total = 0
    for i in range(CPU_LOOPS):
        total += i * i % 7
    return total


# Module level, so worker processes import them (as this script, by path).
def cpu_in_thread(job: koban.Job) -> None:
    burn_cpu()


def cpu_in_process(job: koban.Job) -> None:
    burn_cpu()


async def cpu_burndown(
    ns: argparse.Namespace, executor: str, processes: int, slots: int
) -> dict[str, Any]:
    """Enqueue --jobs CPU-bound jobs (untimed), then time one node from its start (worker
    processes included) until every job's outcome is recorded."""
    system = KobanSystem(ns)
    try:
        await system.reset()
    finally:
        await system.close()
    fn = cpu_in_process if executor == "process" else cpu_in_thread
    app = koban.Koban(ns.dsn, queues={"default": slots}, processes=processes, shutdown_grace=5.0)
    worker = app.worker(fn, executor=executor, max_attempts=1)
    try:
        for start in range(0, ns.jobs, 5000):
            await app.aenqueue_many(worker.new() for _ in range(start, min(ns.jobs, start + 5000)))

        async def counts() -> dict[str, int]:
            by_state: dict[str, int] = {}
            for states in (await app.engine.count_by_queue_and_state()).values():
                for state, n in states.items():
                    by_state[state] = by_state.get(state, 0) + n
            return by_state

        async def finished() -> bool:
            return not any(n for s, n in (await counts()).items() if s in UNFINISHED)

        t0 = time.perf_counter()
        await app.start()
        try:
            if not await common.wait_until(finished, ns.timeout):
                raise TimeoutError(f"cpu ({executor}): jobs unfinished after {ns.timeout} s")
            seconds = time.perf_counter() - t0
        finally:
            await app.stop()
        completed = (await counts()).get("completed", 0)
    finally:
        await app.close()
    return {
        "seconds": seconds,
        "jobs_per_s": ns.jobs / seconds,
        "completed": completed,
    }


async def cpu(ns: argparse.Namespace) -> dict[str, Any]:
    opts = common.options(ns)
    processes = int(opts.get("processes", str(os.cpu_count() or 1)))
    slots = int(opts.get("cpu_slots", str(2 * processes)))
    t = time.perf_counter()
    burn_cpu()
    job_ms = (time.perf_counter() - t) * 1000
    thread = await cpu_burndown(ns, "thread", processes, slots)
    process = await cpu_burndown(ns, "process", processes, slots)
    return {
        "jobs": ns.jobs,
        "processes": processes,
        "slots": slots,
        "loops": CPU_LOOPS,
        "job_ms": job_ms,
        "thread": thread,
        "process": process,
        "thread_jobs_per_s": thread["jobs_per_s"],
        "process_jobs_per_s": process["jobs_per_s"],
        "process_vs_thread": process["jobs_per_s"] / thread["jobs_per_s"],
    }


def main_cpu() -> None:
    p = argparse.ArgumentParser(prog="koban_driver.py cpu")
    p.add_argument("workload", choices=["cpu"])
    p.add_argument("--dsn", required=True)
    p.add_argument("--jobs", type=int, default=200)
    p.add_argument("--timeout", type=float, default=600.0)
    p.add_argument("--option", action="append", default=[], help="KEY=VALUE")
    result = asyncio.run(cpu(p.parse_args()))
    result["system"] = "koban"
    result["python"] = sys.version.split()[0]
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    if sys.argv[1:2] == ["cpu"]:
        main_cpu()
    else:
        common.run(make)
