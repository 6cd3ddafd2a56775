"""LISTEN/NOTIFY: one dedicated connection per node, reconnecting with backoff."""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import inspect
import json
import logging
import os
import threading
import time
import weakref
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import psycopg

from koban.engines.base import INSERT_CHANNEL, SIGNAL_CHANNEL, NotificationHandler, redact

log = logging.getLogger("koban.notifier")

PREFIX = "koban_"
CHANNELS = (INSERT_CHANNEL, SIGNAL_CHANNEL)
#: How often an idle listening connection is checked, so a silently dead one is noticed.
HEALTH_CHECK_SECONDS = 5.0


async def _call(cb: Callable[[bool], Awaitable[None] | None] | None, healthy: bool) -> None:
    if cb is not None:
        result = cb(healthy)
        if inspect.isawaitable(result):
            await result


async def listen(
    url: str,
    handler: NotificationHandler,
    on_state: Callable[[bool], Awaitable[None] | None] | None = None,
) -> None:
    """Deliver notifications to `handler` until cancelled; never raises on connection loss."""
    delay = 0.2
    down_since_logged = False
    while True:
        conn: psycopg.AsyncConnection[Any] | None = None
        try:
            conn = await psycopg.AsyncConnection.connect(url, autocommit=True, connect_timeout=5)
            for channel in CHANNELS:
                await conn.execute(f"LISTEN {PREFIX}{channel}")
            if down_since_logged:
                log.info("notifier reconnected to %s", redact(url))
            down_since_logged = False
            delay = 0.2
            await _call(on_state, True)
            while True:
                async for note in conn.notifies(timeout=HEALTH_CHECK_SECONDS):
                    channel = note.channel.removeprefix(PREFIX)
                    try:
                        payload = json.loads(note.payload) if note.payload else {}
                    except ValueError:
                        log.warning("ignoring notification with invalid payload on %s", channel)
                        continue
                    handler(channel, payload)
                await conn.execute("SELECT 1")
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            await _call(on_state, False)
            if not down_since_logged:
                log.warning(
                    "notifier lost its connection (%s: %s); polling until it is back",
                    type(exc).__name__,
                    str(exc).strip().splitlines()[0] if str(exc).strip() else "",
                )
                down_since_logged = True
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)
        finally:
            if conn is not None:
                try:
                    await conn.close()
                except Exception:
                    pass


@dataclasses.dataclass(frozen=True, slots=True)
class Claim:
    """What `InsertNotifyThrottle.claim` decided for one insert."""

    #: The queues this insert's statement may notify.
    wake: list[str]
    #: Held queues this insert's notification will also cover, with the hold each was at.
    covers: dict[str, int]


class InsertNotifyThrottle:
    """At most one insert notification per queue per `interval` from this process.

    An insert whose queue was notified less than `interval` ago sends none; its queue is *held*.
    A held queue is woken by the next insert into it that does notify, or else by one trailing
    notification from a background thread once the interval has passed. Either way the waking
    notification follows the held insert's commit, so the woken producer sees the job: a flood
    of single inserts costs a few notifications a second per queue instead of one per insert,
    and no job waits for the poll interval.

    A covering insert must have *claimed* after the hold was registered (which is after the
    held insert committed), and it clears the hold only after it committed itself, and only
    if the queue was not held again in between.
    """

    def __init__(self, send: Callable[[list[str]], None], interval: float = 0.005) -> None:
        self.interval = interval
        self._send = send
        self._last: dict[str, float] = {}
        self._held: dict[str, int] = {}  # queue -> the number of its latest hold
        self._holds = 0
        self._due: float | None = None  # when the trailing notification is sent
        self._cond = threading.Condition(threading.Lock())
        self._flusher: threading.Thread | None = None
        # A child forked while the thread held the lock would inherit it locked, forever.
        os.register_at_fork(after_in_child=functools.partial(_forked, weakref.ref(self)))

    def _forked(self) -> None:
        """In a forked child: a fresh lock; the thread was not inherited (the holds were)."""
        self._cond = threading.Condition(threading.Lock())
        self._flusher = None

    def claim(self, queues: Iterable[str]) -> Claim:
        """Decide, before an insert, which of its queues it notifies."""
        now = time.monotonic()
        wake: list[str] = []
        covers: dict[str, int] = {}
        with self._cond:
            for queue in queues:
                if now - self._last.get(queue, float("-inf")) >= self.interval:
                    self._last[queue] = now
                    wake.append(queue)
                    held = self._held.get(queue)
                    if held is not None:
                        covers[queue] = held
        return Claim(wake, covers)

    def settle(self, claim: Claim, woke: Iterable[str], hold: Iterable[str]) -> None:
        """After the insert committed: `woke` are the queues its notification woke (queues it
        claimed and gained available jobs in); `hold` the queues it left unwoken."""
        with self._cond:
            for queue in woke:
                if queue in claim.covers and self._held.get(queue) == claim.covers[queue]:
                    del self._held[queue]
            for queue in hold:
                self._holds += 1
                self._held[queue] = self._holds
            if not self._held:
                self._due = None
                return
            if self._flusher is None:
                # One thread for the process's life (started again after `close`, and in a
                # forked child, which inherits the holds but not the thread).
                self._flusher = threading.Thread(
                    target=self._run, name="koban-insert-notify", daemon=True
                )
                self._flusher.start()
            if self._due is None:
                self._due = time.monotonic() + self.interval
                self._cond.notify()

    def hold(self, queues: Iterable[str]) -> None:
        """Notify `queues` once the interval has passed (call after the insert committed)."""
        self.settle(EMPTY_CLAIM, (), queues)

    def flush(self) -> None:
        """Send the trailing notification for every held queue now."""
        with self._cond:
            queues = self._take()
        self._deliver(queues)

    def close(self) -> None:
        """Stop the background thread and send what is held, so nothing waits for a poll."""
        with self._cond:
            self._flusher = None
            self._cond.notify_all()
        self.flush()

    def _run(self) -> None:
        me = threading.current_thread()
        while True:
            with self._cond:
                while self._flusher is me:
                    now = time.monotonic()
                    if self._due is not None and self._due <= now:
                        break
                    self._cond.wait(None if self._due is None else self._due - now)
                if self._flusher is not me:
                    return
                queues = self._take()
            self._deliver(queues)

    def _take(self) -> list[str]:
        queues = sorted(self._held)
        self._held.clear()
        self._due = None
        now = time.monotonic()
        for queue in queues:
            self._last[queue] = now
        return queues

    def _deliver(self, queues: list[str]) -> None:
        if not queues:
            return
        try:
            self._send(queues)
        except Exception as exc:  # the producers' poll still finds the jobs
            log.warning(
                "could not wake queue(s) %s after an insert (%s); they are polled instead",
                ", ".join(queues),
                type(exc).__name__,
            )


EMPTY_CLAIM = Claim([], {})


def _forked(ref: weakref.ReferenceType[InsertNotifyThrottle]) -> None:
    throttle = ref()
    if throttle is not None:
        throttle._forked()
