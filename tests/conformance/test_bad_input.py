"""Bad input gets an error naming the problem at the call site, and never leaves a partial job."""

from __future__ import annotations

import datetime as dt
import re
import sqlite3
from decimal import Decimal
from pathlib import Path
from typing import Any

import psycopg
import pytest

import koban
from helpers import AppFactory, count_jobs, make_app, sql_rows
from koban import Job, JobValidationError


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"args": {"when": dt.datetime(2030, 1, 1)}}, "not JSON-serialisable"),
        ({"args": {"amount": Decimal("1.5")}}, "not JSON-serialisable"),
        ({"args": {"ids": {1, 2}}}, "not JSON-serialisable"),
        ({"args": {"x": float("nan")}}, "not JSON-serialisable"),
        ({"args": {"blob": b"\x00\x01"}}, "not JSON-serialisable"),
        ({"meta": {"obj": object()}}, "meta for worker"),
        ({"args": [1, 2, 3]}, "must be a JSON object"),
        ({"args": "a string"}, "must be a JSON object"),
        ({"meta": ["not", "a", "dict"]}, "meta for worker"),
        ({"priority": 10}, "priority"),
        ({"priority": -1}, "priority"),
        ({"priority": True}, "priority"),
        ({"priority": 1.5}, "priority"),
        ({"max_attempts": 0}, "max_attempts"),
        ({"max_attempts": -3}, "max_attempts"),
        ({"tags": "single-string"}, "tags"),
        ({"schedule_in": float("inf")}, "schedule_in"),
        ({"scheduled_at": dt.datetime(2030, 1, 1)}, "timezone-aware"),
        ({"queue": ""}, "queue"),
    ],
)
async def test_invalid_job_is_refused_before_insert(
    app: koban.Koban, options: dict[str, Any], message: str
) -> None:
    @app.worker
    async def import_rows(job: Job) -> None: ...

    options = dict(options)  # the parametrized dict is shared by both engines' runs
    args = options.pop("args", {"ok": 1})
    with pytest.raises(JobValidationError, match=message) as raised:
        await import_rows.aenqueue(args, **options)
    assert "import_rows" in str(raised.value)  # the message names the worker
    with pytest.raises(JobValidationError):
        import_rows.enqueue(args, **options)
    assert count_jobs(app.engine.url) == 0


async def test_one_bad_job_in_a_batch_inserts_none(app: koban.Koban) -> None:
    @app.worker
    async def import_rows(job: Job) -> None: ...

    batch = [import_rows.new({"row": i}) for i in range(50)]
    batch.insert(25, import_rows.new({"row": object()}))
    with pytest.raises(JobValidationError, match="not JSON-serialisable"):
        await app.aenqueue_many(batch)
    with pytest.raises(JobValidationError):
        app.enqueue_many(batch)
    assert count_jobs(app.engine.url) == 0


async def test_args_over_the_size_limit(apps: AppFactory) -> None:
    app = apps(max_args_bytes=1024)

    @app.worker
    async def upload(job: Job) -> None: ...

    with pytest.raises(JobValidationError, match="above the limit of 1024 bytes"):
        await upload.aenqueue({"data": "x" * 2000})
    accepted = await upload.aenqueue({"data": "x" * 900})
    assert accepted.id is not None
    assert count_jobs(app.engine.url) == 1


async def test_enqueue_many_refuses_things_that_are_not_jobs(app: koban.Koban) -> None:
    with pytest.raises(TypeError, match=r"Worker\.new"):
        await app.aenqueue_many([{"worker": "x"}])  # type: ignore[list-item]
    assert count_jobs(app.engine.url) == 0


def test_invalid_worker_options_are_refused_at_definition(app: koban.Koban) -> None:
    with pytest.raises(koban.ConfigurationError, match="priority"):

        @app.worker(priority=12)
        def bad_priority(job: Job) -> None: ...

    with pytest.raises(koban.ConfigurationError, match="max_attempts"):

        @app.worker(max_attempts=0)
        def bad_attempts(job: Job) -> None: ...

    with pytest.raises(koban.ConfigurationError, match="timeout"):

        @app.worker(timeout=-1)
        def bad_timeout(job: Job) -> None: ...


#: A column and a value that breaks the database's rule for it.
BROKEN_COLUMNS = [
    ("queue", ""),
    ("queue", "q" * 129),
    ("worker", ""),
    ("args", "[1, 2]"),
    ("meta", '"text"'),
    ("priority", 10),
    ("attempt", -1),
    ("max_attempts", 0),
    ("state", "lost"),
]


@pytest.mark.parametrize(("column", "value"), BROKEN_COLUMNS)
def test_the_database_holds_every_writer_to_the_rules(db_url: str, column: str, value: Any) -> None:
    """Rows written around koban (raw SQL, another language's client) are held to the rules the
    client checks, on insert and on an update that sets the column, and nothing is changed."""
    [(job_id,)] = sql_rows(db_url, "INSERT INTO koban_jobs (worker) VALUES ('w.raw') RETURNING id")
    values = {"worker": "w.raw", column: value}
    refused = (psycopg.errors.CheckViolation, sqlite3.IntegrityError)
    columns, marks = ", ".join(values), ", ".join(["%s"] * len(values))
    with pytest.raises(refused):
        sql_rows(db_url, f"INSERT INTO koban_jobs ({columns}) VALUES ({marks})", [*values.values()])
    with pytest.raises(refused):
        sql_rows(db_url, f"UPDATE koban_jobs SET {column} = %s WHERE id = %s", [value, job_id])
    rows = sql_rows(db_url, "SELECT id, worker, queue, state, priority, attempt FROM koban_jobs")
    assert rows == [(job_id, "w.raw", "default", "available", 0, 0)]


async def test_not_migrated_database(fresh_db_url: str) -> None:
    app = make_app(fresh_db_url)
    try:
        with pytest.raises(koban.SchemaNotMigratedError, match="koban migrate"):
            app.enqueue(Job(worker="w.x"))
        with pytest.raises(koban.SchemaNotMigratedError, match="koban migrate"):
            await app.aenqueue(Job(worker="w.x"))
    finally:
        await app.close()


def test_malformed_database_urls() -> None:
    for url in ("postgresql://root@[bad/x", "postgresql://a b@host/db", "no-scheme-here"):
        with pytest.raises(koban.ConfigurationError):
            koban.Koban(url)
    with pytest.raises(koban.ConfigurationError, match="mysql"):
        koban.Koban("mysql://root@localhost/app")


async def test_database_down_is_database_unavailable() -> None:
    # Port 1 on localhost: nothing listens there, the connection is refused at once.
    app = koban.Koban("postgresql://root@127.0.0.1:1/koban")
    try:
        with pytest.raises(koban.DatabaseUnavailableError, match=r"127\.0\.0\.1") as raised:
            app.enqueue(Job(worker="w.x"))
        assert "Check the server is running" in str(raised.value)
        with pytest.raises(koban.DatabaseUnavailableError):
            await app.aenqueue(Job(worker="w.x"))
        with pytest.raises(koban.DatabaseUnavailableError):
            await app.start()
    finally:
        await app.close()


def test_password_is_not_shown_in_errors() -> None:
    app = koban.Koban("postgresql://root:s3cret-pw@127.0.0.1:1/koban")
    with pytest.raises(koban.DatabaseUnavailableError) as raised:
        app.enqueue(Job(worker="w.x"))
    assert "s3cret-pw" not in str(raised.value)


def test_sqlite_in_a_missing_directory(tmp_path: Path) -> None:
    missing = tmp_path / "no" / "such" / "dir" / "jobs.db"
    with pytest.raises(koban.KobanError, match=re.escape(str(missing.parent))):
        app = koban.Koban(f"sqlite:///{missing}")
        app.enqueue(Job(worker="w.x"))
    assert not missing.parent.exists()
