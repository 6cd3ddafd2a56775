"""Reindexer: rebuilds the job table's indexes on a schedule (leader only, PostgreSQL).

A queue table's rows are inserted, updated a few times and deleted within days, and its
indexes (B-trees over state, queue, scheduled_at...) keep the space of deleted entries that
vacuum cannot always hand back: they grow and slow every fetch. `REINDEX INDEX CONCURRENTLY`
builds a compact copy beside each index and swaps it in without blocking inserts, fetches or
acks. It runs daily at midnight UTC by default. On SQLite it does nothing.

>>> Reindexer(schedule="0 3 * * sun", timezone="Europe/Warsaw")   # weekly, Sunday 03:00
>>> Reindexer(schedule=None)                                      # never
"""

from __future__ import annotations

import logging
from datetime import datetime
from typing import TYPE_CHECKING

from koban.cron import Cron
from koban.errors import ConfigurationError
from koban.plugins.base import Plugin

if TYPE_CHECKING:
    from koban.runtime.node import Node

log = logging.getLogger("koban.reindexer")


class Reindexer(Plugin):
    """Runs `engine.reindex()` at every tick of `schedule`."""

    name = "reindexer"
    leader_only = True

    def __init__(
        self, *, schedule: str | None = "@daily", timezone: str = "UTC", interval: float = 60.0
    ) -> None:
        if schedule is not None and schedule.strip().lower() == "@reboot":
            raise ConfigurationError("Reindexer schedule cannot be @reboot; use a clock schedule")
        self.schedule = (
            None
            if schedule is None
            else Cron(schedule, "koban.reindexer", timezone=timezone, name="koban.reindexer")
        )
        self.interval = float(interval)
        self._next: datetime | None = None

    def __repr__(self) -> str:
        return f"<Reindexer {self.schedule.expression if self.schedule else 'off'}>"

    async def tick(self, node: Node) -> list[str]:
        """Reindex if a scheduled time has passed since the last check; return what was rebuilt."""
        if self.schedule is None:
            return []
        now = node.clock.now()
        if self._next is None:
            self._next = self.schedule.next_after(now)
            return []
        if now < self._next:
            return []
        self._next = self.schedule.next_after(now)
        rebuilt = await node.engine.reindex()
        if rebuilt:
            log.info("reindexed %s", ", ".join(rebuilt))
            node.telemetry.emit("plugin:reindexer", indexes=rebuilt)
        return rebuilt
