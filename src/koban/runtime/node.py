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
from koban.engines.base import INSERT_CHANNEL, SIGNAL_CHANNEL, Engine, QueueState
from koban.plugins.base import Plugin
from koban.runtime.acker import Acker
from koban.runtime.executor import Executor, JobThreads
from koban.runtime.leadership import RESIGNED, Leadership
from koban.runtime.processes import ProcessPool
from koban.runtime.producer import Producer
from koban.telemetry import Telemetry
from koban.worker import RegisteredWorker

log = logging.getLogger("koban.node")

#: Poll interval while notifications work (a safety net only) and while they do not.
HEALTHY_POLL = 10.0


#: Default names taken by nodes of this process, so two apps in one process never share one.
_DEFAULT_NAMES: set[str] = set()
#: How long a silent node still counts as alive when no Lifeline says otherwise.
DEFAULT_LIVE_WITHIN = 30.0


async def _cancel_all(tasks: list[asyncio.Task[Any]]) -> None:
    """Cancel `tasks` and wait until every one has ended.

    A task is cancelled again each second until it ends: on Python 3.11, `asyncio.wait_for`
    (which psycopg_pool uses to wait for a free connection) returns normally instead of raising
    when its awaitable completes as the cancellation arrives (CPython gh-86296), so a loop can
    lose one cancellation and carry on; waiting for it once would wait forever.
    """
    pending = {task for task in tasks if not task.done()}
    while pending:
        for task in pending:
            task.cancel()
        _done, pending = await asyncio.wait(pending, timeout=1.0)
    for task in tasks:
        if not task.cancelled():
            task.exception()  # retrieved, so asyncio does not report it as never retrieved


def default_node_name() -> str:
    """host.pid: unique for every process on every machine (host.pid.2, ... for further nodes
    in the same process)."""
    base = f"{socket.gethostname()}.{os.getpid()}"
    name, n = base, 1
    while name in _DEFAULT_NAMES:
        n += 1
        name = f"{base}.{n}"
    return name


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
        processes: int | None = None,
    ) -> None:
        self.engine = engine
        self._default_name = name is None
        self.name = name or default_node_name()
        if self._default_name:
            _DEFAULT_NAMES.add(self.name)
        self.queues = dict(queues)
        self.telemetry = telemetry
        self.clock = clock
        self.plugins = list(plugins)
        self.shutdown_grace = shutdown_grace
        self._leadership = next((p for p in self.plugins if isinstance(p, Leadership)), None)
        self._leader_flag = False
        #: When the cluster this node belongs to was started (set by the heartbeat).
        self.cluster_started_at: datetime | None = None
        #: The clock's time of this node's last successful heartbeat (None: it has none).
        self.last_heartbeat: datetime | None = None
        #: Seconds a silent node still counts as alive: the Lifeline's rescue window.
        self.live_within = next(
            (float(p.rescue_after) for p in self.plugins if hasattr(p, "rescue_after")),
            DEFAULT_LIVE_WITHIN,
        )
        #: Ids of jobs still running when the last stop ran out of grace.
        self.abandoned: list[int] = []
        #: Why this node stopped fetching for good while running (see `fail`), else None.
        self.failure: Exception | None = None
        #: Set by `fail`: `Koban.serve` stops the node and raises `failure`.
        self.failed = asyncio.Event()
        # Runtime settings from the database: cluster-wide per queue, and this node's own.
        self._queue_settings: dict[str, QueueState] = {}
        self._queue_overrides: dict[str, dict[str, Any]] = {}
        self._listening = False
        self._threads = JobThreads(
            max_workers=max(4, sum(self.queues.values()) + 4), thread_name_prefix="koban-job"
        )
        self._workers = workers
        # Holds no process until used: its children are spawned at start when a registered
        # worker uses executor="process", else on the first process job (a later worker's).
        self._processes = ProcessPool(processes or os.cpu_count() or 1)
        self.executor = Executor(workers, telemetry, clock, self._threads, self._processes)
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

    # ----- leadership -----------------------------------------------------------------------
    @property
    def is_leader(self) -> bool:
        """True while this node holds the cluster's leadership lease."""
        if self._leadership is not None:
            return self._leadership.is_leader
        return self._leader_flag

    @is_leader.setter
    def is_leader(self, value: bool) -> None:
        # For nodes run without a Leadership plugin (single-node setups and tests).
        self._leader_flag = value

    # ----- runtime control ------------------------------------------------------------------
    def _effective(self, queue: str) -> tuple[bool, int]:
        """(paused, slots) for `queue`: this node's setting, else the cluster's, else config."""
        setting = self._queue_settings.get(queue)
        override = self._queue_overrides.get(queue, {})
        paused = override.get("paused", setting.paused if setting else False)
        limit = override.get("limit")
        if not isinstance(limit, int):
            limit = setting.limit if setting and setting.limit is not None else self.queues[queue]
        return bool(paused), max(0, int(limit))

    def apply_control(
        self, settings: Mapping[str, QueueState], overrides: Mapping[str, Mapping[str, Any]]
    ) -> None:
        """Adopt the queue settings stored in the database (see `Heartbeat`)."""
        self._queue_settings = dict(settings)
        self._queue_overrides = {q: dict(v) for q, v in overrides.items() if isinstance(v, Mapping)}
        for queue, producer in self.producers.items():
            paused, limit = self._effective(queue)
            if paused and not producer.paused:
                log.info("queue %r on node %s paused", queue, self.name)
                producer.pause()
            elif not paused and producer.paused:
                log.info("queue %r on node %s resumed", queue, self.name)
                producer.resume()
            if producer.limit != limit:
                log.info("queue %r on node %s scaled to %d slot(s)", queue, self.name, limit)
                producer.scale(limit)

    def queue_report(self) -> dict[str, dict[str, Any]]:
        """What the heartbeat publishes: each queue's slots, paused flag and running jobs."""
        report: dict[str, dict[str, Any]] = {}
        for queue, configured in self.queues.items():
            producer = self.producers.get(queue)
            if producer is None:
                paused, limit = self._effective(queue)
                running = 0
            else:
                paused, limit, running = producer.paused, producer.limit, len(producer.running)
            report[queue] = {
                "limit": limit,
                "paused": paused,
                "running": running,
                "configured": configured,
            }
        return report

    def running_job_attempts(self) -> dict[int, int]:
        """{job id: attempt} of every job running on this node."""
        return {
            job_id: job.attempt
            for producer in self.producers.values()
            for job_id, (job, _task) in producer.running.items()
        }

    def cancel_local(self, job_id: int, attempt: int | None = None) -> bool:
        """Stop a job running here (only that attempt, if given); False if it is not running."""
        for producer in self.producers.values():
            entry = producer.running.get(job_id)
            if entry is not None and (attempt is None or entry[0].attempt == attempt):
                return producer.cancel(job_id)
        return False

    def fail(self, error: Exception) -> None:
        """Stop fetching for good: the node can no longer run jobs safely (`error` says why).

        Running jobs finish and their outcomes are recorded; `Koban.serve` (`koban start`) then
        stops the node and raises `error`.
        """
        if self.failure is not None:
            return
        self.failure = error
        log.error("%s", error)
        for producer in self.producers.values():
            producer.stop_fetching()
        self.failed.set()

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
        try:
            # Before the first fetch: the heartbeat registers the node (so its jobs are never
            # taken for a dead node's) and loads the queues' runtime settings.
            for plugin in self.plugins:
                await plugin.start(self)
        except BaseException:
            for task in self._tasks:
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            self._tasks.clear()
            self._started = False
            raise
        if any(w.options.executor == "process" for w in self._workers.values()):
            self._processes.start()
        for queue in self.queues:
            paused, limit = self._effective(queue)
            producer = Producer(
                queue=queue,
                limit=limit,
                paused=paused,
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
        for plugin in self.plugins:
            self._tasks.append(
                loop.create_task(self._run_plugin(plugin), name=f"koban-{plugin.name}")
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
        for plugin in self.plugins:
            try:
                await plugin.stopping(self)
            except Exception:
                log.exception("plugin %s failed as node %s began to stop", plugin.name, self.name)
        for producer in self.producers.values():
            producer.stop_fetching()
        await asyncio.gather(*self._producer_tasks, return_exceptions=True)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        for producer in self.producers.values():
            await producer.wait_idle(max(0.0, deadline - loop.time()))
        abandoned: list[int] = []
        self._processes.closing()  # a process job abandoned now needs no replacement child
        for producer in self.producers.values():
            abandoned += await producer.abandon()
        self.abandoned = abandoned
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
        await _cancel_all(self._tasks)
        self._tasks.clear()
        self._producer_tasks.clear()
        for plugin in reversed(self.plugins):
            try:
                await plugin.stop(self)
            except Exception:
                log.exception("plugin %s failed as node %s stopped", plugin.name, self.name)
        if self._default_name:
            _DEFAULT_NAMES.discard(self.name)
        self._threads.shutdown(wait=False, cancel_futures=True)
        # Jobs still running in a process were cancelled above, which killed their processes.
        await self._processes.close()
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
        if action == RESIGNED:
            if self._leadership is not None and payload.get("from") != self.name:
                self._leadership.wake()
            return
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
        elif action == "scale":
            limit = payload.get("limit")
            for p in producers:
                # None: back to this node's configured slots.
                p.scale(limit if isinstance(limit, int) else self.queues.get(p.queue, p.limit))
        elif action == "cancel":
            for job_id in payload.get("job_ids", []):
                if isinstance(job_id, int):
                    self.cancel_local(job_id)

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
            await plugin.sleep(delay)

    @property
    def running_jobs(self) -> int:
        return sum(len(p.running) for p in self.producers.values())
