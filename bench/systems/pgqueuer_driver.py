"""pgqueuer under the benchmark (its own virtualenv).

Configuration (see bench/README.md): asyncpg driver, one QueueManager with `batch_size`
(default 200) jobs fetched per dequeue and no global concurrency cap, durable (logged) tables.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Callable
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import asyncpg
import common
from pgqueuer import AsyncpgDriver, Queries, QueueManager
from pgqueuer.models import Job


class PgqueuerSystem:
    name = "pgqueuer"

    def __init__(self, ns: argparse.Namespace) -> None:
        opts = common.options(ns)
        self.dsn = ns.dsn
        self.batch_size = int(opts.get("batch_size", "200"))
        self._client: asyncpg.Connection | None = None
        self._queries: Queries | None = None

    async def _q(self) -> Queries:
        if self._queries is None:
            self._client = await asyncpg.connect(self.dsn)
            self._queries = Queries(AsyncpgDriver(self._client))
        return self._queries

    async def reset(self) -> None:
        queries = await self._q()
        if not await queries.schema_is_installed():
            await queries.install()
        assert self._client is not None
        await self._client.execute("TRUNCATE pgqueuer, pgqueuer_log, pgqueuer_statistics")

    async def enqueue_bulk(self, count: int, batch: int) -> None:
        queries = await self._q()
        for start in range(0, count, batch):
            n = min(count, start + batch) - start
            await queries.enqueue(
                ["noop"] * n,
                [json.dumps({"i": i}).encode() for i in range(start, start + n)],
                [0] * n,
            )

    async def analyze(self) -> None:
        assert self._client is not None
        await self._client.execute("ANALYZE pgqueuer")

    async def insert_one(self, args: dict[str, Any]) -> None:
        queries = await self._q()
        await queries.enqueue("noop", json.dumps(args).encode())

    async def unfinished(self) -> int:
        assert self._client is not None
        return int(await self._client.fetchval("SELECT count(*) FROM pgqueuer"))

    async def run_node(
        self, on_start: Callable[[dict[str, Any]], None], stop: asyncio.Event
    ) -> None:
        conn = await asyncpg.connect(self.dsn)
        qm = QueueManager(Queries(AsyncpgDriver(conn)))

        @qm.entrypoint("noop")
        async def noop(job: Job) -> None:
            on_start(json.loads(job.payload) if job.payload else {})

        runner = asyncio.create_task(qm.run(batch_size=self.batch_size))
        try:
            await asyncio.wait(
                {runner, asyncio.create_task(stop.wait())}, return_when=asyncio.FIRST_COMPLETED
            )
            if runner.done():
                runner.result()
        finally:
            qm.shutdown.set()
            try:
                await asyncio.wait_for(runner, 10)
            except Exception:
                runner.cancel()
            await conn.close()

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()


def make(ns: argparse.Namespace) -> PgqueuerSystem:
    return PgqueuerSystem(ns)


make.system_name = "pgqueuer"  # type: ignore[attr-defined]

if __name__ == "__main__":
    common.run(make)
