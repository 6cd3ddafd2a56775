"""LISTEN/NOTIFY: one dedicated connection per node, reconnecting with backoff."""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import threading
import time
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


class InsertNotifyThrottle:
    """At most one insert notification per queue per `interval` from this process.

    An insert whose queue was notified less than `interval` ago sends none; its queue is *held*
    and woken by one trailing notification once the interval has passed. The hold starts only
    after the insert committed, so the trailing notification always follows the commit and the
    woken producer sees the job: a flood of single inserts costs a few notifications a second
    per queue instead of one per insert, and no job waits for the poll interval.
    """

    def __init__(self, send: Callable[[list[str]], None], interval: float = 0.005) -> None:
        self.interval = interval
        self._send = send
        self._last: dict[str, float] = {}
        self._held: set[str] = set()
        self._lock = threading.Lock()
        self._timer: threading.Timer | None = None

    def claim(self, queues: Iterable[str]) -> list[str]:
        """The queues to notify with this insert; the caller holds the rest after commit."""
        now = time.monotonic()
        wake = []
        with self._lock:
            for queue in queues:
                if now - self._last.get(queue, float("-inf")) >= self.interval:
                    self._last[queue] = now
                    wake.append(queue)
        return wake

    def hold(self, queues: Iterable[str]) -> None:
        """Notify `queues` once the interval has passed (call after the insert committed)."""
        with self._lock:
            self._held.update(queues)
            if self._held and self._timer is None:
                self._timer = threading.Timer(self.interval, self.flush)
                self._timer.daemon = True
                self._timer.start()

    def flush(self) -> None:
        """Send the trailing notification for every held queue now."""
        with self._lock:
            queues = sorted(self._held)
            self._held.clear()
            self._timer = None
            now = time.monotonic()
            for queue in queues:
                self._last[queue] = now
        if queues:
            try:
                self._send(queues)
            except Exception as exc:  # the producers' poll still finds the jobs
                log.warning(
                    "could not wake queue(s) %s after an insert (%s); they are polled instead",
                    ", ".join(queues),
                    type(exc).__name__,
                )

    def close(self) -> None:
        """Cancel the timer and send what is held, so nothing waits for a poll."""
        with self._lock:
            timer, self._timer = self._timer, None
        if timer is not None:
            timer.cancel()
        self.flush()
