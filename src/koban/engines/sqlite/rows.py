"""Values as the SQLite schema stores them, and back.

Times are INTEGER microseconds since the Unix epoch, UTC: integer comparison is time order, and
the conversion is exact both ways. JSON is TEXT, written with the separators PostgreSQL uses
when it prints jsonb (`{"a": 1, "b": 2}`), so an `args_text` search matches the same text on
both engines.
"""

from __future__ import annotations

import json
import sqlite3
from datetime import UTC, datetime, timedelta
from typing import Any

from koban.job import Job, JobState

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)


def to_us(at: datetime) -> int:
    """Microseconds since the epoch for an aware datetime (a naive one is taken as UTC)."""
    if at.tzinfo is None:
        at = at.replace(tzinfo=UTC)
    return (at - EPOCH) // _MICROSECOND


def from_us(us: int | None) -> datetime | None:
    """The aware UTC datetime for a stored time, or None."""
    return None if us is None else EPOCH + timedelta(microseconds=us)


def now_us(now: datetime | None) -> int:
    """The stored form of `now`, or of the wall clock when `now` is None."""
    return to_us(now if now is not None else datetime.now(UTC))


def dump_json(value: Any) -> str:
    """JSON text as stored: PostgreSQL's jsonb spacing, non-ASCII kept, odd types as str."""
    return json.dumps(value, ensure_ascii=False, default=str)


def row_to_job(row: sqlite3.Row) -> Job:
    """The Job for one `koban_jobs` row (fetched with sqlite3.Row as row factory)."""
    attempted_by = row["attempted_by"]
    return Job(
        id=row["id"],
        state=JobState(row["state"]),
        queue=row["queue"],
        worker=row["worker"],
        args=json.loads(row["args"]),
        meta=json.loads(row["meta"]),
        tags=json.loads(row["tags"]),
        errors=json.loads(row["errors"]),
        priority=row["priority"],
        attempt=row["attempt"],
        max_attempts=row["max_attempts"],
        attempted_by=json.loads(attempted_by) if attempted_by is not None else None,
        inserted_at=from_us(row["inserted_at"]),
        scheduled_at=from_us(row["scheduled_at"]),
        attempted_at=from_us(row["attempted_at"]),
        completed_at=from_us(row["completed_at"]),
        cancelled_at=from_us(row["cancelled_at"]),
        discarded_at=from_us(row["discarded_at"]),
        unique_key=row["unique_key"],
    )
