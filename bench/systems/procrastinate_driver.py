"""procrastinate under the benchmark (its own virtualenv).

Configuration (see bench/README.md): an async task, one worker with `concurrency` jobs at a
time (default 50), LISTEN/NOTIFY on, successful jobs kept (its default, like koban's).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Callable
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common
import procrastinate
import psycopg

_on_start: Callable[[dict[str, Any]], None] = lambda _args: None  # noqa: E731


class ProcrastinateSystem:
    name = "procrastinate"

    def __init__(self, ns: argparse.Namespace) -> None:
        opts = common.options(ns)
        self.dsn = ns.dsn
        self.concurrency = int(opts.get("concurrency", "50"))
        self._unfinished = common.CountPoll(
            self.dsn, "SELECT count(*) FROM procrastinate_jobs WHERE status IN ('todo', 'doing')"
        )
        self.app = procrastinate.App(
            connector=procrastinate.PsycopgConnector(
                conninfo=self.dsn, min_size=2, max_size=self.concurrency + 4
            )
        )

        @self.app.task(name="noop", queue="default")
        async def noop(**kwargs: Any) -> None:
            _on_start(kwargs)

        self.noop = noop
        self._opened = False

    async def _open(self) -> None:
        if not self._opened:
            await self.app.open_async()
            self._opened = True

    async def reset(self) -> None:
        async with await psycopg.AsyncConnection.connect(self.dsn, autocommit=True) as conn:
            row = await (await conn.execute("SELECT to_regclass('procrastinate_jobs')")).fetchone()
            installed = row is not None and row[0] is not None
        await self._open()
        if not installed:
            await self.app.schema_manager.apply_schema_async()
        async with await psycopg.AsyncConnection.connect(self.dsn, autocommit=True) as conn:
            await conn.execute(
                "TRUNCATE procrastinate_jobs, procrastinate_events, procrastinate_periodic_defers,"
                " procrastinate_workers CASCADE"
            )

    async def enqueue_bulk(self, count: int, batch: int) -> None:
        await self._open()
        for start in range(0, count, batch):
            await self.noop.batch_defer_async(
                *({"i": i} for i in range(start, min(count, start + batch)))
            )

    async def analyze(self) -> None:
        async with await psycopg.AsyncConnection.connect(self.dsn, autocommit=True) as conn:
            await conn.execute("ANALYZE procrastinate_jobs")

    async def insert_one(self, args: dict[str, Any]) -> None:
        await self._open()
        await self.noop.defer_async(**args)

    async def unfinished(self) -> int:
        return await self._unfinished()

    async def run_node(
        self, on_start: Callable[[dict[str, Any]], None], stop: asyncio.Event
    ) -> None:
        global _on_start
        _on_start = on_start
        await self._open()
        worker = asyncio.create_task(
            self.app.run_worker_async(
                queues=["default"],
                concurrency=self.concurrency,
                wait=True,
                listen_notify=True,
                install_signal_handlers=False,
                shutdown_graceful_timeout=5.0,
            )
        )
        await asyncio.wait(
            {worker, asyncio.create_task(stop.wait())}, return_when=asyncio.FIRST_COMPLETED
        )
        if worker.done():
            worker.result()
        worker.cancel()
        await asyncio.gather(worker, return_exceptions=True)

    async def close(self) -> None:
        await self._unfinished.close()
        if self._opened:
            await self.app.close_async()


def make(ns: argparse.Namespace) -> ProcrastinateSystem:
    return ProcrastinateSystem(ns)


make.system_name = "procrastinate"  # type: ignore[attr-defined]

if __name__ == "__main__":
    common.run(make)
