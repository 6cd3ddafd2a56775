"""One warning per database incident, not one per connection: psycopg_pool's per-connection
warnings are dropped for koban's own pools.

When the server restarts or terminates sessions, psycopg_pool warns for every broken connection
it discards and every reconnect attempt that fails: dozens of lines for one incident. koban's
notifier, producers, acker and plugins already report the outage once each, and its end, so
for the pools koban creates those lines only bury the report. Pools the application creates
itself keep every warning: only connections of the classes below, and the pool names below,
are recognised.
"""

from __future__ import annotations

import logging
from typing import Any

import psycopg

#: Names koban gives its pools (the node's async pool and the client's sync pool).
POOL_NAMES = frozenset({"koban", "koban-sync"})


class NodeConnection(psycopg.AsyncConnection[Any]):
    """A connection in koban's async pool."""


class ClientConnection(psycopg.Connection[Any]):
    """A connection in koban's sync pool."""


class QuietKobanPools(logging.Filter):
    """Drops psycopg_pool warnings about koban's pools and connections; passes all others."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING or not isinstance(record.args, tuple):
            return True
        for arg in record.args:
            if isinstance(arg, NodeConnection | ClientConnection):
                return False
            if isinstance(arg, str) and arg in POOL_NAMES:
                return False
        return True


_FILTER = QuietKobanPools()


def install() -> None:
    """Attach the filter to psycopg_pool's logger (idempotent)."""
    logging.getLogger("psycopg.pool").addFilter(_FILTER)
