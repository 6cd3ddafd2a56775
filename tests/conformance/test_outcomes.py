"""Every outcome of a run, through a real node (`async with app:`)."""

from __future__ import annotations

import asyncio
import inspect
import sys
import threading
from collections.abc import Sequence
from datetime import timedelta

import pytest

import koban
import koban.runtime.node as node_module
from helpers import T0, AppFactory, await_until, wait_for_state
from koban import Job, JobState
from koban.plugins.stager import Stager
from koban.runtime.producer import MAX_CLAIMS, MAX_FETCH


def seconds_after_t0(value: object) -> float:
    return (value - T0).total_seconds()  # type: ignore[operator]


async def test_function_and_class_workers_complete_sync_and_async(app: koban.Koban) -> None:
    loop_thread = threading.get_ident()
    ran_on: dict[str, int] = {}

    @app.worker
    async def async_fn(job: Job) -> None:
        ran_on["async_fn"] = threading.get_ident()

    @app.worker
    def sync_fn(job: Job) -> None:
        ran_on["sync_fn"] = threading.get_ident()

    @app.worker
    class AsyncClass(koban.Worker):
        async def perform(self, job: Job) -> None:
            ran_on["AsyncClass"] = threading.get_ident()

    @app.worker
    class SyncClass(koban.Worker):
        def perform(self, job: Job) -> None:
            ran_on["SyncClass"] = threading.get_ident()

    async with app:
        jobs = [
            await async_fn.aenqueue(),
            await sync_fn.aenqueue(),
            await AsyncClass.aenqueue(),
            await SyncClass.aenqueue(),
        ]
        done = [await wait_for_state(app, j.id or 0, JobState.COMPLETED) for j in jobs]

    for job in done:
        assert job.attempt == 1
        assert job.completed_at is not None and job.attempted_at is not None
        assert job.errors == []
        assert job.attempted_by is not None and len(job.attempted_by) == 2
    assert ran_on["async_fn"] == loop_thread and ran_on["AsyncClass"] == loop_thread
    # Sync code never runs on the event loop.
    assert ran_on["sync_fn"] != loop_thread and ran_on["SyncClass"] != loop_thread


async def test_completed_job_records_the_node_that_ran_it(apps: AppFactory) -> None:
    app = apps(node="node-under-test")

    @app.worker
    async def noop(job: Job) -> None: ...

    async with app:
        job = await noop.aenqueue()
        done = await wait_for_state(app, job.id or 0, JobState.COMPLETED)

    assert done.attempted_by is not None
    assert done.attempted_by[0] == "node-under-test"
    assert done.attempted_by[1].startswith("default")


async def test_raise_makes_the_job_retryable_with_backoff_and_an_error_entry(
    apps: AppFactory, clock: koban.FrozenClock
) -> None:
    app = apps(clock=clock)

    @app.worker(max_attempts=3)
    async def flaky(job: Job) -> None:
        raise ValueError("boom")

    async with app:
        job = await flaky.aenqueue({"x": 1})
        failed = await wait_for_state(app, job.id or 0, JobState.RETRYABLE)

    assert failed.attempt == 1
    # Default backoff after attempt 1: 15 + 2**1 seconds, within ±10% jitter.
    assert 17 * 0.9 - 1e-3 <= seconds_after_t0(failed.scheduled_at) <= 17 * 1.1 + 1e-3
    [error] = failed.errors
    assert error["attempt"] == 1
    assert error["type"] == "ValueError"
    assert error["message"] == "boom"
    assert "ValueError: boom" in error["traceback"] and "in flaky" in error["traceback"]
    assert error["at"]


async def test_last_attempt_failure_discards(app: koban.Koban) -> None:
    @app.worker(max_attempts=1)
    def broken(job: Job) -> None:
        raise RuntimeError("cannot go on")

    async with app:
        job = await broken.aenqueue()
        done = await wait_for_state(app, job.id or 0, JobState.DISCARDED)

    assert done.attempt == 1 and done.discarded_at is not None
    assert [(e["type"], e["message"]) for e in done.errors] == [("RuntimeError", "cannot go on")]


async def test_retries_run_again_until_attempts_are_used_up(
    apps: AppFactory, fast_stager: Stager
) -> None:
    app = apps(plugins=[fast_stager])
    runs: list[int] = []

    @app.worker(max_attempts=3, backoff=lambda job: 0.0)
    async def always_fails(job: Job) -> None:
        runs.append(job.attempt)
        raise KeyError(f"attempt {job.attempt}")

    async with app:
        job = await always_fails.aenqueue()
        done = await wait_for_state(app, job.id or 0, JobState.DISCARDED)

    assert runs == [1, 2, 3]
    assert done.attempt == 3
    assert [e["attempt"] for e in done.errors] == [1, 2, 3]
    assert {e["type"] for e in done.errors} == {"KeyError"}


async def test_a_retried_job_can_succeed(apps: AppFactory, fast_stager: Stager) -> None:
    app = apps(plugins=[fast_stager])

    @app.worker(max_attempts=5, backoff=lambda job: 0.0)
    def second_time_lucky(job: Job) -> None:
        if job.attempt < 2:
            raise ConnectionError("upstream down")

    async with app:
        job = await second_time_lucky.aenqueue()
        done = await wait_for_state(app, job.id or 0, JobState.COMPLETED)

    assert done.attempt == 2
    assert [e["type"] for e in done.errors] == ["ConnectionError"]


async def test_custom_backoff_per_worker(apps: AppFactory, clock: koban.FrozenClock) -> None:
    app = apps(clock=clock)

    @app.worker(backoff=lambda job: 42.0 * job.attempt)
    async def fn_backoff(job: Job) -> None:
        raise ValueError("x")

    @app.worker
    class ClassBackoff(koban.Worker):
        def perform(self, job: Job) -> None:
            raise ValueError("y")

        def backoff(self, job: Job) -> float:
            return 7.0

    async with app:
        a = await fn_backoff.aenqueue()
        b = await ClassBackoff.aenqueue()
        a_done = await wait_for_state(app, a.id or 0, JobState.RETRYABLE)
        b_done = await wait_for_state(app, b.id or 0, JobState.RETRYABLE)

    assert abs(seconds_after_t0(a_done.scheduled_at) - 42.0) < 1e-3
    assert abs(seconds_after_t0(b_done.scheduled_at) - 7.0) < 1e-3


async def test_snooze_reschedules_without_using_an_attempt(
    apps: AppFactory, clock: koban.FrozenClock, fast_stager: Stager
) -> None:
    app = apps(clock=clock, plugins=[fast_stager])
    seen: list[tuple[int, dict[str, object]]] = []

    @app.worker(max_attempts=1)
    async def poll_export(job: Job) -> koban.Snooze | None:
        seen.append((job.attempt, dict(job.meta)))
        return None if job.meta.get("snoozed") else koban.Snooze(60)

    async with app:
        job = await poll_export.aenqueue(meta={"kind": "export"})
        snoozed = await wait_for_state(app, job.id or 0, JobState.SCHEDULED)
        assert snoozed.attempt == 0  # given back: max_attempts=1 still allows the next run
        assert snoozed.meta == {"kind": "export", "snoozed": 1}
        assert abs(seconds_after_t0(snoozed.scheduled_at) - 60) < 1e-3
        assert snoozed.errors == []

        clock.advance(61)
        done = await wait_for_state(app, job.id or 0, JobState.COMPLETED)

    assert done.attempt == 1
    assert seen == [(1, {"kind": "export"}), (1, {"kind": "export", "snoozed": 1})]


async def test_cancel_and_discard_return_values(app: koban.Koban) -> None:
    @app.worker(max_attempts=10)
    async def stop_it(job: Job) -> koban.Cancel:
        return koban.Cancel("customer closed the account")

    @app.worker(max_attempts=10)
    def give_up(job: Job) -> koban.Discard:
        return koban.Discard("malformed payload")

    async with app:
        a = await stop_it.aenqueue()
        b = await give_up.aenqueue()
        cancelled = await wait_for_state(app, a.id or 0, JobState.CANCELLED)
        discarded = await wait_for_state(app, b.id or 0, JobState.DISCARDED)

    assert cancelled.cancelled_at is not None and cancelled.attempt == 1
    assert "customer closed the account" in [e["message"] for e in cancelled.errors]
    assert discarded.discarded_at is not None and discarded.attempt == 1
    assert "malformed payload" in [e["message"] for e in discarded.errors]


async def test_async_timeout_cancels_the_job(app: koban.Koban) -> None:
    cancelled = asyncio.Event()

    @app.worker(timeout=0.2, max_attempts=3)
    async def hangs(job: Job) -> None:
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    async with app:
        job = await hangs.aenqueue()
        failed = await wait_for_state(app, job.id or 0, JobState.RETRYABLE)

    assert cancelled.is_set()
    [error] = failed.errors
    assert error["type"].endswith("JobTimeoutError")
    assert "timeout" in error["message"] and str(job.id) in error["message"]


async def test_sync_timeout_abandons_the_thread_and_records_a_timeout(app: koban.Koban) -> None:
    release = threading.Event()
    saw_cancelled: list[bool] = []

    @app.worker(timeout=0.2, max_attempts=3)
    def blocks(job: Job) -> None:
        release.wait(30)
        saw_cancelled.append(job.cancelled)

    async with app:
        job = await blocks.aenqueue()
        # Recorded while the thread is still blocked: the node did not wait for it.
        failed = await wait_for_state(app, job.id or 0, JobState.RETRYABLE)
        assert not release.is_set() and saw_cancelled == []
        release.set()

    [error] = failed.errors
    assert error["type"].endswith("JobTimeoutError")
    assert "abandoned" in error["message"]
    # The abandoned thread can see it should stop at its next safe point.
    await await_until(lambda: saw_cancelled, what="the abandoned thread to finish")
    assert saw_cancelled == [True]


async def test_unknown_worker_fails_the_attempt_and_is_retried(app: koban.Koban) -> None:
    async with app:
        job = await app.aenqueue(Job(worker="billing.jobs.retired_worker", max_attempts=5))
        failed = await wait_for_state(app, job.id or 0, JobState.RETRYABLE)

    assert failed.attempt == 1 and failed.max_attempts == 5
    [error] = failed.errors
    assert error["message"].startswith("unknown worker 'billing.jobs.retired_worker'")
    assert failed.scheduled_at is not None and failed.scheduled_at > (failed.attempted_at or T0)


async def test_node_runs_only_its_queues_within_slot_limits(apps: AppFactory) -> None:
    app = apps(queues={"default": 2})
    gate = asyncio.Event()
    running: list[int] = []
    peak: list[int] = [0]

    @app.worker
    async def wide(job: Job) -> None:
        running.append(job.id or 0)
        peak[0] = max(peak[0], len(running))
        await gate.wait()
        running.remove(job.id or 0)

    @app.worker(queue="elsewhere")
    async def other(job: Job) -> None: ...

    async with app:
        stranger = await other.aenqueue()
        jobs = await app.aenqueue_many(wide.new({"i": i}) for i in range(5))
        for j in jobs[:2]:
            await wait_for_state(app, j.id or 0, JobState.EXECUTING)
        executing = await app.alist_jobs(states=["executing"])
        assert len(executing) == 2  # the queue's 2 slots, no more
        gate.set()
        for j in jobs:
            await wait_for_state(app, j.id or 0, JobState.COMPLETED)
        idle = await app.aget_job(stranger.id or 0)

    assert peak[0] == 2
    assert idle is not None and idle.state is JobState.AVAILABLE


async def test_a_queue_wider_than_one_fetch_fills_every_slot_without_waiting(
    apps: AppFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each claim takes at most MAX_FETCH jobs; while slots stay free after a full claim, the
    producer claims again at once, not when a job finishes or its poll interval passes: up to
    MAX_CLAIMS claims in flight, sent before it builds the jobs of the batch just claimed."""
    assert MAX_CLAIMS == 2  # the sequence below is worked out for two claims in flight
    slots = 3 * MAX_FETCH + 50
    app = apps(queues={"default": slots})
    # No poll may fill the slots within the test: only the producer's own refetching can.
    monkeypatch.setattr(node_module, "HEALTHY_POLL", 3600.0)
    monkeypatch.setattr(app.engine, "poll_interval", 3600.0)
    steps: list[tuple[str, int]] = []
    in_flight = [0, 0]  # now, most at once
    claim, claimed_jobs = app.engine.claim, app.engine.claimed_jobs

    async def spy(queue: str, limit: int, *args: object, **kwargs: object) -> Sequence[object]:
        steps.append(("claim", limit))
        in_flight[0] += 1
        in_flight[1] = max(in_flight)
        try:
            return await claim(queue, limit, *args, **kwargs)
        finally:
            in_flight[0] -= 1

    def build_spy(rows: Sequence[object]) -> list[Job]:
        steps.append(("build", len(rows)))
        return claimed_jobs(rows)

    monkeypatch.setattr(app.engine, "claim", spy)
    monkeypatch.setattr(app.engine, "claimed_jobs", build_spy)
    gate = asyncio.Event()
    running: set[int] = set()

    @app.worker
    async def held(job: Job) -> None:
        running.add(job.id or 0)
        await gate.wait()

    jobs = await app.aenqueue_many(held.new({"i": i}) for i in range(slots + 10))
    async with app:
        # No job finishes until the gate opens, so every slot is filled by back-to-back claims.
        await await_until(lambda: len(running) >= slots, what=f"{slots} jobs running")
        executing = await app.alist_jobs(states=["executing"], limit=1000)
        assert len(executing) == slots  # never past the queue's slots
        gate.set()
        for j in jobs:
            await wait_for_state(app, j.id or 0, JobState.COMPLETED)

    assert max(limit for step, limit in steps if step == "claim") <= MAX_FETCH
    assert in_flight[1] == MAX_CLAIMS
    # The next claims went out before the batch before them was built into jobs, and together
    # they never asked for more than the slots left free.
    assert steps[:8] == [
        ("claim", MAX_FETCH),
        ("claim", MAX_FETCH),
        ("claim", MAX_FETCH),
        ("build", MAX_FETCH),
        ("claim", 50),
        ("build", MAX_FETCH),
        ("build", MAX_FETCH),
        ("build", 50),
    ]


async def test_jobs_claimed_while_the_node_stops_still_run(
    apps: AppFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A claim sent ahead, still in flight when the node is told to stop, is waited for: its
    jobs run and are recorded, none is left executing, and no claim goes out after it."""
    app = apps(queues={"default": 2 * MAX_FETCH})
    monkeypatch.setattr(node_module, "HEALTHY_POLL", 3600.0)
    monkeypatch.setattr(app.engine, "poll_interval", 3600.0)
    claim = app.engine.claim
    asked: list[int] = []
    second_sent, release = asyncio.Event(), asyncio.Event()

    async def spy(queue: str, limit: int, *args: object, **kwargs: object) -> Sequence[object]:
        asked.append(limit)
        if len(asked) == 2:
            # The stop arrives as the claim goes out, before the last batch's jobs start.
            assert app.node is not None
            app.node.producers["default"].stop_fetching()
            second_sent.set()
            await release.wait()
        return await claim(queue, limit, *args, **kwargs)

    monkeypatch.setattr(app.engine, "claim", spy)
    ran: list[int] = []

    @app.worker
    async def noop(job: Job) -> None:
        ran.append(job.id or 0)

    await app.aenqueue_many(noop.new({"i": i}) for i in range(2 * MAX_FETCH + 50))
    await app.start()
    await asyncio.wait_for(second_sent.wait(), 10)
    stopping = asyncio.create_task(app.stop(grace=10))
    await asyncio.sleep(0.2)
    assert not stopping.done()  # the stop waits for the claim in flight
    release.set()
    await asyncio.wait_for(stopping, 20)

    assert asked == [MAX_FETCH, MAX_FETCH]
    assert len(ran) == 2 * MAX_FETCH
    assert len(await app.alist_jobs(states=["completed"], limit=1000)) == 2 * MAX_FETCH
    assert await app.alist_jobs(states=["executing"]) == []
    assert len(await app.alist_jobs(states=["available"], limit=1000)) == 50


async def test_each_job_runs_in_a_task_of_its_own_started_eagerly_on_python_3_12(
    app: koban.Koban,
) -> None:
    """On Python 3.12 and newer a job's task starts eagerly, inside the producer's `_start`: a
    job that never waits ends there and is never tracked as running; one that waits is tracked
    until it ends. On 3.11 every job starts from the event loop. Either way each job has its
    own task, named after it, and no finished job stays counted as running."""
    eager = sys.version_info >= (3, 12)
    seen: list[tuple[int, str, bool]] = []
    gate = asyncio.Event()

    def record(job: Job) -> None:
        task = asyncio.current_task()
        in_start = any(f.function == "_start" for f in inspect.stack())
        seen.append((job.id or 0, task.get_name() if task else "", in_start))

    @app.worker
    async def quick(job: Job) -> None:
        record(job)

    @app.worker
    async def waits(job: Job) -> None:
        record(job)
        await gate.wait()

    async with app:
        assert app.node is not None
        producer = app.node.producers["default"]
        waiting = await waits.aenqueue()
        await await_until(lambda: len(seen) == 1)
        assert list(producer.running) == [waiting.id]
        done = [await quick.aenqueue() for _ in range(3)]
        for job in done:
            await wait_for_state(app, job.id or 0, JobState.COMPLETED)
        assert list(producer.running) == [waiting.id]
        gate.set()
        await wait_for_state(app, waiting.id or 0, JobState.COMPLETED)
        assert await producer.wait_idle(5)
        assert producer.running == {}

    assert sorted(seen) == sorted(
        (job.id or 0, f"koban-job-{job.id}", eager) for job in [waiting, *done]
    )


async def test_a_full_claim_after_a_partial_one_claims_again_when_its_jobs_end(
    apps: AppFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A claim that fills every free slot leaves none for a claim ahead; when its jobs end
    (at once, where they start eagerly) the producer claims again without waiting for its poll
    interval, even if the claim before it came back short."""
    app = apps(queues={"default": 10})
    monkeypatch.setattr(node_module, "HEALTHY_POLL", 3600.0)
    monkeypatch.setattr(app.engine, "poll_interval", 3600.0)

    @app.worker
    async def noop(job: Job) -> None: ...

    async with app:
        first = await app.aenqueue_many(noop.new({"i": i}) for i in range(5))
        for job in first:
            await wait_for_state(app, job.id or 0, JobState.COMPLETED)
        # The claim that ran these came back short: 5 of the 10 it asked for.
        rest = await app.aenqueue_many(noop.new({"i": i}) for i in range(25))
        for job in rest:
            await wait_for_state(app, job.id or 0, JobState.COMPLETED)


async def test_scheduled_at_in_the_past_runs_at_once_and_future_waits(app: koban.Koban) -> None:
    @app.worker
    async def noop(job: Job) -> None: ...

    async with app:
        later = await noop.aenqueue(schedule_in=3600)
        now_job = await noop.aenqueue()
        await wait_for_state(app, now_job.id or 0, JobState.COMPLETED)
        still = await app.aget_job(later.id or 0)

    assert still is not None and still.state is JobState.SCHEDULED


async def test_schedule_in_zero_is_available(app: koban.Koban) -> None:
    @app.worker
    async def noop(job: Job) -> None: ...

    job = await noop.aenqueue(schedule_in=0)
    assert job.state is JobState.AVAILABLE
    assert job.scheduled_at is not None and job.inserted_at is not None
    assert abs((job.scheduled_at - job.inserted_at) / timedelta(seconds=1)) < 1e-3
