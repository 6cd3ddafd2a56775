"""Shared fixtures: a real PostgreSQL database and a real SQLite file, isolated per test.

PostgreSQL: `KOBAN_TEST_DATABASE_URL` (default postgresql://root@127.0.0.1:5432/koban_test);
the database is created if missing, migrated once per session, and every koban table is
truncated before each test that uses it.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo

import koban
from helpers import AppFactory, make_app
from koban.engines.base import create_engine

PG_URL = os.environ.get("KOBAN_TEST_DATABASE_URL", "postgresql://root@127.0.0.1:5432/koban_test")
KOBAN_TABLES = ("koban_jobs", "koban_nodes", "koban_leader", "koban_queues", "koban_cron")


def ensure_pg_database(url: str) -> None:
    """Create the database named in `url` if it does not exist."""
    params = conninfo_to_dict(url)
    name = params.get("dbname")
    admin = make_conninfo(url, dbname="postgres")
    with psycopg.connect(admin, autocommit=True) as conn:
        exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone()
        if not exists:
            conn.execute(f'CREATE DATABASE "{name}"')


def reset_pg(url: str) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f"TRUNCATE {', '.join(KOBAN_TABLES)} RESTART IDENTITY")


@pytest.fixture(scope="session")
def pg_session_url() -> str:
    ensure_pg_database(PG_URL)
    create_engine(PG_URL).migrate()
    return PG_URL


@pytest.fixture
def pg_url(pg_session_url: str) -> Iterator[str]:
    """A migrated, empty PostgreSQL database."""
    reset_pg(pg_session_url)
    yield pg_session_url


@pytest.fixture
def sqlite_url(tmp_path: Path) -> Iterator[str]:
    """A migrated, empty SQLite file of this test's own."""
    url = f"sqlite:///{tmp_path / 'koban.db'}"
    create_engine(url).migrate()
    yield url


@pytest.fixture(params=["postgres", "sqlite"])
def db_url(request: pytest.FixtureRequest) -> str:
    """Each engine in turn: tests using this fixture form the conformance suite."""
    fixture = "pg_url" if request.param == "postgres" else "sqlite_url"
    return request.getfixturevalue(fixture)


@pytest.fixture
def fresh_pg_url(pg_session_url: str) -> Iterator[str]:
    """A PostgreSQL database with no koban schema (dropped and created again per test)."""
    params = conninfo_to_dict(pg_session_url)
    name = f"{params.get('dbname')}_fresh"
    admin = make_conninfo(pg_session_url, dbname="postgres")
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{name}"')
    yield urlunsplit(urlsplit(pg_session_url)._replace(path=f"/{name}"))


@pytest.fixture(params=["postgres", "sqlite"])
def fresh_db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Each engine in turn, as a database koban has never migrated."""
    if request.param == "postgres":
        return request.getfixturevalue("fresh_pg_url")
    return f"sqlite:///{tmp_path / 'fresh.db'}"


@pytest.fixture
async def apps(db_url: str) -> AsyncIterator[AppFactory]:
    """Build apps on the engine under test (`apps(**Koban options)`); all are closed after."""
    created: list[koban.Koban] = []

    def factory(**options: Any) -> koban.Koban:
        app = make_app(db_url, **options)
        created.append(app)
        return app

    yield factory
    for app in created:
        await app.close()
