"""Producer: keeps one queue's slots busy on one node.

It claims up to its free slots in one fetch (at most `MAX_FETCH` rows), hands each job to the
Executor, queues the outcome with the Acker, and fetches again when slots free up, when a
notification says jobs arrived, or when its poll interval passes. While a full fetch leaves
slots free, the next fetches go out at once (up to `MAX_CLAIMS` in flight), before this
batch's jobs are even built: the database claims the next batches while the node starts and
runs this one.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import sys
import uuid
from collections.abc import Callable, Coroutine, Sequence
from datetime import datetime
from typing import Any

from koban.clock import Clock
from koban.engines.base import Engine
from koban.job import Job
from koban.runtime.acker import Acker
from koban.runtime.executor import Executor

log = logging.getLogger("koban.producer")

#: The most jobs one fetch claims. A queue with more free slots fetches again at once, so a
#: large queue keeps one fetch in flight while the last batch runs instead of claiming every
#: slot in one statement and then leaving the database idle while it runs them. 300 rather
#: than 100: a claim and an outcome statement cost the database ~12% less per job at 200 rows
#: than at 100, and a no-op burn-down ran ~1.2 times faster at 200 and ~1.07 times faster again
#: at 300; 400 and 500 gained nothing more (bench/README.md).
MAX_FETCH = 300

#: The most claims one producer keeps in flight, each on a connection of its own. With slots
#: free for them, the database claims the next batches while the node runs the last one.
MAX_CLAIMS = 2


def _job_task(coro: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
    """A job's task. On Python 3.12 and newer it starts eagerly: the job runs at once, up to
    its first wait, and a job that never waits finishes without being scheduled on the loop
    (on a no-op burn-down the node spent ~16% less CPU per job). Not when the application set
    a task factory of its own, which decides how tasks are made."""
    loop = asyncio.get_running_loop()
    if sys.version_info >= (3, 12) and loop.get_task_factory() is None:
        return asyncio.Task(coro, loop=loop, name=name, eager_start=True)
    return loop.create_task(coro, name=name)


class Producer:
    def __init__(
        self,
        *,
        queue: str,
        limit: int,
        node: str,
        engine: Engine,
        executor: Executor,
        acker: Acker,
        clock: Clock,
        poll_interval: Callable[[], float],
        paused: bool = False,
    ) -> None:
        self.queue = queue
        self.limit = limit
        self.node = node
        self.id = f"{queue}.{uuid.uuid4().hex[:8]}"
        self.engine = engine
        self.executor = executor
        self.acker = acker
        self.clock = clock
        self.poll_interval = poll_interval
        self.paused = paused
        self.running: dict[int, tuple[Job, asyncio.Task[None]]] = {}
        self._wake = asyncio.Event()
        self._fetching = True
        self._look = True  # fetch at the next chance
        self._more = True  # the last fetch filled every slot it asked for
        self._all_done = asyncio.Event()
        self._all_done.set()
        self._failing = False

    # ----- control --------------------------------------------------------------------------
    def wake(self) -> None:
        """Fetch soon: jobs may have arrived."""
        self._look = True
        self._wake.set()

    def pause(self) -> None:
        self.paused = True

    def resume(self) -> None:
        self.paused = False
        self.wake()

    def scale(self, limit: int) -> None:
        self.limit = max(0, int(limit))
        self.wake()

    def cancel(self, job_id: int) -> bool:
        """Stop a running job: async tasks are cancelled, sync jobs see `job.cancelled`."""
        entry = self.running.get(job_id)
        if entry is None:
            return False
        job, task = entry
        if job._cancel_event is None:
            import threading

            job._cancel_event = threading.Event()
        job._cancel_event.set()
        task.cancel()
        return True

    def stop_fetching(self) -> None:
        self._fetching = False
        self._wake.set()

    @property
    def free(self) -> int:
        return max(0, self.limit - len(self.running))

    # ----- loop -----------------------------------------------------------------------------
    async def run(self) -> None:
        """Fetch and start jobs until `stop_fetching`; running jobs are left to finish.

        Up to `MAX_CLAIMS` claims are in flight, and together they never ask for more than the
        slots left free by the jobs running: a queue never runs more jobs than its limit. A
        claim that returns full while slots stay free sends the next claims before this
        batch's jobs are built and started, so the database claims the next batches while the
        node handles this one. Claims are taken in the order they were sent.
        """
        delay = 0.1
        claims: collections.deque[tuple[asyncio.Task[Sequence[Any]], int]] = collections.deque()
        try:
            while self._fetching or claims:
                self._wake.clear()
                if not claims:
                    asked = 0 if self.paused else min(self.free, MAX_FETCH)
                    if not (asked and self._look):
                        if not await self._sleep(self.poll_interval()):
                            self._look = True  # the poll interval passed: look again
                        else:
                            # Let a burst of finishing jobs free their slots before the next
                            # fetch.
                            await asyncio.sleep(0)
                        continue
                    # Consumed before the claim, so a wake-up arriving during it is not lost.
                    self._look = False
                    claims.append((self._claim(asked), asked))
                claim, asked = claims[0]
                try:
                    rows = await claim
                except Exception as exc:
                    claims.popleft()
                    self._log_failure(exc)
                    self._look = True
                    if self._fetching and not claims:
                        await self._sleep(delay)
                    delay = min(delay * 2, 5.0)
                    continue
                claims.popleft()
                if self._failing:
                    log.info("queue %r on node %s is fetching again", self.queue, self.node)
                    self._failing = False
                delay = 0.1
                # A full batch means more may be waiting. With slots left free beside it and
                # the claims still in flight, claim the next batches now, before building this
                # one's jobs, and let the claims send their statements.
                more = len(rows) == asked
                left = self.free - len(rows) - sum(n for _c, n in claims)
                sent = False
                while (
                    more
                    and left > 0
                    and len(claims) < MAX_CLAIMS
                    and self._fetching
                    and not self.paused
                ):
                    n = min(left, MAX_FETCH)
                    claims.append((self._claim(n), n))
                    left -= n
                    sent = True
                if sent:
                    await asyncio.sleep(0)
                # Set before the jobs start: one that starts eagerly may end inside `_start`,
                # and its end asks for the next claim only if this batch was full.
                self._more = more
                for job in self.engine.claimed_jobs(rows):
                    self._start(job)
        finally:
            for claim, _n in claims:  # cancelled with claims in flight
                claim.cancel()

    def _claim(self, limit: int) -> asyncio.Task[Sequence[Any]]:
        return asyncio.ensure_future(
            self.engine.claim(self.queue, limit, self.node, self.id, now=self._now())
        )

    async def _sleep(self, seconds: float) -> bool:
        """Wait for a wake-up or `seconds`; True if woken."""
        try:
            await asyncio.wait_for(self._wake.wait(), seconds)
            return True
        except TimeoutError:
            return False

    def _now(self) -> datetime | None:
        return self.clock.now() if self.clock.frozen else None

    def _log_failure(self, exc: Exception) -> None:
        if not self._failing:
            log.warning(
                "queue %r on node %s cannot fetch jobs (%s: %s); retrying with backoff",
                self.queue,
                self.node,
                type(exc).__name__,
                str(exc).strip().splitlines()[0] if str(exc).strip() else "",
            )
            self._failing = True

    def _start(self, job: Job) -> None:
        assert job.id is not None
        task = _job_task(self._execute(job), f"koban-job-{job.id}")
        if task.done():
            # Started eagerly and ran to its end without waiting: outcome queued, slot free.
            return
        self.running[job.id] = (job, task)
        self._all_done.clear()

    async def _execute(self, job: Job) -> None:
        try:
            ack = await self.executor.execute(job)
        except asyncio.CancelledError:
            # Shutdown ran out of grace: leave the job executing, for rescue. Never ack it.
            raise
        except Exception:  # pragma: no cover - the executor turns errors into acks
            log.exception("job %s: executor failed; leaving it for rescue", job.id)
        else:
            self.acker.add(ack)
        finally:
            self.running.pop(job.id or 0, None)
            if not self.running:
                self._all_done.set()
            if self._more:
                # A slot opened and the last fetch was full: jobs left behind can run now.
                self._look = True
                self._wake.set()

    async def wait_idle(self, timeout: float) -> bool:
        """Wait until no job is running; False if `timeout` passed first."""
        try:
            await asyncio.wait_for(self._all_done.wait(), timeout)
            return True
        except TimeoutError:
            return False

    async def abandon(self) -> list[int]:
        """Cancel jobs still running after shutdown's grace; they stay executing for rescue."""
        ids = list(self.running)
        for _job, task in list(self.running.values()):
            task.cancel()
        await asyncio.gather(*(t for _j, t in list(self.running.values())), return_exceptions=True)
        return ids
