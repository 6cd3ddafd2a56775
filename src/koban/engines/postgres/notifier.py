"""LISTEN/NOTIFY: one dedicated connection per node, reconnecting with backoff."""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
from collections.abc import Awaitable, Callable
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
