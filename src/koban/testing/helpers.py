"""Testing helpers: run jobs through the real execution path, check what was enqueued.

>>> testing = KobanTesting(app)                      # manual mode: jobs are stored, none run
>>> SyncAllWorker.enqueue({})
>>> testing.assert_enqueued(worker=SyncAllWorker, queue="default")
>>> testing.drain_queue("default")
{'completed': 1, 'retryable': 0, 'discarded': 0, 'cancelled': 0, 'snoozed': 0}
>>> testing.perform_job(SyncAthleteWorker, {"athlete_id": 7}).state
'completed'
>>> with testing.inline():                           # enqueue runs the job at once
...     SyncAthleteWorker.enqueue({"athlete_id": 7}).state
'completed'

Every helper runs a job with `koban.runtime.executor.Executor`, as a node does: the same
outcome rules (return, raise, Snooze, Cancel, Discard, timeout), backoff and telemetry.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from koban.engines.base import Ack, Engine, JobFilter, create_engine
from koban.errors import ConfigurationError, UnknownWorkerError
from koban.job import PENDING_STATES, Job, JobState, validate
from koban.runtime.executor import Executor, JobThreads
from koban.worker import FunctionWorker, RegisteredWorker, Worker

if TYPE_CHECKING:
    from koban.app import Koban

T = TypeVar("T")
Mode = Literal["manual", "inline"]
MODES: tuple[str, ...] = ("manual", "inline")
WorkerRef = str | FunctionWorker | type[Worker]

#: Outcome names, as `perform_job(...).state` and the keys of `drain_queue`'s counts.
OUTCOMES: tuple[str, ...] = ("completed", "retryable", "discarded", "cancelled", "snoozed")

#: Node and producer names that test runs record in `attempted_by`.
TEST_NODE = "koban.testing"

#: At most this many attempts per `drain_queue` call unless told otherwise.
DEFAULT_DRAIN_LIMIT = 10_000


@dataclass(frozen=True, slots=True)
class Outcome:
    """What one attempt of a job came to.

    `state` is one of OUTCOMES; `job` is the job as it stands after the attempt (state,
    attempt, errors, scheduled_at); `error` is the entry the attempt added to `job.errors`;
    `delay` is the seconds until the job runs again (retryable and snoozed only).
    """

    state: str
    job: Job
    error: dict[str, Any] | None = None
    delay: float | None = None

    @property
    def completed(self) -> bool:
        return self.state == "completed"


def _outcome_name(ack: Ack) -> str:
    return "snoozed" if ack.snooze else str(ack.state)


def _apply(job: Job, ack: Ack, now: datetime) -> Job:
    """The job as the database would hold it once `ack` is recorded."""
    done = replace(job, errors=list(job.errors), meta=dict(job.meta))
    done.state = ack.state
    if ack.error is not None:
        done.errors.append(ack.error)
    if ack.delay is not None:
        done.scheduled_at = now + timedelta(seconds=ack.delay)
    if ack.snooze:
        done.attempt -= 1
        done.meta["snoozed"] = int(done.meta.get("snoozed", 0)) + 1
    if ack.state == JobState.COMPLETED:
        done.completed_at = now
    elif ack.state == JobState.CANCELLED:
        done.cancelled_at = now
    elif ack.state == JobState.DISCARDED:
        done.discarded_at = now
    return done


def run_sync(make: Callable[[], Awaitable[T]]) -> T:
    """Run a coroutine to completion from sync code, even inside a running event loop.

    Inside a loop (an async test calling a sync helper) it runs on a private loop in another
    thread and blocks the caller until done.
    """
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(_as_coroutine(make))
    with ThreadPoolExecutor(1, thread_name_prefix="koban-testing") as pool:
        return pool.submit(lambda: asyncio.run(_as_coroutine(make))).result()


async def _as_coroutine(make: Callable[[], Awaitable[T]]) -> T:
    return await make()


def _subset(expected: dict[str, Any] | None, actual: dict[str, Any]) -> bool:
    return expected is None or all(k in actual and actual[k] == v for k, v in expected.items())


class KobanTesting:
    """Test helpers bound to one app, in `manual` or `inline` mode.

    manual: enqueue stores jobs as usual and nothing runs them until the test calls
    `drain_queue` (or starts a node). inline: enqueue runs the job at once, in the caller,
    without storing it, and returns it in the state the attempt left it in (no retries, no
    unique check, `schedule_in` ignored). Use as a context manager, or call `close()`, to
    restore the app.
    """

    def __init__(self, app: Koban, mode: Mode | str = "manual") -> None:
        self.app = app
        self._mode: str = "manual"
        self._saved: dict[str, Any] = {}
        self._threads = JobThreads(max_workers=8, thread_name_prefix="koban-testing-job")
        self.mode = mode

    # ----- modes ----------------------------------------------------------------------------
    @property
    def mode(self) -> str:
        return self._mode

    @mode.setter
    def mode(self, mode: str) -> None:
        if mode not in MODES:
            raise ConfigurationError(
                f"koban.testing mode must be one of {', '.join(MODES)}, got {mode!r}"
            )
        if mode == self._mode and (mode == "manual" or self._saved):
            return
        self._restore()
        if mode == "inline":
            self._install_inline()
        self._mode = mode

    @contextmanager
    def inline(self) -> Iterator[KobanTesting]:
        """Within the block, enqueue runs jobs at once; the previous mode returns after."""
        with self._switched("inline"):
            yield self

    @contextmanager
    def manual(self) -> Iterator[KobanTesting]:
        """Within the block, enqueue only stores jobs; the previous mode returns after."""
        with self._switched("manual"):
            yield self

    @contextmanager
    def _switched(self, mode: str) -> Iterator[None]:
        previous = self.mode
        self.mode = mode
        try:
            yield
        finally:
            self.mode = previous

    def _install_inline(self) -> None:
        app = self.app
        for name in ("enqueue", "aenqueue", "enqueue_many", "aenqueue_many"):
            self._saved[name] = app.__dict__.get(name)

        def enqueue(job: Job, *, conn: Any = None) -> Job:
            return run_sync(lambda: self._arun_inline(job))

        async def aenqueue(job: Job, *, conn: Any = None) -> Job:
            return await self._arun_inline(job)

        def enqueue_many(jobs: Sequence[Job], *, conn: Any = None) -> list[Job]:
            return [enqueue(job) for job in jobs]

        async def aenqueue_many(jobs: Sequence[Job], *, conn: Any = None) -> list[Job]:
            return [await self._arun_inline(job) for job in jobs]

        # Instance attributes shadow the methods for this app only; `_restore` removes them.
        for name, fn in (
            ("enqueue", enqueue),
            ("aenqueue", aenqueue),
            ("enqueue_many", enqueue_many),
            ("aenqueue_many", aenqueue_many),
        ):
            setattr(app, name, fn)

    def _restore(self) -> None:
        for name, previous in self._saved.items():
            if previous is None:
                self.app.__dict__.pop(name, None)
            else:
                setattr(self.app, name, previous)
        self._saved.clear()

    async def _arun_inline(self, job: Job) -> Job:
        if not isinstance(job, Job):
            raise TypeError(
                f"enqueue takes jobs built with Worker.new(...), got {type(job).__name__}"
            )
        return (await self._aperform(job)).job

    def close(self) -> None:
        """Restore the app's own enqueue and release the helper's threads."""
        self._restore()
        self._mode = "manual"
        self._threads.shutdown(wait=False, cancel_futures=True)

    def __enter__(self) -> KobanTesting:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ----- running one job ------------------------------------------------------------------
    def _registered(self, worker: WorkerRef) -> RegisteredWorker:
        try:
            return self.app.resolve_worker(worker)
        except UnknownWorkerError as exc:
            raise UnknownWorkerError(
                f"{exc}; register it with @app.worker on the app given to koban.testing"
            ) from None

    def _executor(self) -> Executor:
        return Executor(self.app.workers, self.app.telemetry, self.app.clock, self._threads)

    def build_job(
        self, worker: WorkerRef, args: dict[str, Any] | None = None, **options: Any
    ) -> Job:
        """An unsaved job for `worker` with `enqueue`'s options, checked as enqueue checks it."""
        registered = self._registered(worker)
        job = registered.target.new(args, **options)
        validate(job, max_args_bytes=self.app.max_args_bytes)
        return job

    def perform_job(
        self,
        worker: WorkerRef,
        args: dict[str, Any] | None = None,
        *,
        attempt: int = 1,
        **options: Any,
    ) -> Outcome:
        """Run one attempt of a job for `worker` with `args` and return its outcome.

        The job is not stored. Args are checked and round-tripped through JSON as enqueue and
        the database would (a tuple arrives as a list). `attempt` sets which attempt this is,
        to test the last one (`attempt=job.max_attempts`) or a backoff; other keyword
        arguments are enqueue's options (queue, max_attempts, meta, tags, priority...).
        """
        job = self.build_job(worker, args, **options)
        job.attempt = attempt
        return run_sync(lambda: self._aperform(job))

    async def aperform_job(
        self,
        worker: WorkerRef,
        args: dict[str, Any] | None = None,
        *,
        attempt: int = 1,
        **options: Any,
    ) -> Outcome:
        """Async twin of `perform_job`."""
        job = self.build_job(worker, args, **options)
        job.attempt = attempt
        return await self._aperform(job)

    async def _aperform(self, job: Job) -> Outcome:
        validate(job, max_args_bytes=self.app.max_args_bytes)
        now = self.app.clock.now()
        job = replace(
            job,
            args=json.loads(json.dumps(job.args)),
            meta=json.loads(json.dumps(job.meta)),
            errors=list(job.errors),
            tags=list(job.tags),
            state=JobState.EXECUTING,
            attempt=max(job.attempt, 1),
            inserted_at=job.inserted_at or now,
            scheduled_at=job.scheduled_at or now,
            attempted_at=now,
            attempted_by=[TEST_NODE, f"{job.queue}.inline"],
        )
        if job.attempt > job.max_attempts:
            raise ValueError(
                f"attempt {job.attempt} of worker {job.worker!r} is past its max_attempts "
                f"({job.max_attempts})"
            )
        ack = await self._executor().execute(job)
        done = _apply(job, ack, self.app.clock.now())
        return Outcome(_outcome_name(ack), done, ack.error, ack.delay)

    # ----- what was enqueued ----------------------------------------------------------------
    def all_enqueued(
        self,
        worker: WorkerRef | None = None,
        args: dict[str, Any] | None = None,
        queue: str | None = None,
        *,
        meta: dict[str, Any] | None = None,
        tags: Sequence[str] | None = None,
        priority: int | None = None,
        states: Sequence[JobState | str] | None = None,
    ) -> list[Job]:
        """Stored jobs that match, oldest first.

        `args` and `meta` match when they hold the given keys with the given values (other
        keys may be there too); `tags` when the job has all of them. By default only jobs
        still waiting to run count (available, scheduled, retryable); `states` widens that.
        """
        name = None if worker is None else self._worker_name(worker)
        flt = JobFilter(
            workers=[name] if name else None,
            queues=[queue] if queue else None,
            states=list(states) if states is not None else sorted(PENDING_STATES),
        )
        jobs = self.app.list_jobs(flt)
        matched = [
            j
            for j in jobs
            if _subset(args, j.args)
            and _subset(meta, j.meta)
            and (tags is None or set(tags) <= set(j.tags))
            and (priority is None or j.priority == priority)
        ]
        return sorted(matched, key=lambda j: j.id or 0)

    def assert_enqueued(
        self,
        worker: WorkerRef | None = None,
        args: dict[str, Any] | None = None,
        queue: str | None = None,
        **match: Any,
    ) -> Job:
        """Fail unless a matching job is waiting to run; return the oldest match."""
        found = self.all_enqueued(worker, args, queue, **match)
        if not found:
            raise AssertionError(
                f"expected a job {self._describe(worker, args, queue, match)} to be enqueued; "
                + self._nearby(worker, queue)
            )
        return found[0]

    def refute_enqueued(
        self,
        worker: WorkerRef | None = None,
        args: dict[str, Any] | None = None,
        queue: str | None = None,
        **match: Any,
    ) -> None:
        """Fail if a matching job is waiting to run."""
        found = self.all_enqueued(worker, args, queue, **match)
        if found:
            listed = "; ".join(f"#{j.id} {j.worker} {j.args} ({j.state})" for j in found[:10])
            raise AssertionError(
                f"expected no job {self._describe(worker, args, queue, match)} to be enqueued, "
                f"found {len(found)}: {listed}"
            )

    def _worker_name(self, worker: WorkerRef) -> str:
        if isinstance(worker, str):
            return worker
        name = getattr(worker, "name", "")
        if not name:
            raise UnknownWorkerError(
                f"{worker!r} is not a registered worker; decorate it with @app.worker first"
            )
        return str(name)

    def _describe(
        self,
        worker: WorkerRef | None,
        args: dict[str, Any] | None,
        queue: str | None,
        match: dict[str, Any],
    ) -> str:
        parts = []
        if worker is not None:
            parts.append(f"of worker {self._worker_name(worker)!r}")
        if args is not None:
            parts.append(f"with args {args}")
        if queue is not None:
            parts.append(f"in queue {queue!r}")
        parts += [f"with {k}={v!r}" for k, v in match.items()]
        return " ".join(parts) or "of any kind"

    def _nearby(self, worker: WorkerRef | None, queue: str | None) -> str:
        name = None if worker is None else self._worker_name(worker)
        flt = JobFilter(workers=[name] if name else None, limit=10)
        jobs = self.app.list_jobs(flt)
        if not jobs:
            what = f"of worker {name!r}" if name else "at all"
            return f"there are no jobs {what} in the database"
        listed = "; ".join(f"#{j.id} {j.worker} {j.args} queue={j.queue} ({j.state})" for j in jobs)
        return f"the newest jobs{f' of {name!r}' if name else ''} are: {listed}"

    # ----- draining -------------------------------------------------------------------------
    def drain_queue(
        self,
        queue: str = "default",
        *,
        with_scheduled: bool | datetime = False,
        limit: int = DEFAULT_DRAIN_LIMIT,
    ) -> dict[str, int]:
        """Run the queue's jobs one at a time until none are left; return counts by outcome.

        Jobs that jobs enqueue run too. Due scheduled and retryable jobs are made available
        first, as the stager would; `with_scheduled=True` runs every scheduled and retryable
        job however far in the future (so failures are retried until they complete or are
        discarded), and a datetime runs those due by then. Counts are per attempt, keyed by
        OUTCOMES. Raises RuntimeError after `limit` attempts (a job that always snoozes never
        drains with `with_scheduled=True`).
        """

        async def drain() -> dict[str, int]:
            engine = create_engine(self.app.engine.url)
            await engine.open()
            try:
                return await self._adrain(engine, queue, with_scheduled, limit)
            finally:
                await engine.close()
                engine.close_sync()

        return run_sync(drain)

    async def adrain_queue(
        self,
        queue: str = "default",
        *,
        with_scheduled: bool | datetime = False,
        limit: int = DEFAULT_DRAIN_LIMIT,
    ) -> dict[str, int]:
        """Async twin of `drain_queue`, on the app's own engine."""
        await self.app.open()
        return await self._adrain(self.app.engine, queue, with_scheduled, limit)

    async def _adrain(
        self, engine: Engine, queue: str, with_scheduled: bool | datetime, limit: int
    ) -> dict[str, int]:
        if queue not in self.app.queues:
            known = ", ".join(sorted(self.app.queues))
            raise ConfigurationError(
                f"drain_queue({queue!r}): the app has no queue {queue!r} (queues: {known})"
            )
        counts = dict.fromkeys(OUTCOMES, 0)
        clock = self.app.clock
        executor = self._executor()
        ran = 0
        while True:
            now = clock.now() if clock.frozen else None
            if with_scheduled is True:
                stage_until: datetime | None = clock.now() + timedelta(days=365 * 100)
            elif isinstance(with_scheduled, datetime):
                stage_until = with_scheduled
            else:
                stage_until = now
            await engine.stage(DEFAULT_DRAIN_LIMIT, now=stage_until)
            jobs = await engine.fetch(queue, 1, TEST_NODE, f"{queue}.drain", now=now)
            if not jobs:
                return counts
            if ran >= limit:
                raise RuntimeError(
                    f"drain_queue({queue!r}) ran {limit} attempts and jobs remain; a job that "
                    "always snoozes or enqueues itself never drains. Pass a larger limit= or "
                    "drain without with_scheduled=True."
                )
            for job in jobs:
                ack = await executor.execute(job)
                await engine.ack([ack], now=clock.now() if clock.frozen else None)
                counts[_outcome_name(ack)] += 1
                ran += 1


# ----- module-level helpers, on the active KobanTesting or the worker's own app -------------
_active: list[KobanTesting] = []


@contextmanager
def use(app: Koban, mode: Mode | str = "manual") -> Iterator[KobanTesting]:
    """Bind the module-level helpers to `app` for the block (the pytest fixture does this)."""
    testing = KobanTesting(app, mode)
    _active.append(testing)
    try:
        yield testing
    finally:
        _active.remove(testing)
        testing.close()


def _testing_for(worker: WorkerRef | None, app: Koban | None) -> tuple[KobanTesting, bool]:
    if app is not None:
        for testing in reversed(_active):
            if testing.app is app:
                return testing, False
        return KobanTesting(app), True
    if _active:
        return _active[-1], False
    owner = getattr(worker, "app", None)
    if owner is not None:
        return KobanTesting(owner), True
    raise ConfigurationError(
        "koban.testing does not know which app to use: pass app=, use the koban_testing "
        "fixture, or wrap the test in `with koban.testing.use(app):`"
    )


def _call(worker: WorkerRef | None, app: Koban | None, fn: Callable[[KobanTesting], T]) -> T:
    testing, temporary = _testing_for(worker, app)
    try:
        return fn(testing)
    finally:
        if temporary:
            testing.close()


def perform_job(
    worker: WorkerRef,
    args: dict[str, Any] | None = None,
    *,
    app: Koban | None = None,
    **options: Any,
) -> Outcome:
    """Run one attempt of a job for `worker` through the executor; see KobanTesting.perform_job."""
    return _call(worker, app, lambda t: t.perform_job(worker, args, **options))


def assert_enqueued(
    worker: WorkerRef | None = None,
    args: dict[str, Any] | None = None,
    queue: str | None = None,
    *,
    app: Koban | None = None,
    **match: Any,
) -> Job:
    """Fail unless a matching job waits to run; see KobanTesting.assert_enqueued."""
    return _call(worker, app, lambda t: t.assert_enqueued(worker, args, queue, **match))


def refute_enqueued(
    worker: WorkerRef | None = None,
    args: dict[str, Any] | None = None,
    queue: str | None = None,
    *,
    app: Koban | None = None,
    **match: Any,
) -> None:
    """Fail if a matching job waits to run; see KobanTesting.refute_enqueued."""
    _call(worker, app, lambda t: t.refute_enqueued(worker, args, queue, **match))


def all_enqueued(
    worker: WorkerRef | None = None,
    args: dict[str, Any] | None = None,
    queue: str | None = None,
    *,
    app: Koban | None = None,
    **match: Any,
) -> list[Job]:
    """Matching jobs waiting to run, oldest first; see KobanTesting.all_enqueued."""
    return _call(worker, app, lambda t: t.all_enqueued(worker, args, queue, **match))


def drain_queue(
    queue: str = "default",
    *,
    with_scheduled: bool | datetime = False,
    app: Koban | None = None,
    limit: int = DEFAULT_DRAIN_LIMIT,
) -> dict[str, int]:
    """Run a queue's jobs until none are left; see KobanTesting.drain_queue."""
    return _call(
        None, app, lambda t: t.drain_queue(queue, with_scheduled=with_scheduled, limit=limit)
    )
