"""Executor: runs one attempt of one job and turns what happened into an `Ack`.

Async workers run on the event loop; sync workers run in a thread pool so they never block
it. Nothing here writes to the database: the Acker records the outcome.
"""

from __future__ import annotations

import asyncio
import collections
import contextvars
import threading
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Executor as PoolExecutor
from concurrent.futures import Future
from datetime import datetime
from typing import Any

from koban.clock import Clock
from koban.engines.base import Ack
from koban.errors import JobTimeoutError, WorkerProcessDied
from koban.job import Cancel, Discard, Job, JobState, Snooze
from koban.runtime.processes import ProcessPool, child_traceback
from koban.telemetry import Telemetry
from koban.worker import RegisteredWorker


class UnknownWorker(Exception):
    """Raised inside an attempt whose job names a worker this node does not have."""


_WorkItem = tuple["Future[Any]", Callable[..., Any], tuple[Any, ...], dict[str, Any]]
# A job's call handed to a thread by `JobThreads.run`: its asyncio future and the call.
_LoopItem = tuple["asyncio.Future[Any]", Callable[..., Any], tuple[Any, ...]]
_Done = tuple["asyncio.Future[Any]", bool, Any]  # the future, whether fn returned, its outcome


class JobThreads(PoolExecutor):
    """A thread pool for sync jobs whose threads never keep the process alive.

    `concurrent.futures.ThreadPoolExecutor` joins its threads when the interpreter exits, so
    one sync job abandoned after its timeout or after shutdown's grace would hold the process
    until the job returned. These threads are daemons: a job still running at exit is cut
    off, and its row stays `executing` for rescue.

    `run` is the node's path: it hands a call to a thread and gives back an asyncio future.

    At most one idle thread is being woken at a time. A call handed over while a woken thread
    has not yet taken work waits for it; that thread, on taking a call, wakes the next one if
    calls are still waiting. Calls that block get a thread each within a wake-up of one another,
    while a burst of short calls is run by the few threads already awake instead of waking one
    thread per call (each wake-up is a context switch, and a contest for the GIL with the event
    loop). Idle threads are woken newest first, so the rest stay asleep.

    Outcomes are handed back to the event loop in batches: a thread that finishes a call while
    an earlier hand-back is still pending adds to it instead of waking the loop again.
    """

    def __init__(self, max_workers: int, thread_name_prefix: str = "koban-job") -> None:
        self._max_workers = max_workers
        self._prefix = thread_name_prefix
        self._lock = threading.Lock()
        # Under _lock: the calls no thread has taken yet, the idle threads' locks (each held
        # while its thread sleeps on it; released to wake it), and whether a thread has been
        # woken (or started) and not yet taken a call.
        self._calls: collections.deque[_WorkItem | _LoopItem] = collections.deque()
        self._parked: list[threading.Lock] = []
        self._waking = False
        self._threads: list[threading.Thread] = []
        self._shutdown = False
        # Finished calls not yet handed back, per event loop; a loop is a key while a
        # hand-back to it is pending.
        self._done: dict[asyncio.AbstractEventLoop, list[_Done]] = {}
        self._done_lock = threading.Lock()

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        future: Future[Any] = Future()
        self._put((future, fn, args, kwargs))
        return future

    def run(self, fn: Callable[..., Any], *args: Any) -> asyncio.Future[Any]:
        """Call `fn(*args)` in a thread; the result arrives on the running loop's future.

        Cancelling the future before a thread takes the call skips it; cancelling it later
        abandons the call (its thread runs on, and the outcome is dropped).
        """
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._put((future, fn, args))
        return future

    def _put(self, item: _WorkItem | _LoopItem) -> None:
        with self._lock:
            if self._shutdown:
                raise RuntimeError("the node's job threads are shut down")
            self._calls.append(item)
            if not self._waking:
                try:
                    self._wake_one()
                except RuntimeError:  # no thread could be started: the call is not taken
                    self._calls.pop()
                    raise

    def _wake_one(self) -> None:
        """Wake an idle thread, or start one while there are fewer than `max_workers`. With
        every thread busy, the call waits for the first one to finish. Holds `_lock`."""
        if self._parked:
            self._parked.pop().release()
        elif len(self._threads) < self._max_workers:
            thread = threading.Thread(
                target=self._run, name=f"{self._prefix}_{len(self._threads)}", daemon=True
            )
            thread.start()
            self._threads.append(thread)
        else:
            return
        self._waking = True

    def _run(self) -> None:
        parked = threading.Lock()
        parked.acquire()  # held while this thread works; released by whoever wakes it
        woken = True  # a thread starts as the woken one
        while True:
            with self._lock:
                if woken:
                    self._waking = False
                    woken = False
                refused: Sequence[_WorkItem | _LoopItem] = ()  # no list built per call
                if self._calls:
                    item: _WorkItem | _LoopItem | None = self._calls.popleft()
                    if self._calls and not self._waking:
                        try:
                            self._wake_one()
                        except RuntimeError as exc:
                            # No thread could be started for the calls still waiting, and
                            # none would try again: they fail now rather than wait unseen.
                            refused, failure = list(self._calls), exc
                            self._calls.clear()
                elif self._shutdown:
                    if self._parked:
                        self._parked.pop().release()  # the next idle thread exits too
                    return
                else:
                    self._parked.append(parked)
                    item = None
            for call in refused:
                self._refuse(call, failure)
            if item is None:
                parked.acquire()  # sleep until `_wake_one` or shutdown releases it
                woken = True
            elif len(item) == 3:
                self._call_for_loop(item)
            else:
                future, fn, args, kwargs = item
                if future.set_running_or_notify_cancel():
                    try:
                        future.set_result(fn(*args, **kwargs))
                    except BaseException as exc:
                        future.set_exception(exc)
                del future, fn, args, kwargs
            del item

    def _refuse(self, item: _WorkItem | _LoopItem, cause: RuntimeError) -> None:
        """Fail a call no thread could be started for, as `_put` fails its caller."""
        error = RuntimeError(
            f"no thread could be started for this sync job ({cause}); the node runs "
            f"{len(self._threads)} job threads: lower the slots of its sync queues or raise "
            "the system's limit on threads (the job is retried)"
        )
        error.__cause__ = cause
        if len(item) == 3:
            self._hand_back((item[0], False, error))
        elif item[0].set_running_or_notify_cancel():
            item[0].set_exception(error)

    def _call_for_loop(self, item: _LoopItem) -> None:
        future, fn, args = item
        if future.cancelled():  # abandoned before it started (read racily; harmless)
            return
        try:
            done: _Done = (future, True, fn(*args))
        except StopIteration as exc:
            # A future cannot hold StopIteration (Python 3.11 raises TypeError): as 3.12 does.
            error = RuntimeError(f"the job raised StopIteration: {exc}")
            error.__cause__ = exc
            done = (future, False, error)
        except BaseException as exc:
            done = (future, False, exc)
        self._hand_back(done)

    def _hand_back(self, done: _Done) -> None:
        """Give a finished call's outcome to its future's loop, in a batch with any other
        outcome still waiting for that loop."""
        future = done[0]
        loop = future.get_loop()
        with self._done_lock:
            pending = self._done.get(loop)
            if pending is None:
                self._done[loop] = [done]
            else:
                pending.append(done)
        if pending is None:
            try:
                loop.call_soon_threadsafe(self._drain, loop)
            except RuntimeError:  # the loop is closed: nobody waits for the outcome
                with self._done_lock:
                    self._done.pop(loop, None)

    def _drain(self, loop: asyncio.AbstractEventLoop) -> None:
        """On `loop`: resolve every future whose call has finished since the last drain."""
        with self._done_lock:
            done = self._done.pop(loop, [])
        for future, ok, value in done:
            if future.cancelled():
                continue
            try:
                if ok:
                    future.set_result(value)
                else:
                    future.set_exception(value)
            except Exception as exc:  # never let one outcome strand the rest of the batch
                if not future.done():
                    failed = RuntimeError(f"the job's outcome could not be handed back: {exc}")
                    future.set_exception(failed)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        with self._lock:
            self._shutdown = True
            if cancel_futures:
                while self._calls:
                    self._calls.popleft()[0].cancel()
            # Threads run the calls still waiting, then exit; an idle one is woken to exit,
            # and wakes the next as it goes.
            if self._parked and not self._waking:
                self._parked.pop().release()
                self._waking = True
        if wait:
            for thread in self._threads:
                thread.join()


def _error_entry(job: Job, exc: BaseException, at: datetime, tb: str | None) -> dict[str, Any]:
    return {
        "attempt": job.attempt,
        "at": at.isoformat(),
        "type": f"{type(exc).__module__}.{type(exc).__qualname__}".removeprefix("builtins."),
        "message": str(exc),
        "traceback": tb,
    }


class Executor:
    """Runs jobs for one node."""

    def __init__(
        self,
        workers: Mapping[str, RegisteredWorker],
        telemetry: Telemetry,
        clock: Clock,
        threads: PoolExecutor,
        processes: ProcessPool | None = None,
    ) -> None:
        self.workers = workers
        self.telemetry = telemetry
        self.clock = clock
        self.threads = threads
        #: Runs executor="process" workers; without one (koban.testing) they run in a thread.
        self.processes = processes

    async def execute(self, job: Job) -> Ack:
        """Run one attempt. Re-raises CancelledError unless the job itself was cancelled."""
        started = time.perf_counter()
        if self.telemetry.listening("job:start"):
            self.telemetry.emit("job:start", job=job, queue=job.queue, queue_wait=_queue_wait(job))
        registered = self.workers.get(job.worker)
        try:
            if registered is None:
                raise UnknownWorker(
                    f"unknown worker {job.worker!r}: no worker of that name is registered on "
                    "this node; deploy the code that defines it (the job will be retried)"
                )
            options = registered.options
            if options.timeout is None and registered.is_async and options.executor != "process":
                # The common case: no deadline to enforce (a timeout scope per job cost ~5% of
                # no-op throughput) and no thread or process to hand the job to.
                result = await registered.make_perform()(job)
            else:
                result = await self._perform(registered, job)
        except asyncio.CancelledError:
            if not job.cancelled:
                raise
            return self._finish(job, started, Cancel("cancelled while executing"))
        except Exception as exc:
            tb = (
                None
                if isinstance(exc, JobTimeoutError | WorkerProcessDied)
                else child_traceback(exc) or "".join(traceback.format_exception(exc))
            )
            return self._fail(job, registered, exc, tb, started)
        return self._finish(job, started, result)

    async def _perform(self, registered: RegisteredWorker, job: Job) -> Any:
        if registered.options.executor == "process" and self.processes is not None:
            # The pool enforces the timeout itself, by killing the job's process.
            return await self.processes.run(registered, job)
        # Async jobs without a timeout never get here (`execute` awaits them directly).
        perform = registered.make_perform()
        timeout = registered.options.timeout
        if not registered.is_async:
            call = self._in_thread(perform, job)
            if timeout is None:
                # Cancelling the wait abandons the thread's call rather than waiting for it.
                return await call
        try:
            async with asyncio.timeout(timeout) as deadline:
                if registered.is_async:
                    return await perform(job)
                # The deadline cancels the wait: the thread's call is abandoned, not awaited.
                return await call
        except TimeoutError:
            if deadline.expired():
                if job._cancel_event is None:
                    job._cancel_event = threading.Event()
                job._cancel_event.set()  # let an abandoned thread stop at a safe point
                raise JobTimeoutError(
                    f"job {job.id} of worker {job.worker!r} ran past its timeout of {timeout} s"
                    + ("" if registered.is_async else "; its thread was abandoned")
                ) from None
            raise

    def _in_thread(self, perform: Callable[[Job], Any], job: Job) -> asyncio.Future[Any]:
        """Start a sync job in the node's threads, in a copy of the caller's context."""
        run = contextvars.copy_context().run
        if isinstance(self.threads, JobThreads):
            return self.threads.run(run, perform, job)
        return asyncio.get_running_loop().run_in_executor(self.threads, run, perform, job)

    def _finish(self, job: Job, started: float, result: Any) -> Ack:
        duration = time.perf_counter() - started
        if result is None:  # what most jobs return
            ack = Ack(job.id or 0, job.attempt, JobState.COMPLETED)
            outcome = "completed"
        elif isinstance(result, Snooze):
            ack = Ack(
                job.id or 0,
                job.attempt,
                JobState.SCHEDULED,
                delay=max(0.0, float(result.seconds)),
                snooze=True,
            )
            outcome = "snoozed"
        elif isinstance(result, Cancel):
            ack = Ack(
                job.id or 0,
                job.attempt,
                JobState.CANCELLED,
                error=self._reason(job, "koban.Cancel", result.reason, self.clock.now()),
            )
            outcome = "cancelled"
        elif isinstance(result, Discard):
            ack = Ack(
                job.id or 0,
                job.attempt,
                JobState.DISCARDED,
                error=self._reason(job, "koban.Discard", result.reason, self.clock.now()),
            )
            outcome = "discarded"
        else:
            ack = Ack(job.id or 0, job.attempt, JobState.COMPLETED)
            outcome = "completed"
        self._emit_end("job:stop", job, duration, outcome)
        return ack

    def _emit_end(self, event: str, job: Job, duration: float, state: str, **extra: Any) -> None:
        """Report how an attempt ended, if anyone listens."""
        if self.telemetry.listening(event):
            self.telemetry.emit(
                event,
                job=job,
                queue=job.queue,
                queue_wait=_queue_wait(job),
                duration=duration,
                state=state,
                **extra,
            )

    @staticmethod
    def _reason(job: Job, kind: str, reason: str, now: datetime) -> dict[str, Any]:
        return {
            "attempt": job.attempt,
            "at": now.isoformat(),
            "type": kind,
            "message": reason,
            "traceback": None,
        }

    def _fail(
        self,
        job: Job,
        registered: RegisteredWorker | None,
        exc: BaseException,
        tb: str | None,
        started: float,
    ) -> Ack:
        duration = time.perf_counter() - started
        error = _error_entry(job, exc, self.clock.now(), tb)
        if job.attempt >= job.max_attempts:
            ack = Ack(job.id or 0, job.attempt, JobState.DISCARDED, error=error)
        else:
            try:
                delay = registered.backoff(job) if registered else _default_backoff(job)
                delay = max(0.0, float(delay))
            except Exception as backoff_exc:
                error["backoff_error"] = f"{type(backoff_exc).__name__}: {backoff_exc}"
                delay = _default_backoff(job)
            ack = Ack(job.id or 0, job.attempt, JobState.RETRYABLE, delay=delay, error=error)
        self._emit_end(
            "job:exception",
            job,
            duration,
            str(ack.state),
            error=f"{error['type']}: {error['message']}",
            traceback=tb,
        )
        return ack


def _queue_wait(job: Job) -> float:
    """Seconds from when the job was due to when this attempt started."""
    if job.attempted_at is None or job.scheduled_at is None:
        return 0.0
    return max(0.0, (job.attempted_at - job.scheduled_at).total_seconds())


def _default_backoff(job: Job) -> float:
    from koban.backoff import exponential

    return exponential(job.attempt)
