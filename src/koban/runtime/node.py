"""Node: one process's share of the cluster — a Producer per queue, the Acker, the listener and
the plugins, started together and stopped gracefully.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

from koban.clock import Clock
from koban.engines.base import INSERT_CHANNEL, SIGNAL_CHANNEL, Engine
from koban.plugins.base import Plugin
from koban.runtime.acker import Acker
from koban.runtime.executor import Executor, JobThreads
from koban.runtime.producer import Producer
from koban.telemetry import Telemetry
from koban.worker import RegisteredWorker

log = logging.getLogger("koban.node")

#: Poll interval while notifications work (a safety net only) and while they do not.
HEALTHY_POLL = 10.0


def default_node_name() -> str:
    """host.pid: unique for every process on every machine."""
    return f"{socket.gethostname()}.{os.getpid()}"


class Node:
    """Runs jobs from `queues` ({name: slots}) until stopped."""

    def __init__(
        self,
        *,
        engine: Engine,
        workers: Mapping[str, RegisteredWorker],
        queues: Mapping[str, int],
        telemetry: Telemetry,
        clock: Clock,
        plugins: Sequence[Plugin] = (),
        name: str | None = None,
        shutdown_grace: float = 15.0,
    ) -> None:
        self.engine = engine
        self.name = name or default_node_name()
        self.queues = dict(queues)
        self.telemetry = telemetry
        self.clock = clock
        self.plugins = list(plugins)
        self.shutdown_grace = shutdown_grace
        self.is_leader = False
        self._listening = False
        self._threads = JobThreads(
            max_workers=max(4, sum(self.queues.values()) + 4), thread_name_prefix="koban-job"
        )
        self.executor = Executor(workers, telemetry, clock, self._threads)
        self.acker = Acker(engine, clock)
        self.producers: dict[str, Producer] = {}
        self._tasks: list[asyncio.Task[Any]] = []
        self._producer_tasks: list[asyncio.Task[None]] = []
        self._started = False

    # ----- time -----------------------------------------------------------------------------
    def db_now(self) -> datetime | None:
        """The `now` to pass to the engine: None (database clock) unless a test froze time."""
        return self.clock.now() if self.clock.frozen else None

    def poll_interval(self) -> float:
        return HEALTHY_POLL if self._listening else self.engine.poll_interval

    # ----- lifecycle ------------------------------------------------------------------------
    async def start(self) -> None:
        if self._started:
            return
        self._started = True
        loop = asyncio.get_running_loop()
        self._tasks.append(loop.create_task(self.acker.run(), name="koban-acker"))
        self._tasks.append(
            loop.create_task(
                self.engine.listen(self._on_notification, self._on_listen_state),
                name="koban-listener",
            )
        )
        for plugin in self.plugins:
            self._tasks.append(
                loop.create_task(self._run_plugin(plugin), name=f"koban-{plugin.name}")
            )
        for queue, limit in self.queues.items():
            producer = Producer(
                queue=queue,
                limit=limit,
                node=self.name,
                engine=self.engine,
                executor=self.executor,
                acker=self.acker,
                clock=self.clock,
                poll_interval=self.poll_interval,
            )
            self.producers[queue] = producer
            self._producer_tasks.append(
                loop.create_task(producer.run(), name=f"koban-producer-{queue}")
            )
        log.info(
            "node %s started: %s",
            self.name,
            ", ".join(f"{q}={n}" for q, n in self.queues.items()) or "no queues",
        )

    async def stop(self, grace: float | None = None) -> None:
        """Stop fetching, let running jobs finish within `grace` seconds, record their outcomes.

        Jobs still running after the grace period are abandoned and stay `executing`, to be
        rescued once this node's heartbeat expires; they are never marked completed.
        """
        if not self._started:
            return
        grace = self.shutdown_grace if grace is None else grace
        for producer in self.producers.values():
            producer.stop_fetching()
        await asyncio.gather(*self._producer_tasks, return_exceptions=True)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        for producer in self.producers.values():
            await producer.wait_idle(max(0.0, deadline - loop.time()))
        abandoned: list[int] = []
        for producer in self.producers.values():
            abandoned += await producer.abandon()
        if abandoned:
            log.warning(
                "node %s stopped with %d job(s) still running after %.1f s of grace: %s; "
                "they stay executing and will be rescued",
                self.name,
                len(abandoned),
                grace,
                ", ".join(map(str, abandoned[:20])),
            )
        if not await self.acker.drain(timeout=10.0):
            log.warning(
                "node %s could not record %d outcome(s) before stopping; "
                "those jobs will be rescued",
                self.name,
                self.acker.pending,
            )
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        self._producer_tasks.clear()
        self._threads.shutdown(wait=False, cancel_futures=True)
        self._started = False
        log.info("node %s stopped", self.name)

    # ----- notifications --------------------------------------------------------------------
    def wake(self, queue: str) -> None:
        producer = self.producers.get(queue)
        if producer is not None:
            producer.wake()

    async def _on_listen_state(self, healthy: bool) -> None:
        was, self._listening = self._listening, healthy
        if healthy and not was:
            # Notifications may have been missed while down: look at every queue once.
            for producer in self.producers.values():
                producer.wake()

    def _on_notification(self, channel: str, payload: dict[str, Any]) -> None:
        if channel == INSERT_CHANNEL:
            queue = payload.get("queue")
            if isinstance(queue, str):
                self.wake(queue)
        elif channel == SIGNAL_CHANNEL:
            self.handle_signal(payload)

    def handle_signal(self, payload: dict[str, Any]) -> None:
        """Apply a runtime-control signal (pause, resume, scale, cancel) meant for this node."""
        target = payload.get("node")
        if target is not None and target != self.name:
            return
        action = payload.get("action")
        queue = payload.get("queue")
        producers = (
            [self.producers[queue]]
            if queue in self.producers
            else (list(self.producers.values()) if queue is None else [])
        )
        if action == "pause":
            for p in producers:
                p.pause()
        elif action == "resume":
            for p in producers:
                p.resume()
        elif action == "scale" and isinstance(payload.get("limit"), int):
            for p in producers:
                p.scale(payload["limit"])
        elif action == "cancel":
            for job_id in payload.get("job_ids", []):
                for p in self.producers.values():
                    p.cancel(job_id)

    # ----- plugins --------------------------------------------------------------------------
    async def _run_plugin(self, plugin: Plugin) -> None:
        failing = False
        while True:
            delay = plugin.interval
            if not plugin.leader_only or self.is_leader:
                try:
                    result = await plugin.tick(self)
                    delay = plugin.next_delay(result)
                    if failing:
                        log.info("plugin %s on node %s is working again", plugin.name, self.name)
                    failing = False
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    if not failing:
                        log.warning(
                            "plugin %s on node %s failed (%s: %s); retrying every %.1f s",
                            plugin.name,
                            self.name,
                            type(exc).__name__,
                            str(exc).strip().splitlines()[0] if str(exc).strip() else "",
                            plugin.interval,
                        )
                    failing = True
            await asyncio.sleep(delay)

    @property
    def running_jobs(self) -> int:
        return sum(len(p.running) for p in self.producers.values())
