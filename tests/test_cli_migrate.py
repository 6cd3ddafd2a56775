"""`koban migrate` on both engines, and the CLI's one-line errors with non-zero exit codes."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest
from click.testing import CliRunner, Result

from helpers import TESTS_DIR, is_postgres, sqlite_path, subprocess_env
from koban.cli import main
from koban.engines.base import create_engine

DEAD_URL = "postgresql://root@127.0.0.1:1/koban"


def run(*args: str, env: dict[str, str] | None = None) -> Result:
    return CliRunner().invoke(main, list(args), env=env, catch_exceptions=False)


def assert_one_line_error(result: Result, code: int) -> str:
    """The command failed with `code` and said why in exactly one line, no traceback."""
    assert result.exit_code == code, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("koban: error: ")
    assert "Traceback" not in result.output
    return lines[0]


def test_migrate_is_idempotent(fresh_db_url: str) -> None:
    first = run("migrate", "--database", fresh_db_url)
    assert first.exit_code == 0, first.output
    assert "applied migration(s) 1" in first.stdout

    second = run("migrate", "--database", fresh_db_url)
    assert second.exit_code == 0, second.output
    assert "already up to date" in second.stdout
    assert create_engine(fresh_db_url).migration_status().up_to_date


def test_migrate_status_before_and_after(fresh_db_url: str) -> None:
    before = run("migrate", "--status", "--database", fresh_db_url)
    assert before.exit_code == 0, before.output
    assert "schema version none" in before.stdout and "needs `koban migrate`" in before.stdout
    # --status only reads: the database is still not migrated.
    assert create_engine(fresh_db_url).migration_status().current is None

    run("migrate", "--database", fresh_db_url)
    after = run("migrate", "--status", "--database", fresh_db_url)
    assert after.exit_code == 0, after.output
    latest = create_engine(fresh_db_url).migration_status().latest
    assert f"schema version {latest} (latest {latest}): up to date" in after.stdout


def test_migrate_sql_is_what_your_own_migration_tool_runs(fresh_db_url: str) -> None:
    result = run("migrate", "--sql", "--database", fresh_db_url)
    assert result.exit_code == 0, result.output
    script = result.stdout
    assert "CREATE TABLE" in script and "koban_jobs" in script
    assert create_engine(fresh_db_url).migration_status().current is None  # printed, not run

    # Applied by "another tool", the schema is the one koban expects.
    if is_postgres(fresh_db_url):
        with psycopg.connect(fresh_db_url, autocommit=True) as conn:
            conn.execute(script.encode())
    else:
        conn = sqlite3.connect(sqlite_path(fresh_db_url))
        try:
            conn.executescript(script)
        finally:
            conn.close()
    assert create_engine(fresh_db_url).migration_status().up_to_date
    again = run("migrate", "--database", fresh_db_url)
    assert "already up to date" in again.stdout


def test_migrate_takes_the_database_from_the_environment(fresh_db_url: str) -> None:
    result = run("migrate", env={"KOBAN_DATABASE_URL": fresh_db_url})
    assert result.exit_code == 0, result.output
    assert create_engine(fresh_db_url).migration_status().up_to_date


def test_migrate_takes_the_database_from_an_app(
    fresh_db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KOBAN_DATABASE_URL", fresh_db_url)
    monkeypatch.syspath_prepend(str(TESTS_DIR))
    # The app module reads the URL at import: import it afresh for this database.
    monkeypatch.delitem(sys.modules, "apps.nodeapp", raising=False)
    result = run("migrate", "--app", "apps.nodeapp:app")
    assert result.exit_code == 0, result.output
    assert create_engine(fresh_db_url).migration_status().up_to_date


@pytest.mark.parametrize(
    ("url", "code", "says"),
    [
        ("postgresql://a b@localhost/app", 2, "malformed"),
        ("postgresql://root@[::1/app", 2, "malformed"),
        ("mysql://root@localhost/app", 2, "'mysql' is not supported"),
        ("just-a-path.db", 2, "is not a URL"),
        (DEAD_URL, 3, "cannot connect to PostgreSQL at postgresql://root@127.0.0.1:1/koban"),
    ],
)
@pytest.mark.parametrize("flag", [None, "--status"])
def test_migrate_errors_are_one_line(url: str, code: int, says: str, flag: str | None) -> None:
    args = ["migrate", "--database", url] + ([flag] if flag else [])
    line = assert_one_line_error(run(*args), code)
    assert says in line


def test_migrate_hides_the_password() -> None:
    line = assert_one_line_error(
        run("migrate", "--database", "postgresql://root:hunter2@127.0.0.1:1/koban"), 3
    )
    assert "hunter2" not in line


def test_start_errors_are_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(TESTS_DIR))
    monkeypatch.setenv("KOBAN_DATABASE_URL", f"sqlite:///{tmp_path / 'unused.db'}")
    monkeypatch.delitem(sys.modules, "apps.nodeapp", raising=False)
    cases = [
        (["--app", "no_such_module:app"], 2, "cannot import 'no_such_module'"),
        (["--app", "apps.nodeapp:nothing"], 2, "no attribute 'nothing'"),
        (["--app", "apps.nodeapp"], 2, "must look like 'package.module:app'"),
        (["--app", "apps.nodeapp:record"], 2, "not a koban.Koban application"),
        (["--app", "apps.nodeapp:app", "--queues", "default=many"], 2, "whole number"),
        (["--app", "apps.nodeapp:app", "--queues", "default"], 2, "NAME=SLOTS"),
    ]
    for args, code, says in cases:
        line = assert_one_line_error(run("start", *args), code)
        assert says in line, line


def test_cli_exit_codes_from_a_real_process(fresh_db_url: str, tmp_path: Path) -> None:
    """The installed entry point, not just click's runner: exit codes and stderr."""

    def koban(*args: str, url: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "koban.cli", *args],
            env=subprocess_env(url),
            cwd=str(tmp_path),
            capture_output=True,
            text=True,
            timeout=60,
        )

    down = koban("start", "--app", "apps.nodeapp:app", url=DEAD_URL)
    assert down.returncode == 3, down.stderr
    assert "cannot connect to PostgreSQL" in down.stderr and "Traceback" not in down.stderr

    unmigrated = koban("start", "--app", "apps.nodeapp:app", url=fresh_db_url)
    assert unmigrated.returncode == 3, unmigrated.stderr
    assert "koban migrate" in unmigrated.stderr and "Traceback" not in unmigrated.stderr

    ok = koban("migrate", url=fresh_db_url)
    assert ok.returncode == 0, ok.stderr
    assert koban("migrate", url=fresh_db_url).stdout.strip().endswith("already up to date")
