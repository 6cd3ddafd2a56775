"""The node's thread pool for sync jobs: outcomes handed back to the event loop in batches."""

from __future__ import annotations

import asyncio
import sys
import threading

import pytest

from koban.runtime.executor import JobThreads


async def test_every_call_resolves_its_own_future_with_its_result_or_error() -> None:
    threads = JobThreads(max_workers=8)

    def work(i: int) -> int:
        if i % 7 == 0:
            raise ValueError(f"call {i}")
        return i * i

    try:
        futures = [threads.run(work, i) for i in range(500)]
        outcomes = await asyncio.gather(*futures, return_exceptions=True)
    finally:
        threads.shutdown()
    for i, outcome in enumerate(outcomes):
        if i % 7 == 0:
            assert isinstance(outcome, ValueError) and str(outcome) == f"call {i}"
        else:
            assert outcome == i * i


async def test_calls_run_off_the_event_loop_thread_on_at_most_max_workers_threads() -> None:
    threads = JobThreads(max_workers=3)
    seen: set[int] = set()
    lock = threading.Lock()

    def work() -> None:
        with lock:
            seen.add(threading.get_ident())

    try:
        await asyncio.gather(*(threads.run(work) for _ in range(200)))
    finally:
        threads.shutdown()
    assert threading.get_ident() not in seen
    assert 1 <= len(seen) <= 3


async def test_a_call_cancelled_before_a_thread_takes_it_never_runs() -> None:
    threads = JobThreads(max_workers=1)
    release = threading.Event()
    ran: list[str] = []

    def blocker() -> None:
        release.wait(10)
        ran.append("blocker")

    try:
        first = threads.run(blocker)
        second = threads.run(ran.append, "cancelled")
        second.cancel()
        release.set()
        await first
        third = threads.run(ran.append, "after")
        await third
    finally:
        threads.shutdown()
    assert ran == ["blocker", "after"]


async def test_a_call_abandoned_while_running_finishes_without_disturbing_the_loop() -> None:
    threads = JobThreads(max_workers=2)
    started = threading.Event()
    release = threading.Event()
    finished = threading.Event()

    def slow() -> str:
        started.set()
        release.wait(10)
        finished.set()
        return "late"

    try:
        abandoned = threads.run(slow)
        await asyncio.to_thread(started.wait, 10)
        abandoned.cancel()
        release.set()
        await asyncio.to_thread(finished.wait, 10)
        assert await threads.run(lambda: "next") == "next"
    finally:
        threads.shutdown()
    assert abandoned.cancelled()


def test_one_pool_serves_successive_event_loops() -> None:
    threads = JobThreads(max_workers=2)

    async def once(value: int) -> int:
        return int(await threads.run(lambda: value))

    try:
        assert [asyncio.run(once(n)) for n in range(3)] == [0, 1, 2]
    finally:
        threads.shutdown()


def test_no_call_is_taken_after_shutdown() -> None:
    threads = JobThreads(max_workers=1)
    threads.shutdown()

    async def submit() -> None:
        threads.run(lambda: None)

    with pytest.raises(RuntimeError, match="shut down"):
        asyncio.run(submit())


async def test_a_call_raising_stopiteration_fails_alone_and_strands_no_other_outcome() -> None:
    threads = JobThreads(max_workers=4)
    release = threading.Event()

    def work(i: int) -> int:
        release.wait(10)  # finish together, so the outcomes are handed back in one batch
        if i == 3:
            next(iter([]))
        return i

    try:
        futures = [threads.run(work, i) for i in range(8)]
        release.set()
        outcomes = await asyncio.wait_for(asyncio.gather(*futures, return_exceptions=True), 10)
    finally:
        threads.shutdown()
    assert isinstance(outcomes[3], RuntimeError) and "StopIteration" in str(outcomes[3])
    assert [o for i, o in enumerate(outcomes) if i != 3] == [0, 1, 2, 4, 5, 6, 7]


async def test_calls_that_block_each_get_a_thread_when_they_arrive_in_a_burst() -> None:
    """A burst wakes one idle thread; each thread that takes a call wakes the next while calls
    are waiting. Calls that block must still all run at once: none may wait behind another."""
    threads = JobThreads(max_workers=40)
    together = threading.Barrier(30, timeout=10)

    def meet(i: int) -> int:
        together.wait()  # breaks (BrokenBarrierError) unless all 30 calls run at the same time
        return i

    try:
        warm = await asyncio.gather(*(threads.run(lambda: None) for _ in range(100)))
        assert warm == [None] * 100
        outcomes = await asyncio.gather(*(threads.run(meet, i) for i in range(30)))
        assert outcomes == list(range(30))
        # Again, now that the threads that met are idle and woken from their sleep.
        together.reset()
        outcomes = await asyncio.gather(*(threads.run(meet, i) for i in range(30)))
        assert outcomes == list(range(30))
    finally:
        threads.shutdown()
    assert len(threads._threads) <= 40


async def test_shutdown_runs_the_waiting_calls_and_every_thread_exits() -> None:
    threads = JobThreads(max_workers=4)
    release = threading.Event()
    ran: list[int] = []

    def work(i: int) -> None:
        release.wait(10)
        ran.append(i)

    futures = [threads.run(work, i) for i in range(12)]
    await asyncio.sleep(0)
    release.set()
    await asyncio.to_thread(threads.shutdown)
    assert sorted(ran) == list(range(12))
    assert all(not t.is_alive() for t in threads._threads)
    await asyncio.gather(*futures)


async def test_a_call_no_thread_can_be_started_for_is_refused_and_never_runs(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """When the system refuses a new thread, the caller gets the error and the call is not left
    behind to run later; the threads already running go on."""
    threads = JobThreads(max_workers=4)
    started = threading.Event()
    release = threading.Event()
    ran: list[str] = []

    def blocker() -> str:
        started.set()
        release.wait(10)
        return "blocker"

    def refuse(self: threading.Thread) -> None:
        raise RuntimeError("can't start new thread")

    try:
        first = threads.run(blocker)
        await asyncio.to_thread(started.wait, 10)  # its thread took it: none is being woken
        with monkeypatch.context() as patched:
            patched.setattr(threading.Thread, "start", refuse)
            with pytest.raises(RuntimeError, match="can't start new thread"):
                threads.run(ran.append, "refused")
        release.set()
        assert await first == "blocker"
        assert await threads.run(lambda: "next") == "next"
    finally:
        threads.shutdown()
    assert ran == []


async def test_calls_waiting_when_no_next_thread_can_be_started_fail_instead_of_waiting(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A call handed over while a thread is being woken waits for that thread to wake the next.
    If the next cannot be started, the waiting call fails with the reason at once: left queued
    behind a blocking call, it would wait unseen while its timeout ran."""
    threads = JobThreads(max_workers=4)
    release = threading.Event()
    ran: list[str] = []

    def blocker() -> str:
        release.wait(10)
        return "blocker"

    def refuse(self: threading.Thread) -> None:
        raise RuntimeError("can't start new thread")

    try:
        assert await threads.run(lambda: "warm") == "warm"  # one thread, now idle
        for _ in range(1000):  # until it is back asleep
            if threads._parked:
                break
            await asyncio.sleep(0.01)
        monkeypatch.setattr(threading.Thread, "start", refuse)
        # No switch to the woken thread between the two calls: the second one is handed
        # over while the first one's thread is still being woken, so it waits for it.
        previous = sys.getswitchinterval()
        sys.setswitchinterval(10)
        try:
            first = threads.run(blocker)
            second = threads.run(ran.append, "waiting")
        finally:
            sys.setswitchinterval(previous)
        with pytest.raises(RuntimeError, match="no thread could be started for this sync job"):
            await asyncio.wait_for(second, 10)
        release.set()
        assert await first == "blocker"
    finally:
        release.set()
        monkeypatch.undo()
        threads.shutdown()
    assert ran == []
