"""Notifications on SQLite: in-process wake-ups at once, other processes by short polling.

SQLite has no LISTEN/NOTIFY, so a notification takes two paths:

* every listener in this process on the same database file gets it as soon as the
  transaction that sent it commits (a process-wide registry, delivering through
  `loop.call_soon_threadsafe`);
* a row in `koban_notifications` carries it to other processes, whose listeners poll for new
  ids every `POLL_SECONDS`. The row names its origin process, so that process's listeners,
  already served in memory, skip it. Rows older than `KEEP_SECONDS` are pruned by writers.

A notification sent inside the caller's own transaction (transactional enqueue) cannot be
delivered on commit, because koban does not see the commit: its row has no origin and every
listener, here too, picks it up by polling.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import os
import sqlite3
import threading
import uuid
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from koban.engines.base import NotificationHandler
from koban.engines.sqlite.sql import QUERIES

log = logging.getLogger("koban.notifier")

#: How often a listener looks for notifications from other processes.
POLL_SECONDS = 0.2
#: How long a notification row is kept for listeners in other processes.
KEEP_SECONDS = 60.0
#: Writers prune old rows when a new row's id is a multiple of this.
PRUNE_EVERY = 128

_token_lock = threading.Lock()
_token: tuple[int, str] | None = None


def process_token() -> str:
    """An id for this process, new after a fork (a child has no listeners of its parent)."""
    global _token
    pid = os.getpid()
    with _token_lock:
        if _token is None or _token[0] != pid:
            _token = (pid, f"{pid}.{uuid.uuid4().hex[:12]}")
        return _token[1]


class _Listener:
    """One `listen` call: a handler and the loop it runs on."""

    def __init__(self, loop: asyncio.AbstractEventLoop, handler: NotificationHandler) -> None:
        self.loop = loop
        self.handler = handler

    def dispatch(self, channel: str, text: str) -> None:
        """Decode and hand one notification to the handler (runs on the listener's loop)."""
        try:
            payload = json.loads(text) if text else {}
        except ValueError:
            log.warning("ignoring notification with invalid payload on %s", channel)
            return
        try:
            self.handler(channel, payload)
        except Exception:
            log.exception("notification handler failed on %s", channel)


class _Registry:
    """Listeners in this process, by database file."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pid = os.getpid()
        self._listeners: dict[str, list[_Listener]] = {}

    def _current(self) -> dict[str, list[_Listener]]:
        if self._pid != os.getpid():  # forked: the parent's loops do not run here
            self._pid = os.getpid()
            self._listeners = {}
        return self._listeners

    def add(self, key: str, listener: _Listener) -> None:
        with self._lock:
            self._current().setdefault(key, []).append(listener)

    def remove(self, key: str, listener: _Listener) -> None:
        with self._lock:
            listeners = self._current().get(key, [])
            if listener in listeners:
                listeners.remove(listener)

    def deliver(self, key: str, notes: list[tuple[str, str]]) -> None:
        """Schedule each (channel, payload text) on every listener of `key`; thread-safe."""
        with self._lock:
            listeners = list(self._current().get(key, ()))
        for listener in listeners:
            for channel, text in notes:
                try:
                    listener.loop.call_soon_threadsafe(listener.dispatch, channel, text)
                except RuntimeError:  # its loop is closed; the listener is gone
                    self.remove(key, listener)
                    break


REGISTRY = _Registry()


class Outbox:
    """The notifications one transaction sends: rows now, in-process delivery after commit."""

    def __init__(self, key: str, *, deliver_here: bool = True) -> None:
        self.key = key
        #: False inside the caller's transaction: koban cannot see when it commits.
        self.deliver_here = deliver_here
        self._pending: list[tuple[str, str]] = []

    def send(
        self, conn: sqlite3.Connection, channel: str, payload: dict[str, Any], now: int
    ) -> None:
        """Record one notification in the transaction open on `conn` (`now` in microseconds)."""
        text = json.dumps(payload, separators=(",", ":"), default=str)
        origin = process_token() if self.deliver_here else None
        cur = conn.execute(
            QUERIES["notify"], {"channel": channel, "payload": text, "origin": origin, "now": now}
        )
        if cur.lastrowid is not None and cur.lastrowid % PRUNE_EVERY == 0:
            conn.execute(QUERIES["prune_notifications"], {"before": now - int(KEEP_SECONDS * 1e6)})
        if self.deliver_here:
            self._pending.append((channel, text))

    def deliver(self) -> None:
        """Wake this process's listeners; call once the transaction has committed."""
        notes, self._pending = self._pending, []
        if notes:
            REGISTRY.deliver(self.key, notes)


async def _call(cb: Callable[[bool], Awaitable[None] | None] | None, healthy: bool) -> None:
    if cb is not None:
        result = cb(healthy)
        if inspect.isawaitable(result):
            await result


def _last_id(conn: sqlite3.Connection) -> int:
    return int(conn.execute(QUERIES["last_notification"]).fetchone()[0])


def _poll(conn: sqlite3.Connection, after: int) -> list[tuple[int, str, str, str | None]]:
    rows = conn.execute(QUERIES["notifications_after"], {"after": after}).fetchall()
    return [(r[0], r[1], r[2], r[3]) for r in rows]


async def listen(
    key: str,
    connect: Callable[[], sqlite3.Connection],
    handler: NotificationHandler,
    on_state: Callable[[bool], Awaitable[None] | None] | None = None,
) -> None:
    """Deliver notifications for database `key` to `handler` until cancelled.

    `connect` opens a checked connection to the file; it runs on this listener's own thread,
    as do the polls, so the event loop never waits on SQLite. Failures are logged, reported
    through `on_state(False)` and retried with backoff; only cancellation ends the loop.
    """
    loop = asyncio.get_running_loop()
    thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="koban-sqlite-listen")
    listener = _Listener(loop, handler)
    REGISTRY.add(key, listener)
    conn: sqlite3.Connection | None = None
    after: int | None = None
    healthy: bool | None = None
    delay = 0.2
    try:
        while True:
            try:
                if conn is None:
                    conn = await loop.run_in_executor(thread, connect)
                    if after is None:
                        after = await loop.run_in_executor(thread, _last_id, conn)
                    if healthy is False:
                        log.info("notifier is reading %s again", key)
                    healthy, delay = True, 0.2
                    await _call(on_state, True)
                assert after is not None
                rows = await loop.run_in_executor(thread, _poll, conn, after)
                token = process_token()
                for note_id, channel, text, origin in rows:
                    after = note_id
                    if origin != token:  # this process's own were delivered in memory
                        listener.dispatch(channel, text)
                if len(rows) < 1000:
                    await asyncio.sleep(POLL_SECONDS)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if conn is not None:
                    thread.submit(conn.close)
                    conn = None
                if healthy is not False:
                    log.warning(
                        "notifier cannot read %s (%s: %s); nodes poll for jobs until it can",
                        key,
                        type(exc).__name__,
                        str(exc).strip().splitlines()[0] if str(exc).strip() else "",
                    )
                    healthy = False
                    await _call(on_state, False)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
    finally:
        REGISTRY.remove(key, listener)
        if conn is not None:
            thread.submit(conn.close)  # after any poll still running on that thread
        thread.shutdown(wait=False)
