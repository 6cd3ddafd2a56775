"""koban under the benchmark, on PostgreSQL or SQLite (the URL decides).

Options (--option KEY=VALUE): slots (the queue's slots, default 100), sync=1 (a sync worker,
run in the thread pool, instead of an async one).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import asyncio

import common
import psycopg

import koban

UNFINISHED = ("available", "scheduled", "executing", "retryable")
_on_start: Callable[[dict[str, Any]], None] = lambda _args: None  # noqa: E731


class KobanSystem:
    name = "koban"

    def __init__(self, ns: argparse.Namespace) -> None:
        opts = common.options(ns)
        self.dsn = ns.dsn
        self.slots = int(opts.get("slots", "100"))
        self.sync = opts.get("sync", "0") == "1"
        self.history = int(opts.get("history", "0"))
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
            async with await psycopg.AsyncConnection.connect(self.dsn, autocommit=True) as conn:
                cur = await conn.execute(
                    "SELECT count(*) FROM koban_jobs WHERE state = ANY(%s)", (list(UNFINISHED),)
                )
                row = await cur.fetchone()
                return int(row[0]) if row else 0
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
        await self.app.close()


def make(ns: argparse.Namespace) -> KobanSystem:
    return KobanSystem(ns)


make.system_name = "koban"  # type: ignore[attr-defined]

if __name__ == "__main__":
    common.run(make)
