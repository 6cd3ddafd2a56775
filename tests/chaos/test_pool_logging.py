"""koban silences psycopg_pool's per-connection warnings for its own pools only."""

from __future__ import annotations

import logging

import pytest

from koban.engines.postgres import pool_logging  # noqa: F401  (installs the filter)
from koban.engines.postgres.engine import PostgresEngine


def test_warnings_about_koban_pools_are_dropped_and_others_kept(
    pg_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    engine = PostgresEngine(pg_url)
    try:
        with engine._sync().connection() as koban_conn:
            pass
        pool_log = logging.getLogger("psycopg.pool")
        with caplog.at_level(logging.WARNING, logger="psycopg.pool"):
            pool_log.warning("discarding closed connection: %s", koban_conn)
            pool_log.warning("error connecting in %r: %s", "koban", "refused")
            pool_log.warning("error connecting in %r: %s", "koban-sync", "refused")
            pool_log.warning("error connecting in %r: %s", "the-apps-pool", "refused")
            pool_log.warning("discarding closed connection: %s", object())
    finally:
        engine.close_sync()
    kept = [r.getMessage() for r in caplog.records if r.name == "psycopg.pool"]
    assert len(kept) == 2, kept
    assert "the-apps-pool" in kept[0]
