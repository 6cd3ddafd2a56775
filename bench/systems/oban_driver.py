"""Oban (the official Python port of Elixir's Oban) under the benchmark (its own Python 3.12+
virtualenv).

Configuration (see bench/README.md): uvloop (as `oban start` uses), one queue with `limit`
slots (default 100), a pool of 10 connections, defaults otherwise. Bulk enqueue is
`enqueue_many` inside one transaction.
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
import psycopg
import uvloop
from oban import Oban, worker
from oban.schema import install_sql

_on_start: Callable[[dict[str, Any]], None] = lambda _args: None  # noqa: E731


@worker(queue="default", max_attempts=3)
class Noop:
    async def process(self, job: Any) -> None:
        _on_start(job.args)


class ObanSystem:
    name = "oban"

    def __init__(self, ns: argparse.Namespace) -> None:
        opts = common.options(ns)
        self.dsn = ns.dsn
        self.limit = int(opts.get("limit", "100"))
        self._unfinished = common.CountPoll(
            self.dsn,
            "SELECT count(*) FROM oban_jobs WHERE state IN "
            "('available', 'scheduled', 'executing', 'retryable')",
        )
        self._pool: Any = None
        self._client: Oban | None = None

    async def _oban_client(self) -> Oban:
        if self._client is None:
            self._pool = await Oban.create_pool(self.dsn, max_size=10)
            self._client = Oban(pool=self._pool)
        return self._client

    async def reset(self) -> None:
        async with await psycopg.AsyncConnection.connect(self.dsn, autocommit=True) as conn:
            row = await (await conn.execute("SELECT to_regclass('oban_jobs')")).fetchone()
            if row is None or row[0] is None:
                await conn.execute(install_sql())  # type: ignore[arg-type]
            await conn.execute("TRUNCATE oban_jobs, oban_producers, oban_leaders")

    async def enqueue_bulk(self, count: int, batch: int) -> None:
        oban = await self._oban_client()
        for start in range(0, count, batch):
            jobs = [Noop.new({"i": i}) for i in range(start, min(count, start + batch))]
            async with self._pool.connection() as conn, conn.transaction():
                await oban.enqueue_many(jobs, conn=conn)

    async def analyze(self) -> None:
        async with await psycopg.AsyncConnection.connect(self.dsn, autocommit=True) as conn:
            await conn.execute("ANALYZE oban_jobs")

    async def insert_one(self, args: dict[str, Any]) -> None:
        oban = await self._oban_client()
        await oban.enqueue(Noop.new(args))

    async def unfinished(self) -> int:
        return await self._unfinished()

    async def run_node(
        self, on_start: Callable[[dict[str, Any]], None], stop: asyncio.Event
    ) -> None:
        global _on_start
        _on_start = on_start
        pool = await Oban.create_pool(self.dsn, max_size=10)
        try:
            async with Oban(pool=pool, name="bench-node", queues={"default": self.limit}):
                await stop.wait()
        finally:
            await pool.close()

    async def close(self) -> None:
        await self._unfinished.close()
        if self._pool is not None:
            await self._pool.close()


def make(ns: argparse.Namespace) -> ObanSystem:
    return ObanSystem(ns)


make.system_name = "oban"  # type: ignore[attr-defined]

if __name__ == "__main__":
    common.run(make, loop_runner=uvloop.run)
