"""A node stops even when a cancellation is lost on the way.

On Python 3.11, `asyncio.wait_for` returns normally instead of raising CancelledError when the
awaitable it wraps completes in the same loop iteration as the cancellation (CPython gh-86296,
fixed in 3.12). psycopg_pool waits for a free connection with it, so a plugin cancelled by
`Node.stop` just as it is handed a connection carries on as if nothing happened, and a stop
that waits for it once waits forever: SIGTERM never ends the process.
"""

from __future__ import annotations

import asyncio
from typing import Any

import koban
from koban.plugins.base import Plugin


class SwallowsOneCancel(Plugin):
    """Loses the first cancellation it receives, as wait_for does when it races."""

    name = "swallows-one-cancel"
    interval = 0.01

    def __init__(self) -> None:
        self.ticked = asyncio.Event()
        self.swallowed = False

    async def tick(self, node: Any) -> None:
        self.ticked.set()
        try:
            await asyncio.sleep(0.05)
        except asyncio.CancelledError:
            if self.swallowed:
                raise
            self.swallowed = True


async def test_stop_finishes_when_a_plugin_loses_a_cancellation(db_url: str) -> None:
    plugin = SwallowsOneCancel()
    app = koban.Koban(db_url, queues={"default": 1}, plugins=[plugin], shutdown_grace=1)
    await app.start()
    try:
        await asyncio.wait_for(plugin.ticked.wait(), 10)
    finally:
        # Bounded only so that a regression fails instead of hanging the suite.
        await asyncio.wait_for(app.close(), 20)
    assert plugin.swallowed, "the plugin was never cancelled: the test proved nothing"
