"""SQLite-only behaviour: files that are not usable databases, locking between processes, claims
across processes, and wake-ups (in memory within a process, polled across processes).

Everything else the SQLite engine does is covered, with PostgreSQL, by tests/conformance/.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import random
import sqlite3
import subprocess
import sys
import threading
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

import koban
from helpers import DEADLINE, await_until, make_app, sqlite_path, subprocess_env
from koban.engines.base import INSERT_CHANNEL, SIGNAL_CHANNEL, create_engine
from koban.engines.sqlite import SQLiteEngine
from koban.engines.sqlite import notifier as sqlite_notifier
from koban.engines.sqlite.connection import check_library, path_from_url
from koban.engines.sqlite.engine import LATEST_VERSION
from koban.errors import (
    ConfigurationError,
    DatabaseError,
    DatabaseUnavailableError,
    SchemaNotMigratedError,
    SchemaTooNewError,
)
from koban.job import Job, JobState

ALL_VERSIONS = list(range(1, LATEST_VERSION + 1))


def fingerprint(path: Path) -> tuple[str, int]:
    """A file's content hash and modification time, to show nothing wrote to it."""
    return hashlib.sha256(path.read_bytes()).hexdigest(), path.stat().st_mtime_ns


def siblings(path: Path) -> list[str]:
    """SQLite's side files (-wal, -shm, -journal) next to `path`."""
    return sorted(p.name for p in path.parent.glob(path.name + "-*"))


@pytest.fixture
def engine(sqlite_url: str) -> Iterator[SQLiteEngine]:
    """A SQLite engine on a migrated file; its sync connections are closed after the test."""
    eng = SQLiteEngine(sqlite_url)
    yield eng
    eng.close_sync()


@pytest.fixture
async def opened(engine: SQLiteEngine) -> AsyncIterator[SQLiteEngine]:
    """The same engine, open for async calls."""
    await engine.open()
    yield engine
    await engine.close()


def run_script(script: str, url: str, *args: str) -> subprocess.CompletedProcess[str]:
    """Run a Python snippet in a child process with koban importable; fail on a non-zero exit."""
    proc = subprocess.run(
        [sys.executable, "-c", script, url, *args],
        env=subprocess_env(url),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, f"child failed:\n{proc.stderr}"
    return proc


# ----- URLs and the library ---------------------------------------------------------------------
def test_relative_and_absolute_urls(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert path_from_url("sqlite:///jobs/koban.db") == str(tmp_path / "jobs" / "koban.db")
    assert path_from_url("sqlite:////srv/app/koban.db") == "/srv/app/koban.db"
    # The path is fixed when the engine is made, whatever the working directory becomes.
    engine = create_engine("sqlite:///koban.db")
    monkeypatch.chdir("/")
    assert isinstance(engine, SQLiteEngine) and engine.path == str(tmp_path / "koban.db")


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("sqlite://host/koban.db", "names a host"),
        ("sqlite:///", "has no file path"),
        ("sqlite:///:memory:", "in-memory"),
        ("sqlite:///koban.db?mode=ro", "query parameters"),
    ],
)
def test_malformed_urls_are_refused(url: str, message: str) -> None:
    with pytest.raises(ConfigurationError, match=message) as raised:
        create_engine(url)
    assert "sqlite:///relative/path.db" in str(raised.value)  # and shows the right form


def test_a_sqlite_library_without_returning_is_refused() -> None:
    with pytest.raises(
        ConfigurationError, match=r"needs SQLite 3\.35.*linked with SQLite 3\.31\.1"
    ):
        check_library((3, 31, 1))
    check_library((3, 35, 0))


# ----- bad files --------------------------------------------------------------------------------
async def test_a_missing_directory_is_named_and_not_created(tmp_path: Path) -> None:
    path = tmp_path / "no" / "such" / "jobs.db"
    engine = SQLiteEngine(f"sqlite:///{path}")
    calls = [engine.migrate, engine.migration_status, lambda: engine.insert_sync([Job(worker="w")])]
    for call in calls:
        with pytest.raises(ConfigurationError, match=f"directory {path.parent} does not exist"):
            call()
    with pytest.raises(ConfigurationError, match="mkdir -p"):
        await engine.open()
    assert not path.parent.exists()


def test_a_path_that_is_a_directory_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="is a directory"):
        SQLiteEngine(f"sqlite:///{tmp_path}").migrate()


async def test_a_read_only_file_is_refused_and_left_alone(sqlite_url: str) -> None:
    path = Path(sqlite_path(sqlite_url))
    os.chmod(path, 0o444)
    try:
        before = fingerprint(path)
        engine = SQLiteEngine(sqlite_url)
        for call in (engine.migrate, lambda: engine.insert_sync([Job(worker="w")])):
            with pytest.raises(DatabaseUnavailableError, match="is read-only") as raised:
                call()
            assert str(path) in str(raised.value) and "chmod u+w" in str(raised.value)
        with pytest.raises(DatabaseUnavailableError, match="is read-only"):
            await engine.open()
        assert fingerprint(path) == before
    finally:
        os.chmod(path, 0o644)


FOREIGN_CONTENTS = {
    "text": b"name,email\nada,ada@example.com\n",
    "png": b"\x89PNG\r\n\x1a\n" + random.Random(1).randbytes(3000),
    "random": random.Random(2).randbytes(8192),
    "tiny": b"x",
}


@pytest.mark.parametrize("kind", sorted(FOREIGN_CONTENTS))
async def test_a_file_that_is_not_a_database_is_never_modified(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "important.db"
    path.write_bytes(FOREIGN_CONTENTS[kind])
    before = fingerprint(path)
    engine = SQLiteEngine(f"sqlite:///{path}")
    calls = [
        engine.migrate,
        engine.migration_status,
        lambda: engine.insert_sync([Job(worker="w")]),
        lambda: engine.list_jobs_sync(koban.JobFilter()),
    ]
    for call in calls:
        with pytest.raises(ConfigurationError, match="is not a SQLite database") as raised:
            call()
        assert str(path) in str(raised.value) and "leaves it untouched" in str(raised.value)
    with pytest.raises(ConfigurationError, match="is not a SQLite database"):
        await engine.open()
    engine.close_sync()
    assert fingerprint(path) == before
    assert siblings(path) == []


def make_plain_database(path: Path) -> int:
    """A SQLite database of another application, several pages long; returns its page size."""
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE notes (id INTEGER PRIMARY KEY, body TEXT)")
    conn.executemany("INSERT INTO notes (body) VALUES (?)", [("x" * 200,) for _ in range(500)])
    conn.commit()
    page_size = int(conn.execute("PRAGMA page_size").fetchone()[0])
    conn.close()
    return page_size


@pytest.mark.parametrize("damaged_page", [1, 5], ids=["schema-page", "data-page"])
def test_a_corrupt_database_is_never_modified(tmp_path: Path, damaged_page: int) -> None:
    path = tmp_path / "app.db"
    page_size = make_plain_database(path)
    data = bytearray(path.read_bytes())
    # Keep the 100-byte file header on page 1 so SQLite opens the file and finds the damage.
    start = (damaged_page - 1) * page_size + (100 if damaged_page == 1 else 0)
    data[start : start + 64] = random.Random(3).randbytes(64)
    path.write_bytes(bytes(data))
    before = fingerprint(path)
    with pytest.raises(DatabaseError, match=r"corrupt|malformed") as raised:
        SQLiteEngine(f"sqlite:///{path}").migrate()
    assert str(path) in str(raised.value) and "does not modify it" in str(raised.value)
    assert fingerprint(path) == before


def test_migrate_adds_koban_tables_to_a_healthy_database_of_another_app(tmp_path: Path) -> None:
    path = tmp_path / "app.db"
    make_plain_database(path)
    engine = SQLiteEngine(f"sqlite:///{path}")
    assert engine.migrate() == ALL_VERSIONS
    conn = sqlite3.connect(path)
    assert conn.execute("SELECT count(*) FROM notes").fetchone() == (500,)
    conn.close()


async def test_a_database_from_a_newer_koban_is_refused(engine: SQLiteEngine) -> None:
    conn = sqlite3.connect(engine.path)
    conn.execute("INSERT INTO koban_schema (version, applied_at) VALUES (99, 0)")
    conn.commit()
    conn.close()
    calls = [engine.migrate, lambda: engine.insert_sync([Job(worker="w")])]
    for call in calls:
        with pytest.raises(SchemaTooNewError, match="schema version 99") as raised:
            call()
        assert engine.path in str(raised.value) and "Upgrade koban" in str(raised.value)
    with pytest.raises(SchemaTooNewError):
        await engine.open()
    assert engine.migration_status().current == 99


async def test_an_unmigrated_file_is_reported_and_not_created(tmp_path: Path) -> None:
    path = tmp_path / "new.db"
    engine = SQLiteEngine(f"sqlite:///{path}")
    status = engine.migration_status()
    assert (status.current, status.up_to_date) == (None, False)
    with pytest.raises(SchemaNotMigratedError, match="koban migrate --database sqlite:///"):
        await engine.open()
    with pytest.raises(SchemaNotMigratedError):
        engine.insert_sync([Job(worker="w")])
    assert not path.exists()
    assert engine.migrate() == ALL_VERSIONS
    assert engine.migrate() == []
    assert engine.migration_status().up_to_date


def test_migration_sql_builds_the_same_schema(tmp_path: Path) -> None:
    """`koban migrate --sql` output, run by another tool, gives a database koban accepts."""
    path = tmp_path / "by-hand.db"
    conn = sqlite3.connect(path)
    conn.executescript(SQLiteEngine.migration_sql())
    conn.close()
    engine = SQLiteEngine(f"sqlite:///{path}")
    assert engine.migration_status().up_to_date
    [job] = engine.insert_sync([Job(worker="w")])
    assert job.id == 1
    engine.close_sync()


# ----- storage ----------------------------------------------------------------------------------
def test_times_come_back_exact_and_in_utc(engine: SQLiteEngine) -> None:
    at = datetime(2031, 5, 6, 7, 8, 9, 123456, tzinfo=timezone(timedelta(hours=2)))
    now = datetime(2031, 5, 6, 1, 0, 0, 654321, tzinfo=UTC)
    [job] = engine.insert_sync([Job(worker="w", scheduled_at=at)], now=now)
    stored = engine.get_job_sync(job.id or 0)
    assert stored is not None and stored.state is JobState.SCHEDULED
    assert stored.scheduled_at == at and stored.scheduled_at.tzinfo is UTC
    assert stored.inserted_at == now and stored.inserted_at.tzinfo is UTC


def test_the_file_is_in_wal_mode_with_a_busy_timeout(engine: SQLiteEngine) -> None:
    conn = sqlite3.connect(engine.path)
    assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    conn.close()
    own = engine.connect()
    assert own.execute("PRAGMA busy_timeout").fetchone()[0] == 30_000
    assert own.execute("PRAGMA synchronous").fetchone()[0] == 1  # NORMAL
    own.close()


# ----- locking ----------------------------------------------------------------------------------
def hold_write_lock(path: str) -> sqlite3.Connection:
    """Another connection in the middle of a write transaction."""
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    conn.execute("BEGIN IMMEDIATE")
    conn.execute("INSERT INTO koban_queues (name) VALUES ('held')")
    return conn


def test_a_write_waits_for_another_connections_transaction(engine: SQLiteEngine) -> None:
    holder = hold_write_lock(engine.path)
    outcome: list[Any] = []

    def enqueue() -> None:
        try:
            outcome.append(engine.insert_sync([Job(worker="w")]))
        except Exception as exc:
            outcome.append(exc)

    thread = threading.Thread(target=enqueue)
    thread.start()
    thread.join(0.5)
    assert thread.is_alive(), f"the insert did not wait for the lock: {outcome}"
    holder.execute("COMMIT")
    holder.close()
    thread.join(DEADLINE)
    assert len(outcome) == 1 and isinstance(outcome[0], list), outcome
    assert [j.state for j in outcome[0]] == [JobState.AVAILABLE]


def test_a_lock_held_too_long_is_a_clear_error(sqlite_url: str) -> None:
    engine = SQLiteEngine(sqlite_url, busy_timeout=0.2)
    holder = hold_write_lock(engine.path)
    try:
        with pytest.raises(DatabaseUnavailableError, match="stayed locked") as raised:
            engine.insert_sync([Job(worker="w")])
        assert engine.path in str(raised.value) and "more than 0.2 s" in str(raised.value)
    finally:
        holder.execute("ROLLBACK")
        holder.close()
        engine.close_sync()
    assert engine.insert_sync([Job(worker="w")])[0].id is not None
    engine.close_sync()


async def test_opening_more_connections_keeps_this_process_s_locks(opened: SQLiteEngine) -> None:
    """Regression: reading the file outside SQLite dropped this process's POSIX locks, so another
    process closing its connection checkpointed and deleted the WAL still in use here."""
    await opened.insert([Job(worker="w")])
    opened.insert_sync([Job(worker="w")])  # a new sync connection while the async one is open
    run_script(
        "import sqlite3, sys\n"
        "conn = sqlite3.connect(sys.argv[1].split('sqlite:///', 1)[1])\n"
        "conn.execute(\"INSERT INTO koban_queues (name) VALUES ('other')\")\n"
        "conn.commit()\n"
        "conn.close()\n",
        opened.url,
    )
    await opened.insert([Job(worker="w")])
    check = sqlite3.connect(opened.path)
    assert check.execute("SELECT count(*) FROM koban_jobs").fetchone() == (3,)
    check.close()


ENQUEUER = """
import sys
from koban.engines.base import create_engine
from koban.job import Job

url, worker, tag = sys.argv[1:4]
count, batch = int(sys.argv[4]), int(sys.argv[5])
engine = create_engine(url)
print("ready", flush=True)
sys.stdin.readline()
for start in range(0, count, batch):
    engine.insert_sync([Job(worker=worker, args={"by": tag, "i": i})
                        for i in range(start, min(count, start + batch))])
engine.close_sync()
"""

RUNS: Counter[int] = Counter()


async def count_run(job: Job) -> None:
    RUNS[job.id or 0] += 1


def start_children(script: str, url: str, argvs: list[list[str]]) -> list[subprocess.Popen[str]]:
    """Start one child per argv, wait until each printed "ready", then release them together."""
    children = [
        subprocess.Popen(
            [sys.executable, "-c", script, url, *argv],
            env=subprocess_env(url),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for argv in argvs
    ]
    for child in children:
        assert child.stdout is not None and child.stdout.readline().strip() == "ready", (
            child.communicate(timeout=DEADLINE)[1]
        )
    for child in children:
        assert child.stdin is not None
        child.stdin.write("go\n")
        child.stdin.flush()
    return children


def finish(child: subprocess.Popen[str]) -> str:
    """The child's output once it exits; fails on a non-zero exit or anything on stderr."""
    out, err = child.communicate(timeout=60)
    assert child.returncode == 0 and not err.strip(), f"child failed ({child.returncode}):\n{err}"
    return out


async def test_processes_enqueue_while_a_node_works_without_locking_errors(
    sqlite_url: str,
) -> None:
    RUNS.clear()
    app = make_app(sqlite_url, queues={"default": 10})
    app.worker(count_run)
    worker = next(iter(app.workers))
    # Single inserts (many short transactions) and batches, from three processes at once.
    plan = [("one-by-one", 300, 1), ("pairs", 300, 2), ("batches", 400, 50)]
    total = sum(count for _tag, count, _batch in plan)
    async with app:
        children = await asyncio.to_thread(
            start_children,
            ENQUEUER,
            sqlite_url,
            [[worker, tag, str(count), str(batch)] for tag, count, batch in plan],
        )
        for child in children:
            await asyncio.to_thread(finish, child)

        async def all_completed() -> bool:
            counts = await app.engine.count_by_queue_and_state()
            return counts.get("default", {}).get("completed", 0) == total

        await await_until(all_completed, 60, what=f"{total} jobs completed")
    assert len(RUNS) == total and set(RUNS.values()) == {1}, "a job ran twice or never"
    jobs = app.list_jobs()
    assert Counter(j.args["by"] for j in jobs) == {tag: count for tag, count, _ in plan}
    assert {j.attempt for j in jobs} == {1}


CLAIMER = """
import asyncio, json, sys
from koban.engines.base import create_engine

async def main() -> None:
    url, name = sys.argv[1], sys.argv[2]
    engine = create_engine(url)
    await engine.open()
    print("ready", flush=True)
    await asyncio.to_thread(sys.stdin.readline)
    claimed = []
    while jobs := await engine.fetch("claims", 7, name, "p"):
        claimed += [job.id for job in jobs]
    await engine.close()
    print(json.dumps(claimed))

asyncio.run(main())
"""


def test_concurrent_fetches_in_several_processes_never_claim_a_job_twice(
    engine: SQLiteEngine,
) -> None:
    n = 3000
    inserted = engine.insert_sync([Job(worker="w", queue="claims") for _ in range(n)])
    children = start_children(CLAIMER, engine.url, [["node-a"], ["node-b"], ["node-c"]])
    claims = [json.loads(finish(child)) for child in children]
    every = [job_id for claimed in claims for job_id in claimed]
    twice = [job_id for job_id, count in Counter(every).items() if count > 1]
    assert twice == [], f"{len(twice)} jobs were claimed by two processes, e.g. {twice[:10]}"
    assert sorted(every) == sorted(j.id for j in inserted)
    assert sum(1 for claimed in claims if claimed) >= 2, "the processes did not fetch together"
    jobs = engine.list_jobs_sync(koban.JobFilter(queues=["claims"]))
    assert {(j.state, j.attempt) for j in jobs} == {(JobState.EXECUTING, 1)}
    by_node = Counter((j.attempted_by or ["?"])[0] for j in jobs)
    assert by_node == {f"node-{x}": len(c) for x, c in zip("abc", claims, strict=True) if c}


# ----- notifications ----------------------------------------------------------------------------
class Inbox:
    """A listen() handler that keeps what it receives, and the listener's health."""

    def __init__(self) -> None:
        self.notes: list[tuple[str, dict[str, Any]]] = []
        self.healthy: list[bool] = []

    def __call__(self, channel: str, payload: dict[str, Any]) -> None:
        self.notes.append((channel, payload))

    def on_state(self, healthy: bool) -> None:
        self.healthy.append(healthy)


@pytest.fixture
async def inbox(opened: SQLiteEngine) -> AsyncIterator[Inbox]:
    """A listener on the test's database, running until the test ends."""
    box = Inbox()
    task = asyncio.create_task(opened.listen(box, box.on_state))
    await await_until(lambda: box.healthy == [True], what="the listener to start")
    yield box
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


async def test_in_process_wake_ups_arrive_without_polling(
    opened: SQLiteEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Listeners that poll only once an hour: anything that arrives came through memory.
    monkeypatch.setattr(sqlite_notifier, "POLL_SECONDS", 3600.0)
    box = Inbox()
    task = asyncio.create_task(opened.listen(box, box.on_state))
    try:
        await await_until(lambda: box.healthy == [True], what="the listener to start")
        await asyncio.sleep(0)  # let it reach its hour-long sleep
        other = SQLiteEngine(opened.url)  # another engine on the same file, in another thread
        jobs = [
            Job(worker="w", queue="mail"),
            Job(worker="w", queue="mail"),
            Job(worker="w", queue="reports"),
            Job(worker="w", queue="later", schedule_in=60),
        ]
        await asyncio.to_thread(other.insert_sync, jobs)
        await await_until(lambda: len(box.notes) >= 2, what="wake-ups for mail and reports")
        # One per queue that gained available jobs; a scheduled job wakes nobody yet.
        assert box.notes == [
            (INSERT_CHANNEL, {"queue": "mail"}),
            (INSERT_CHANNEL, {"queue": "reports"}),
        ]
        await opened.notify(SIGNAL_CHANNEL, {"action": "pause", "queue": "mail"})
        await await_until(lambda: len(box.notes) == 3, what="the signal")
        assert box.notes[-1] == (SIGNAL_CHANNEL, {"action": "pause", "queue": "mail"})
        other.close_sync()
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


NOTIFIER = """
import sys
from koban.engines.base import create_engine
engine = create_engine(sys.argv[1])
engine.notify_sync("signal", {"action": "resume", "queue": sys.argv[2]})
engine.close_sync()
"""


async def test_other_processes_notifications_arrive_by_polling_and_once(
    opened: SQLiteEngine, inbox: Inbox
) -> None:
    # This process's own insert is delivered in memory; polling must not deliver it again.
    await opened.insert([Job(worker="w", queue="mail")])
    await await_until(lambda: inbox.notes, what="the in-process wake-up")
    await asyncio.to_thread(run_script, NOTIFIER, opened.url, "fence")
    fence = (SIGNAL_CHANNEL, {"action": "resume", "queue": "fence"})
    await await_until(lambda: fence in inbox.notes, what="the other process's notification")
    # The fence row was written after this process's own row: a duplicate would come before it.
    assert inbox.notes == [(INSERT_CHANNEL, {"queue": "mail"}), fence]


async def test_jobs_inserted_in_the_callers_transaction_wake_nodes_after_commit(
    opened: SQLiteEngine, inbox: Inbox
) -> None:
    conn = sqlite3.connect(opened.path, timeout=30)
    try:
        [job] = opened.insert_sync([Job(worker="w", queue="billing")], conn=conn)
        conn.commit()
    finally:
        conn.close()
    await await_until(
        lambda: (INSERT_CHANNEL, {"queue": "billing"}) in inbox.notes, what="the wake-up"
    )
    assert inbox.notes == [(INSERT_CHANNEL, {"queue": "billing"})]
    assert (await opened.get_job(job.id or 0)) is not None


def test_callers_connection_must_be_sqlite3_to_the_same_file(
    engine: SQLiteEngine, tmp_path: Path
) -> None:
    elsewhere = sqlite3.connect(tmp_path / "other.db")
    with pytest.raises(ConfigurationError, match="pass a connection to"):
        engine.insert_sync([Job(worker="w")], conn=elsewhere)
    elsewhere.close()
    with pytest.raises(ConfigurationError, match=r"must be a sqlite3\.Connection"):
        engine.insert_sync([Job(worker="w")], conn=object())


def test_an_autocommit_callers_connection_inserts_the_batch_atomically(
    engine: SQLiteEngine,
) -> None:
    conn = sqlite3.connect(engine.path, isolation_level=None)
    try:
        jobs = engine.insert_sync([Job(worker="w"), Job(worker="w")], conn=conn)
        assert not conn.in_transaction
        bad = [Job(worker="w"), Job(worker="w", priority=42)]  # the second breaks a CHECK
        with pytest.raises(sqlite3.IntegrityError):
            engine.insert_sync(bad, conn=conn)
    finally:
        conn.close()
    assert [j.id for j in engine.list_jobs_sync(koban.JobFilter())] == [
        j.id for j in reversed(jobs)
    ]


async def test_the_listener_reports_failure_and_recovers(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'late.db'}"
    engine = SQLiteEngine(url)
    box = Inbox()
    task = asyncio.create_task(engine.listen(box, box.on_state))
    try:
        await await_until(lambda: box.healthy == [False], what="the listener to report failure")
        engine.migrate()
        await await_until(lambda: box.healthy == [False, True], what="the listener to recover")
        await asyncio.to_thread(run_script, NOTIFIER, url, "after")
        await await_until(lambda: box.notes, what="a notification after recovery")
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert task.cancelled(), "listen() must end only by cancellation"
