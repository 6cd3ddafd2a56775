"""The app's own tables: athletes with their Strava tokens, and their activities.

Works on SQLite (stdlib sqlite3) and PostgreSQL (psycopg) with the same SQL. Every write is an
idempotent upsert keyed by Strava's ids, so a sync that is retried, rescued or run twice never
duplicates an activity.

>>> store = Store("sqlite:///summer.db")
>>> store.create_tables()
>>> store.upsert_athlete(Athlete(id=7, name="Ewa", access_token="...", refresh_token="...",
...                              expires_at=1767225600))
"""

from __future__ import annotations

import re
import sqlite3
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg

from koban.errors import ConfigurationError
from koban.examples.summer_challenge.strava import Tokens

SCHEMA = """
CREATE TABLE IF NOT EXISTS sc_athletes (
    id BIGINT PRIMARY KEY,
    name TEXT NOT NULL,
    access_token TEXT NOT NULL,
    refresh_token TEXT NOT NULL,
    expires_at BIGINT NOT NULL,
    -- Start time (Unix) of the newest activity stored: the next sync asks for later ones.
    synced_until BIGINT NOT NULL DEFAULT 0,
    last_synced_at TEXT
);
CREATE TABLE IF NOT EXISTS sc_activities (
    id BIGINT PRIMARY KEY,
    athlete_id BIGINT NOT NULL REFERENCES sc_athletes (id),
    name TEXT NOT NULL,
    sport_type TEXT NOT NULL,
    distance DOUBLE PRECISION NOT NULL,
    moving_time INTEGER NOT NULL,
    elapsed_time INTEGER NOT NULL,
    total_elevation_gain DOUBLE PRECISION NOT NULL,
    start_date BIGINT NOT NULL,
    fetched_at TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS sc_activities_athlete ON sc_activities (athlete_id, start_date);
"""

UPSERT_ATHLETE = """
INSERT INTO sc_athletes (id, name, access_token, refresh_token, expires_at)
VALUES (%(id)s, %(name)s, %(access_token)s, %(refresh_token)s, %(expires_at)s)
ON CONFLICT (id) DO UPDATE SET name = excluded.name, access_token = excluded.access_token,
    refresh_token = excluded.refresh_token, expires_at = excluded.expires_at
"""

UPSERT_ACTIVITY = """
INSERT INTO sc_activities (id, athlete_id, name, sport_type, distance, moving_time,
                           elapsed_time, total_elevation_gain, start_date, fetched_at)
VALUES (%(id)s, %(athlete_id)s, %(name)s, %(sport_type)s, %(distance)s, %(moving_time)s,
        %(elapsed_time)s, %(total_elevation_gain)s, %(start_date)s, %(fetched_at)s)
ON CONFLICT (id) DO UPDATE SET name = excluded.name, sport_type = excluded.sport_type,
    distance = excluded.distance, moving_time = excluded.moving_time,
    elapsed_time = excluded.elapsed_time, total_elevation_gain = excluded.total_elevation_gain,
    start_date = excluded.start_date, fetched_at = excluded.fetched_at
"""

# The cursor only moves forward, so a late retry of an old page cannot rewind it.
ADVANCE_CURSOR = """
UPDATE sc_athletes
SET synced_until = CASE WHEN synced_until > %(cursor)s THEN synced_until ELSE %(cursor)s END
WHERE id = %(athlete_id)s
"""


@dataclass(frozen=True, slots=True)
class Athlete:
    id: int
    name: str
    access_token: str
    refresh_token: str
    expires_at: int
    synced_until: int = 0
    last_synced_at: str | None = None

    @property
    def tokens(self) -> Tokens:
        return Tokens(self.access_token, self.refresh_token, self.expires_at)


def parse_start(iso: str) -> int:
    """Strava's `start_date` ("2026-07-01T05:12:00Z") as a Unix time."""
    return int(datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp())


class Store:
    """Reads and writes the app's tables in the database at `url`."""

    def __init__(self, url: str) -> None:
        self.url = url
        scheme = url.split("://", 1)[0].lower() if "://" in url else ""
        if scheme == "sqlite":
            path = url[len("sqlite:///") :]
            if not path or not url.startswith("sqlite:///"):
                raise ConfigurationError(
                    f"Summer Challenge database {url!r}: use sqlite:///path/to/file.db"
                )
            self.kind = "sqlite"
            self.path = Path(path)
        elif scheme in ("postgresql", "postgres", "postgresql+psycopg"):
            self.kind = "postgres"
            self.conninfo = url.replace("postgresql+psycopg://", "postgresql://", 1)
        else:
            raise ConfigurationError(
                f"Summer Challenge database {url!r}: use sqlite:///file.db or postgresql://..."
            )

    @contextmanager
    def transaction(self) -> Iterator[Any]:
        """A connection whose work commits on exit, or rolls back if the block raises."""
        if self.kind == "sqlite":
            conn = sqlite3.connect(self.path, timeout=30.0, isolation_level=None)
            try:
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute("PRAGMA busy_timeout=30000")
                conn.execute("BEGIN IMMEDIATE")
                try:
                    yield conn
                except BaseException:
                    conn.execute("ROLLBACK")
                    raise
                conn.execute("COMMIT")
            finally:
                conn.close()
        else:
            with psycopg.connect(self.conninfo) as pg:  # commits on success, rolls back on error
                yield pg

    def _sql(self, statement: str) -> str:
        if self.kind == "sqlite":
            return re.sub(r"%\((\w+)\)s", r":\1", statement)
        return statement

    def _execute(self, conn: Any, statement: str, params: dict[str, Any] | None = None) -> Any:
        return conn.execute(self._sql(statement), params or {})

    def _executemany(self, conn: Any, statement: str, rows: Sequence[dict[str, Any]]) -> None:
        if not rows:
            return
        if self.kind == "sqlite":
            conn.executemany(self._sql(statement), rows)
        else:
            with conn.cursor() as cur:
                cur.executemany(statement, rows)

    def _rows(self, statement: str, params: dict[str, Any] | None = None) -> list[tuple[Any, ...]]:
        with self.transaction() as conn:
            return list(self._execute(conn, statement, params).fetchall())

    # ----- schema ---------------------------------------------------------------------------
    def create_tables(self) -> None:
        """Create the app's tables if they do not exist (safe to run again)."""
        with self.transaction() as conn:
            for statement in filter(None, (s.strip() for s in SCHEMA.split(";"))):
                conn.execute(statement)

    def clear(self) -> None:
        """Delete every athlete and activity (tests and the demo start from empty tables)."""
        with self.transaction() as conn:
            conn.execute("DELETE FROM sc_activities")
            conn.execute("DELETE FROM sc_athletes")

    # ----- athletes -------------------------------------------------------------------------
    def upsert_athlete(self, athlete: Athlete) -> None:
        """Store an athlete who connected Strava (again): name and tokens are replaced."""
        with self.transaction() as conn:
            self._execute(
                conn,
                UPSERT_ATHLETE,
                {
                    "id": athlete.id,
                    "name": athlete.name,
                    "access_token": athlete.access_token,
                    "refresh_token": athlete.refresh_token,
                    "expires_at": athlete.expires_at,
                },
            )

    def get_athlete(self, athlete_id: int) -> Athlete | None:
        rows = self._rows(
            "SELECT id, name, access_token, refresh_token, expires_at, synced_until, "
            "last_synced_at FROM sc_athletes WHERE id = %(id)s",
            {"id": athlete_id},
        )
        return Athlete(*rows[0]) if rows else None

    def athlete_ids(self) -> list[int]:
        return [row[0] for row in self._rows("SELECT id FROM sc_athletes ORDER BY id")]

    def save_tokens(self, athlete_id: int, tokens: Tokens) -> None:
        """Keep the tokens a refresh returned: the old refresh token may no longer work."""
        with self.transaction() as conn:
            self._execute(
                conn,
                "UPDATE sc_athletes SET access_token = %(access)s, refresh_token = %(refresh)s, "
                "expires_at = %(expires_at)s WHERE id = %(id)s",
                {
                    "access": tokens.access_token,
                    "refresh": tokens.refresh_token,
                    "expires_at": tokens.expires_at,
                    "id": athlete_id,
                },
            )

    def mark_synced(self, athlete_id: int, at: datetime) -> None:
        with self.transaction() as conn:
            self._execute(
                conn,
                "UPDATE sc_athletes SET last_synced_at = %(at)s WHERE id = %(id)s",
                {"at": at.astimezone(UTC).isoformat(), "id": athlete_id},
            )

    # ----- activities -----------------------------------------------------------------------
    def save_activities(
        self, athlete_id: int, activities: Sequence[dict[str, Any]], fetched_at: datetime
    ) -> int:
        """Upsert one page of Strava activities and move the athlete's cursor, in one transaction.

        Returns how many activities the page held. Safe to repeat: the same page twice leaves
        the same rows.
        """
        stamp = fetched_at.astimezone(UTC).isoformat()
        rows: list[dict[str, Any]] = [
            {
                "id": int(a["id"]),
                "athlete_id": athlete_id,
                "name": str(a.get("name") or ""),
                "sport_type": str(a.get("sport_type") or a.get("type") or "Workout"),
                "distance": float(a.get("distance") or 0.0),
                "moving_time": int(a.get("moving_time") or 0),
                "elapsed_time": int(a.get("elapsed_time") or 0),
                "total_elevation_gain": float(a.get("total_elevation_gain") or 0.0),
                "start_date": parse_start(a["start_date"]),
                "fetched_at": stamp,
            }
            for a in activities
        ]
        if not rows:
            return 0
        with self.transaction() as conn:
            self._executemany(conn, UPSERT_ACTIVITY, rows)
            self._execute(
                conn,
                ADVANCE_CURSOR,
                {"cursor": max(int(r["start_date"]) for r in rows), "athlete_id": athlete_id},
            )
        return len(rows)

    def count_activities(self, athlete_id: int | None = None) -> int:
        if athlete_id is None:
            return int(self._rows("SELECT count(*) FROM sc_activities")[0][0])
        return int(
            self._rows(
                "SELECT count(*) FROM sc_activities WHERE athlete_id = %(id)s", {"id": athlete_id}
            )[0][0]
        )

    def activity_ids(self, athlete_id: int | None = None) -> list[int]:
        """Stored activity ids, in id order (a list, so a duplicate would show)."""
        if athlete_id is None:
            return [r[0] for r in self._rows("SELECT id FROM sc_activities ORDER BY id")]
        return [
            r[0]
            for r in self._rows(
                "SELECT id FROM sc_activities WHERE athlete_id = %(id)s ORDER BY id",
                {"id": athlete_id},
            )
        ]
