"""Celery with Redis under the benchmark (its own virtualenv).

Configuration (see bench/README.md): Redis broker (hiredis parser), results ignored, the
solo pool (fastest for no-op tasks here), prefetch multiplier 64, rate limits off, no gossip,
mingle or heartbeat events. Celery keeps no row per job, so completion is counted by a
`task_postrun` signal handler incrementing a Redis counter (one extra INCR per task), and
insert-to-start latency is pushed by a `task_prerun` handler.

Options (--option KEY=VALUE): pool (default solo), concurrency (for prefork and threads;
default: the number of cores). Environment: BENCH_CELERY_REDIS (default
redis://127.0.0.1:6379/9, flushed by every run), BENCH_CELERY_PREFETCH (default 64).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common
import redis
from celery import Celery
from celery.signals import task_postrun, task_prerun

HERE = os.path.dirname(os.path.abspath(__file__))
REDIS_URL = os.environ.get("BENCH_CELERY_REDIS", "redis://127.0.0.1:6379/9")
DONE_KEY = "bench:done"
LATENCY_KEY = "bench:latency"

app = Celery("bench", broker=REDIS_URL)
app.conf.update(
    task_ignore_result=True,
    worker_prefetch_multiplier=int(os.environ.get("BENCH_CELERY_PREFETCH", "64")),
    worker_disable_rate_limits=True,
    task_default_queue="default",
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
)

_redis: redis.Redis | None = None


def _r() -> redis.Redis:
    global _redis
    if _redis is None:
        _redis = redis.Redis.from_url(REDIS_URL)
    return _redis


@app.task(name="noop")
def noop(**kwargs: Any) -> None:
    return None


@task_prerun.connect
def _started(sender: Any = None, kwargs: dict[str, Any] | None = None, **_: Any) -> None:
    sent = (kwargs or {}).get("t")
    if sent is not None:
        _r().rpush(LATENCY_KEY, time.time() - float(sent))


@task_postrun.connect
def _finished(**_: Any) -> None:
    _r().incr(DONE_KEY)


class CelerySystem:
    name = "celery"

    def __init__(self, ns: argparse.Namespace) -> None:
        opts = common.options(ns)
        self.pool = opts.get("pool", "solo")
        self.concurrency = int(opts.get("concurrency", str(os.cpu_count() or 2)))
        self.enqueued = 0

    async def reset(self) -> None:
        _r().flushdb()
        self.enqueued = 0

    async def enqueue_bulk(self, count: int, batch: int) -> None:
        def send() -> None:
            with app.producer_or_acquire() as producer:
                for i in range(count):
                    noop.apply_async(kwargs={"i": i}, producer=producer)

        await asyncio.to_thread(send)
        self.enqueued += count

    async def insert_one(self, args: dict[str, Any]) -> None:
        noop.apply_async(kwargs=args)
        self.enqueued += 1

    async def unfinished(self) -> int:
        return self.enqueued - int(_r().get(DONE_KEY) or 0)

    async def run_node(
        self, on_start: Callable[[dict[str, Any]], None], stop: asyncio.Event
    ) -> None:
        worker = subprocess.Popen(  # noqa: ASYNC220 - started once, waited for off the loop
            [
                sys.executable, "-m", "celery", "-A", "celery_driver", "worker",
                "--pool", self.pool, "--concurrency", str(self.concurrency),
                "--queues", "default", "--loglevel", "WARNING",
                "--without-gossip", "--without-mingle", "--without-heartbeat",
            ],
            cwd=HERE,
        )  # fmt: skip
        seen = 0
        r = _r()
        try:
            while not stop.is_set():
                for raw in r.lpop(LATENCY_KEY, 1000) or []:
                    on_start({"t": time.time() - float(raw)})
                done = int(r.get(DONE_KEY) or 0)
                for _ in range(done - seen):
                    on_start({})
                seen = done
                if worker.poll() is not None:
                    raise RuntimeError(f"celery worker exited with {worker.returncode}")
                try:
                    await asyncio.wait_for(stop.wait(), 0.005)
                except TimeoutError:
                    pass
        finally:
            worker.send_signal(signal.SIGTERM)
            try:
                await asyncio.to_thread(worker.wait, 20)
            except subprocess.TimeoutExpired:
                worker.kill()


def make(ns: argparse.Namespace) -> CelerySystem:
    return CelerySystem(ns)


make.system_name = "celery"  # type: ignore[attr-defined]

if __name__ == "__main__":
    common.run(make)
