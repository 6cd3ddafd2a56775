"""Koban: the application object — configuration, the worker registry and the client API.

>>> app = koban.Koban("postgresql://localhost/app", queues={"default": 10, "mailers": 2})
>>> @app.worker(queue="mailers", max_attempts=5)
... async def send_welcome(job: koban.Job) -> None: ...
>>> send_welcome.enqueue({"user_id": 7})
>>> async with app:          # runs a node until the block exits
...     ...
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import os
import signal
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any, TypeVar, overload

from koban.clock import Clock
from koban.cron import Cron, CronEntryInfo, check_entries
from koban.engines.base import (
    INSERT_CHANNEL,
    SIGNAL_CHANNEL,
    Engine,
    JobFilter,
    NodeInfo,
    QueueState,
    create_engine,
)
from koban.errors import ConfigurationError, UnknownNodeError, UnknownWorkerError
from koban.job import DEFAULT_MAX_ARGS_BYTES, Job, validate
from koban.plugins.base import Plugin
from koban.plugins.heartbeat import Heartbeat
from koban.plugins.lifeline import Lifeline
from koban.plugins.pruner import Pruner
from koban.plugins.reindexer import Reindexer
from koban.plugins.scheduler import Scheduler, check_job
from koban.plugins.stager import Stager
from koban.runtime.leadership import Leadership
from koban.runtime.node import Node
from koban.telemetry import Telemetry
from koban.unique import unique_key
from koban.worker import FunctionWorker, RegisteredWorker, Worker, register

log = logging.getLogger("koban")

T = TypeVar("T")
WorkerRef = str | FunctionWorker | type[Worker]


def parse_queues(spec: str | Mapping[str, int] | None) -> dict[str, int]:
    """Queues as {name: slots}, from a mapping or a "default=10,mailers=2" string."""
    if spec is None:
        return {"default": 10}
    if isinstance(spec, str):
        out: dict[str, int] = {}
        for part in filter(None, (p.strip() for p in spec.split(","))):
            name, sep, slots = part.partition("=")
            if not sep or not name.strip():
                raise ConfigurationError(
                    f"queue setting {part!r} must look like NAME=SLOTS, for example default=10"
                )
            try:
                out[name.strip()] = int(slots)
            except ValueError:
                raise ConfigurationError(
                    f"queue {name.strip()!r}: slots must be a whole number, got {slots!r}"
                ) from None
        spec = out
    queues = dict(spec)
    for name, limit in queues.items():
        if not isinstance(name, str) or not name:
            raise ConfigurationError(f"queue names must be non-empty strings, got {name!r}")
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise ConfigurationError(
                f"queue {name!r}: slots must be a whole number of at least 1, got {limit!r}"
            )
    return queues


def check_processes(value: object) -> int:
    """The process pool's size, or ConfigurationError naming the setting."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigurationError(
            f"processes (the number of worker processes for executor='process' jobs) must be "
            f"a whole number of at least 1, got {value!r}"
        )
    return value


def _is_id(value: object) -> bool:
    """True if `value` could be a job id: ids are 64-bit, and no job has one beyond that."""
    return not isinstance(value, int) or -(2**63) <= value <= 2**63 - 1


def _bounded(flt: JobFilter) -> JobFilter:
    """A copy of `flt` without ids no job can have, whatever was set after it was built (so no
    engine fails on them: PostgreSQL's bigint and SQLite's INTEGER stop at 2**63 - 1)."""
    return dataclasses.replace(flt)


class Koban:
    """A koban application: where jobs are stored, which queues run, which workers exist.

    `database` is a URL (`postgresql://...` or `sqlite:///path.db`); without one,
    `KOBAN_DATABASE_URL` is used, and without that the SQLite file `./koban.db`.

    `cron` lists `koban.Cron` entries the cluster's leader inserts on schedule. `plugins`
    replaces default plugins of the same class (Stager, Heartbeat, Leadership, Lifeline,
    Pruner, Reindexer, Scheduler) or adds others; see docs/cluster.md. `processes` is how many
    worker processes run `executor="process"` jobs (default: one per CPU).
    """

    def __init__(
        self,
        database: str | None = None,
        *,
        queues: Mapping[str, int] | str | None = None,
        node: str | None = None,
        plugins: Sequence[Plugin] | None = None,
        clock: Clock | None = None,
        shutdown_grace: float = 15.0,
        max_args_bytes: int | None = DEFAULT_MAX_ARGS_BYTES,
        engine: Engine | None = None,
        cron: Sequence[Cron] | None = None,
        processes: int | None = None,
    ) -> None:
        url = database or os.environ.get("KOBAN_DATABASE_URL")
        self.engine = engine or create_engine(url)
        self.queues = parse_queues(queues)
        self.node_name = node
        self.clock = clock or Clock()
        self.shutdown_grace = shutdown_grace
        if max_args_bytes is not None and (
            isinstance(max_args_bytes, bool)
            or not isinstance(max_args_bytes, int)
            or max_args_bytes < 2
        ):
            raise ConfigurationError(
                f"max_args_bytes must be a whole number of bytes of at least 2 (the size of "
                f"empty args, {{}}) or None for no limit, got {max_args_bytes!r}"
            )
        self.max_args_bytes = max_args_bytes
        #: Worker processes a node runs executor="process" jobs in (`koban start --processes`).
        self.processes = check_processes(os.cpu_count() or 1 if processes is None else processes)
        self.telemetry = Telemetry()
        self.workers: dict[str, RegisteredWorker] = {}
        self.extra_plugins: list[Plugin] = list(plugins or [])
        #: Cron entries: jobs the leader inserts on a schedule (see `koban.Cron`).
        self.cron: list[Cron] = check_entries(cron or [])
        self.node: Node | None = None
        self._opened = False

    def __repr__(self) -> str:
        return f"<Koban {self.engine!r} queues={self.queues}>"

    # ----- workers --------------------------------------------------------------------------
    @overload
    def worker(self, target: T) -> T: ...
    @overload
    def worker(self, target: None = None, **options: Any) -> Callable[[T], T]: ...

    def worker(self, target: Any = None, **options: Any) -> Any:
        """Register a function or Worker subclass; usable bare or with options.

        Options: queue, max_attempts, priority, tags, timeout, unique, executor, backoff.
        """

        def decorate(obj: Any) -> Any:
            backoff = options.pop("backoff", None)
            entry = register(obj, self, backoff=backoff, **options)
            if entry.name in self.workers and self.workers[entry.name].target is not entry.target:
                previous = self.workers[entry.name].target
                if getattr(previous, "fn", previous) is not obj:
                    raise ConfigurationError(
                        f"worker {entry.name!r} is registered twice; give each worker a "
                        "distinct module-level name"
                    )
            self.workers[entry.name] = entry
            return entry.target

        return decorate(target) if target is not None else decorate

    def resolve_worker(self, ref: WorkerRef) -> RegisteredWorker:
        """The registered worker for an object or its `module.qualname` name."""
        name = ref if isinstance(ref, str) else getattr(ref, "name", None) or ""
        entry = self.workers.get(name)
        if entry is None:
            known = ", ".join(sorted(self.workers)) or "none registered"
            raise UnknownWorkerError(f"unknown worker {name or ref!r}; known workers: {known}")
        return entry

    # ----- enqueue --------------------------------------------------------------------------
    def _prepare(self, jobs: Iterable[Job]) -> list[Job]:
        now = self.clock.now()
        prepared = list(jobs)
        for job in prepared:
            self._prepare_one(job, now)
        return prepared

    def _prepare_one(self, job: Job, now: datetime) -> None:
        if not isinstance(job, Job):
            raise TypeError(
                f"enqueue_many takes jobs built with Worker.new(...), got {type(job).__name__}"
            )
        # Subscribers may add to job.meta here (tracing carries its context this way).
        self.telemetry.emit("job:enqueue", job=job)
        validate(job, max_args_bytes=self.max_args_bytes)
        if job.unique is not None:
            job.unique_key = unique_key(job, job.unique, now)

    def _deferred(self, jobs: Iterable[Job]) -> tuple[list[Job], Callable[[Job], None]]:
        """The jobs, and how to prepare each: the engine may do it while it sends the batch
        (see `Engine.insert`), so validation overlaps the database's work."""
        return list(jobs), functools.partial(self._prepare_one, now=self.clock.now())

    def _now(self) -> datetime | None:
        return self.clock.now() if self.clock.frozen else None

    def enqueue(self, job: Job, *, conn: Any = None) -> Job:
        """Insert one job built with `Worker.new` (usually called as `worker.enqueue(args)`)."""
        return self.engine.insert_sync(self._prepare([job]), conn=conn, now=self._now())[0]

    async def aenqueue(self, job: Job, *, conn: Any = None) -> Job:
        await self._ensure_open()
        return (await self.engine.insert(self._prepare([job]), conn=conn, now=self._now()))[0]

    def enqueue_many(self, jobs: Iterable[Job], *, conn: Any = None) -> list[Job]:
        """Insert many jobs in one round trip; returns them as stored, in the given order.

        All or none: a job that fails validation raises before any of them is inserted.
        """
        if conn is not None:  # never start, then abort, a statement in the caller's transaction
            return self.engine.insert_sync(self._prepare(jobs), conn=conn, now=self._now())
        listed, prepare = self._deferred(jobs)
        return self.engine.insert_sync(listed, now=self._now(), prepare=prepare)

    async def aenqueue_many(self, jobs: Iterable[Job], *, conn: Any = None) -> list[Job]:
        await self._ensure_open()
        if conn is not None:
            return await self.engine.insert(self._prepare(jobs), conn=conn, now=self._now())
        listed, prepare = self._deferred(jobs)
        return await self.engine.insert(listed, now=self._now(), prepare=prepare)

    # ----- queries and control --------------------------------------------------------------
    def get_job(self, job_id: int) -> Job | None:
        return self.engine.get_job_sync(job_id) if _is_id(job_id) else None

    async def aget_job(self, job_id: int) -> Job | None:
        await self._ensure_open()
        return await self.engine.get_job(job_id) if _is_id(job_id) else None

    def list_jobs(self, flt: JobFilter | None = None, **filters: Any) -> list[Job]:
        return self.engine.list_jobs_sync(_bounded(flt or JobFilter(**filters)))

    async def alist_jobs(self, flt: JobFilter | None = None, **filters: Any) -> list[Job]:
        await self._ensure_open()
        return await self.engine.list_jobs(_bounded(flt or JobFilter(**filters)))

    def cancel_jobs(self, flt: JobFilter) -> list[Job]:
        """Cancel matching unfinished jobs; running ones are stopped where they run."""
        jobs = self.engine.cancel_jobs_sync(_bounded(flt), now=self._now())
        running = [j.id for j in jobs if j.attempted_by]
        if running:
            self.engine.notify_sync(SIGNAL_CHANNEL, {"action": "cancel", "job_ids": running})
        return jobs

    async def acancel_jobs(self, flt: JobFilter) -> list[Job]:
        await self._ensure_open()
        jobs = await self.engine.cancel_jobs(_bounded(flt), now=self._now())
        running = [j.id for j in jobs if j.attempted_by]
        if running:
            await self.engine.notify(SIGNAL_CHANNEL, {"action": "cancel", "job_ids": running})
        return jobs

    def cancel_job(self, job_id: int) -> Job | None:
        jobs = self.cancel_jobs(JobFilter(ids=[job_id]))
        return jobs[0] if jobs else None

    async def acancel_job(self, job_id: int) -> Job | None:
        jobs = await self.acancel_jobs(JobFilter(ids=[job_id]))
        return jobs[0] if jobs else None

    def retry_jobs(self, flt: JobFilter) -> list[Job]:
        """Run matching finished or waiting jobs again now (one more attempt if exhausted)."""
        jobs = self.engine.retry_jobs_sync(_bounded(flt), now=self._now())
        for queue in sorted({j.queue for j in jobs}):
            self.engine.notify_sync(INSERT_CHANNEL, {"queue": queue})
        return jobs

    async def aretry_jobs(self, flt: JobFilter) -> list[Job]:
        await self._ensure_open()
        jobs = await self.engine.retry_jobs(_bounded(flt), now=self._now())
        for queue in sorted({j.queue for j in jobs}):
            await self.engine.notify(INSERT_CHANNEL, {"queue": queue})
        return jobs

    def retry_job(self, job_id: int) -> Job | None:
        jobs = self.retry_jobs(JobFilter(ids=[job_id]))
        return jobs[0] if jobs else None

    async def aretry_job(self, job_id: int) -> Job | None:
        jobs = await self.aretry_jobs(JobFilter(ids=[job_id]))
        return jobs[0] if jobs else None

    def delete_jobs(self, flt: JobFilter) -> list[int]:
        """Delete matching jobs that are not executing; returns their ids."""
        return self.engine.delete_jobs_sync(_bounded(flt))

    async def adelete_jobs(self, flt: JobFilter) -> list[int]:
        await self._ensure_open()
        return await self.engine.delete_jobs(_bounded(flt))

    def delete_job(self, job_id: int) -> bool:
        return bool(self.delete_jobs(JobFilter(ids=[job_id])))

    async def adelete_job(self, job_id: int) -> bool:
        return bool(await self.adelete_jobs(JobFilter(ids=[job_id])))

    # ----- runtime control across nodes -----------------------------------------------------
    def _signal(self, payload: dict[str, Any], node: str | None) -> dict[str, Any]:
        if node is not None:
            payload["node"] = node
        if self.node is not None:
            # This process's own node need not wait for the notification to come back.
            self.node.handle_signal(payload)
        return payload

    @staticmethod
    def _check_queue_name(queue: str) -> None:
        if not isinstance(queue, str) or not queue.strip():
            raise ConfigurationError(f"queue must be a non-empty string, got {queue!r}")

    @staticmethod
    def _check_limit(queue: str, limit: int | None) -> None:
        if limit is not None and (
            isinstance(limit, bool) or not isinstance(limit, int) or not 0 <= limit <= 2**31 - 1
        ):
            raise ConfigurationError(
                f"scale_queue({queue!r}): limit must be a whole number of slots from 0 to "
                f"{2**31 - 1} or None for each node's configured slots, got {limit!r}"
            )

    def _control(
        self, queue: str, changes: dict[str, Any], node: str | None, action: dict[str, Any]
    ) -> None:
        self._check_queue_name(queue)
        if not self.engine.control_queue_sync(queue, changes, node=node, now=self._now()):
            raise UnknownNodeError(
                f"no node named {node!r} is registered; see app.list_nodes() for the live ones"
            )
        self.engine.notify_sync(SIGNAL_CHANNEL, self._signal(action, node))

    async def _acontrol(
        self, queue: str, changes: dict[str, Any], node: str | None, action: dict[str, Any]
    ) -> None:
        self._check_queue_name(queue)
        await self._ensure_open()
        if not await self.engine.control_queue(queue, changes, node=node, now=self._now()):
            raise UnknownNodeError(
                f"no node named {node!r} is registered; see app.list_nodes() for the live ones"
            )
        await self.engine.notify(SIGNAL_CHANNEL, self._signal(action, node))

    def pause_queue(self, queue: str, *, node: str | None = None) -> None:
        """Stop fetching jobs of `queue` on every node, or only on `node`; running jobs finish.

        Stored in the database: nodes started later stay paused until `resume_queue`.
        """
        self._control(queue, {"paused": True}, node, {"action": "pause", "queue": queue})

    async def apause_queue(self, queue: str, *, node: str | None = None) -> None:
        await self._acontrol(queue, {"paused": True}, node, {"action": "pause", "queue": queue})

    def resume_queue(self, queue: str, *, node: str | None = None) -> None:
        """Fetch jobs of `queue` again, on every node or only on `node`."""
        self._control(queue, {"paused": False}, node, {"action": "resume", "queue": queue})

    async def aresume_queue(self, queue: str, *, node: str | None = None) -> None:
        await self._acontrol(queue, {"paused": False}, node, {"action": "resume", "queue": queue})

    def scale_queue(self, queue: str, limit: int | None, *, node: str | None = None) -> None:
        """Run up to `limit` jobs of `queue` at once on each node (or only on `node`).

        None goes back to each node's configured slots. Stored in the database like a pause.
        """
        self._check_limit(queue, limit)
        action = {"action": "scale", "queue": queue, "limit": limit}
        self._control(queue, {"limit": limit}, node, action)

    async def ascale_queue(self, queue: str, limit: int | None, *, node: str | None = None) -> None:
        self._check_limit(queue, limit)
        action = {"action": "scale", "queue": queue, "limit": limit}
        await self._acontrol(queue, {"limit": limit}, node, action)

    def list_nodes(self) -> list[NodeInfo]:
        """Every registered node: its queues as last reported, heartbeat, and which one leads."""
        return self.engine.list_nodes_sync()

    async def alist_nodes(self) -> list[NodeInfo]:
        await self._ensure_open()
        return await self.engine.list_nodes()

    def _queue_states(
        self, settings: Mapping[str, QueueState], counts: Mapping[str, Mapping[str, int]]
    ) -> list[QueueState]:
        names = sorted(set(self.queues) | set(settings) | set(counts))
        out = []
        for name in names:
            setting = settings.get(name)
            out.append(
                QueueState(
                    name=name,
                    paused=setting.paused if setting else False,
                    limit=setting.limit if setting else None,
                    counts=dict(counts.get(name, {})),
                )
            )
        return out

    def queue_states(self) -> list[QueueState]:
        """Every queue configured here, set at runtime or holding jobs: its cluster-wide
        settings (`limit` None: each node's configured slots) and job counts by state."""
        return self._queue_states(
            self.engine.queue_settings_sync(), self.engine.count_by_queue_and_state_sync()
        )

    async def aqueue_states(self) -> list[QueueState]:
        await self._ensure_open()
        return self._queue_states(
            await self.engine.queue_settings(), await self.engine.count_by_queue_and_state()
        )

    def _cron_entries(self, records: Sequence[Any]) -> list[CronEntryInfo]:
        by_name = {r.name: r for r in records}
        now = self.clock.now()
        return [entry.info(now, by_name.get(entry.name)) for entry in self.cron]

    def cron_entries(self) -> list[CronEntryInfo]:
        """Every cron entry with its next run (in its own zone and UTC) and last inserted tick."""
        return self._cron_entries(self.engine.list_cron_sync())

    async def acron_entries(self) -> list[CronEntryInfo]:
        await self._ensure_open()
        return self._cron_entries(await self.engine.list_cron())

    # ----- running --------------------------------------------------------------------------
    async def _ensure_open(self) -> None:
        if not self._opened:
            await self.engine.open()
            self._opened = True

    async def open(self) -> None:
        """Connect for async client use (implied by `async with app` and `start`)."""
        await self._ensure_open()

    async def close(self) -> None:
        if self.node is not None:
            await self.stop()
        if self._opened:
            await self.engine.close()
            self._opened = False
        self.engine.close_sync()

    def plugins(self) -> list[Plugin]:
        """The plugins a node of this app runs: the defaults, each replaced by a plugin of the
        same class given in `plugins=`, then the other given plugins."""
        defaults: list[Plugin] = [
            Stager(),
            Heartbeat(),
            Leadership(),
            Lifeline(),
            Pruner(),
            Reindexer(),
            Scheduler(),
        ]
        chosen: list[Plugin] = []
        for default in defaults:
            given = [p for p in self.extra_plugins if isinstance(p, type(default))]
            chosen.append(given[0] if given else default)
        chosen += [p for p in self.extra_plugins if p not in chosen]
        heartbeat = next(p for p in chosen if isinstance(p, Heartbeat))
        lifeline = next(p for p in chosen if isinstance(p, Lifeline))
        if lifeline.rescue_after < 2 * heartbeat.interval:
            raise ConfigurationError(
                f"Lifeline rescue_after ({lifeline.rescue_after} s) must be at least twice the "
                f"Heartbeat interval ({heartbeat.interval} s), or live nodes' jobs get rescued"
            )
        return chosen

    def _resolve_cron(self) -> list[tuple[Cron, RegisteredWorker]]:
        """Each cron entry with its registered worker; raise naming an entry that cannot run."""
        resolved = []
        for entry in self.cron:
            try:
                worker = self.resolve_worker(
                    entry.worker if isinstance(entry.worker, str) else entry.worker_name
                )
            except UnknownWorkerError as exc:
                raise UnknownWorkerError(f"cron entry {entry.name!r}: {exc}") from None
            check_job(entry, worker, self.max_args_bytes)
            resolved.append((entry, worker))
        return resolved

    async def start(
        self, *, queues: Mapping[str, int] | None = None, node: str | None = None
    ) -> Node:
        """Start a node in the running event loop; returns once it is fetching."""
        if self.node is not None:
            return self.node
        plugins = self.plugins()
        entries = self._resolve_cron()
        for plugin in plugins:
            if isinstance(plugin, Scheduler):
                plugin.use(entries)
        await self._ensure_open()
        new = Node(
            engine=self.engine,
            workers=self.workers,
            queues=queues if queues is not None else self.queues,
            telemetry=self.telemetry,
            clock=self.clock,
            plugins=plugins,
            name=node or self.node_name,
            shutdown_grace=self.shutdown_grace,
            processes=check_processes(self.processes),
        )
        await new.start()
        self.node = new
        return new

    async def stop(self, grace: float | None = None) -> None:
        node, self.node = self.node, None
        if node is not None:
            await node.stop(grace)

    async def __aenter__(self) -> Koban:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def serve(
        self, *, queues: Mapping[str, int] | None = None, node: str | None = None
    ) -> None:
        """Run a node until SIGTERM or SIGINT, then stop gracefully.

        A node that has to stop on its own (`Node.fail`: another process took its name) is
        stopped the same way, and its error raised.
        """
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        installed = []
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                loop.add_signal_handler(sig, stop.set)
                installed.append(sig)
            except (NotImplementedError, RuntimeError, ValueError):
                pass
        failure: Exception | None = None
        try:
            running = await self.start(queues=queues, node=node)
            signalled = asyncio.ensure_future(stop.wait())
            failed = asyncio.ensure_future(running.failed.wait())
            try:
                await asyncio.wait((signalled, failed), return_when=asyncio.FIRST_COMPLETED)
            finally:
                signalled.cancel()
                failed.cancel()
            failure = running.failure
            log.info(
                "shutting down: no new jobs; waiting up to %.1f s for running ones",
                self.shutdown_grace,
            )
        finally:
            for sig in installed:
                loop.remove_signal_handler(sig)
            await self.close()
        if failure is not None:
            raise failure

    def run(self, **kwargs: Any) -> None:
        """Run a node in this thread until SIGTERM or SIGINT (blocking)."""
        asyncio.run(self.serve(**kwargs))

    # ----- schema ---------------------------------------------------------------------------
    def migrate(self) -> list[int]:
        """Create or upgrade koban's tables; returns the versions applied."""
        return self.engine.migrate()
