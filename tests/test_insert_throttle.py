"""InsertNotifyThrottle on its own: which insert wakes a queue, and when the background thread
sends a trailing notification. `send` records what would go to PostgreSQL."""

from __future__ import annotations

import os
import select
import signal
import threading
import time

from helpers import wait_until
from koban.engines.postgres.notifier import InsertNotifyThrottle


class Sent:
    def __init__(self) -> None:
        self.calls: list[list[str]] = []
        self.lock = threading.Lock()

    def __call__(self, queues: list[str]) -> None:
        with self.lock:
            self.calls.append(queues)

    def queues(self) -> list[str]:
        with self.lock:
            return [q for call in self.calls for q in call]


def insert(throttle: InsertNotifyThrottle, *queues: str) -> list[str]:
    """One insert that adds an available job to each of `queues`: what it wakes itself."""
    claim = throttle.claim(queues)
    throttle.settle(claim, claim.wake, set(queues) - set(claim.wake))
    return claim.wake


def test_first_insert_wakes_and_the_next_within_the_interval_is_held() -> None:
    sent = Sent()
    throttle = InsertNotifyThrottle(sent, interval=3600)
    assert insert(throttle, "q") == ["q"]
    assert insert(throttle, "q") == []
    assert insert(throttle, "other") == ["other"]  # per queue
    assert sent.queues() == []
    throttle.close()  # sends what is held
    assert sent.calls == [["q"]]


def test_a_held_queue_gets_one_trailing_notification_after_the_interval() -> None:
    sent = Sent()
    throttle = InsertNotifyThrottle(sent, interval=0.05)
    try:
        insert(throttle, "q")
        held_at = time.monotonic()
        for _ in range(5):
            insert(throttle, "q")  # all within the interval: held
        wait_until(lambda: sent.calls, timeout=5, what="the trailing notification")
        assert time.monotonic() - held_at >= 0.04
        assert sent.calls == [["q"]]
        time.sleep(0.15)
        assert sent.calls == [["q"]]  # nothing more: nothing is held
    finally:
        throttle.close()


def test_covering_clears_only_the_hold_claimed_before_it() -> None:
    """A hold registered after the covering insert claimed (its job may have committed after
    the covering notification) must still get its own notification."""
    sent = Sent()
    throttle = InsertNotifyThrottle(sent, interval=3600)
    insert(throttle, "q")
    insert(throttle, "q")  # held, hold number 1
    throttle._last["q"] = float("-inf")  # the interval has passed for "q"
    cover = throttle.claim(["q"])  # sees hold 1
    assert cover.wake == ["q"] and cover.covers == {"q": 1}
    throttle.hold(["q"])  # another insert holds "q" again before the covering one commits
    throttle.settle(cover, ["q"], [])
    throttle.close()
    assert sent.calls == [["q"]]  # the second hold was not cleared


def test_a_covering_insert_that_woke_nothing_leaves_the_hold() -> None:
    """A claim for a queue whose job turned out scheduled (or a unique conflict) sent no
    notification for it: the held job still needs one."""
    sent = Sent()
    throttle = InsertNotifyThrottle(sent, interval=3600)
    insert(throttle, "q")
    insert(throttle, "q")  # held
    throttle._last["q"] = float("-inf")
    cover = throttle.claim(["q"])
    throttle.settle(cover, [], [])  # its notification woke no queue
    throttle.close()
    assert sent.calls == [["q"]]


def test_a_covered_hold_sends_no_trailing_notification() -> None:
    sent = Sent()
    throttle = InsertNotifyThrottle(sent, interval=3600)
    insert(throttle, "q")
    insert(throttle, "q")  # held
    throttle._last["q"] = float("-inf")
    assert insert(throttle, "q") == ["q"]  # wakes "q" after the held insert committed
    throttle.close()
    assert sent.calls == []


def test_one_thread_serves_every_hold() -> None:
    sent = Sent()
    throttle = InsertNotifyThrottle(sent, interval=0.01)
    before = threading.active_count()
    try:
        for _ in range(50):
            insert(throttle, "q")
            time.sleep(0.002)
        insert(throttle, "q")
        insert(throttle, "q")  # within the interval of the one before: held
        assert threading.active_count() <= before + 1
        wait_until(lambda: not throttle._held, timeout=5, what="the last trailing notification")
    finally:
        throttle.close()
    assert "q" in sent.queues()


def test_close_stops_the_thread_and_a_later_hold_starts_another() -> None:
    sent = Sent()
    throttle = InsertNotifyThrottle(sent, interval=0.02)
    insert(throttle, "a")
    insert(throttle, "a")
    first = throttle._flusher
    assert first is not None
    throttle.close()
    first.join(timeout=5)
    assert not first.is_alive()
    assert sent.calls == [["a"]]
    insert(throttle, "b")
    insert(throttle, "b")  # held again, after close: a new thread sends it
    wait_until(lambda: ["b"] in sent.calls, timeout=5, what="the trailing notification")
    throttle.close()


def test_a_failing_send_does_not_stop_the_thread() -> None:
    calls: list[list[str]] = []

    def send(queues: list[str]) -> None:
        calls.append(queues)
        if len(calls) == 1:
            raise OSError("database unreachable")

    throttle = InsertNotifyThrottle(send, interval=0.02)
    try:
        insert(throttle, "q")
        insert(throttle, "q")
        wait_until(lambda: len(calls) == 1, timeout=5, what="the first, failing send")
        time.sleep(0.03)
        insert(throttle, "q")
        insert(throttle, "q")
        wait_until(lambda: len(calls) == 2, timeout=5, what="the thread to send again")
    finally:
        throttle.close()


def test_a_forked_child_gets_a_fresh_lock_and_its_own_thread() -> None:
    """A child forked while its parent held a queue inherits the hold but not the thread, and
    may be forked while the thread holds the lock: it must not inherit the lock held."""
    read, write = os.pipe()
    sent = Sent()
    throttle = InsertNotifyThrottle(sent, interval=0.5)
    insert(throttle, "q")
    insert(throttle, "q")  # held in the parent: the thread is running, a send is due
    with throttle._cond:  # held across the fork, as the thread holds it at times
        pid = os.fork()
        if pid == 0:  # the child: report what its throttle sends, then leave at once
            try:
                insert(throttle, "child")
                insert(throttle, "child")  # held in the child
                deadline = time.monotonic() + 5
                while "child" not in sent.queues() and time.monotonic() < deadline:
                    time.sleep(0.01)
                os.write(write, b"ok" if "child" in sent.queues() else b"no")
            finally:
                os._exit(0)
    os.close(write)
    try:
        ready, _, _ = select.select([read], [], [], 10)
        if not ready:
            os.kill(pid, signal.SIGKILL)
        assert ready, "the forked child hung"
        assert os.read(read, 2) == b"ok"
    finally:
        os.close(read)
        os.waitpid(pid, 0)
        throttle.close()
