"""SQLite engine: the contract in `koban.engines.base`, on the standard library's sqlite3.

Every operation is a plain function of a connection (`_op_*`): reads take `(conn)`, writes take
`(conn, outbox)` and run inside `write_transaction` (BEGIN IMMEDIATE ... COMMIT), where
`outbox` collects the notifications to deliver once the transaction commits. An operation runs

* for async calls, on the engine's own worker thread and connection, so the event loop never
  waits on SQLite (`await self._read(op)`, `await self._write(op)`);
* for sync calls (`*_sync`), right in the caller's thread, on a connection lent from a small
  pool (`self._read_sync(op)`, `self._write_sync(op)`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import json
import logging
import os
import sqlite3
from collections.abc import Awaitable, Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from datetime import datetime
from typing import Any, TypeVar

from koban.engines._sql import load_migrations
from koban.engines.base import (
    INSERT_CHANNEL,
    Ack,
    CronPlan,
    CronRecord,
    Engine,
    JobFilter,
    MigrationStatus,
    NodeInfo,
    NotificationHandler,
    QueueState,
    Throughput,
    prepare_all,
)
from koban.engines.sqlite import notifier
from koban.engines.sqlite.connection import (
    DEFAULT_BUSY_TIMEOUT,
    check_file,
    check_library,
    connect,
    path_from_url,
    rollback,
    split_statements,
    translated,
    use_wal,
    write_transaction,
)
from koban.engines.sqlite.notifier import Outbox
from koban.engines.sqlite.rows import dump_json, from_us, now_us, row_to_job, to_us
from koban.engines.sqlite.sql import QUERIES
from koban.errors import (
    ConfigurationError,
    DatabaseError,
    SchemaNotMigratedError,
    SchemaTooNewError,
)
from koban.job import FINISHED_STATES, Job, JobState
from koban.unique import SUCCESSFUL_STATES, states_mask

log = logging.getLogger("koban.engine")

MIGRATIONS = load_migrations("koban.engines.sqlite.migrations")
LATEST_VERSION = MIGRATIONS[-1][0]

T = TypeVar("T")
ReadOp = Callable[[sqlite3.Connection], T]
WriteOp = Callable[[sqlite3.Connection, Outbox], T]

_JOB_COLUMNS = (
    "id", "state", "queue", "worker", "args", "meta", "tags", "errors", "priority", "attempt",
    "max_attempts", "attempted_by", "inserted_at", "scheduled_at", "attempted_at",
    "completed_at", "cancelled_at", "discarded_at", "unique_key",
)  # fmt: skip
_UNFINISHED = [str(s) for s in JobState if s not in FINISHED_STATES]
_DEFAULT_UNIQUE_MASK = states_mask((*SUCCESSFUL_STATES, JobState.EXECUTING))


def _cursor(conn: sqlite3.Connection) -> sqlite3.Cursor:
    """A cursor returning sqlite3.Row, whatever row factory the connection's owner chose."""
    cur = conn.cursor()
    cur.row_factory = sqlite3.Row
    return cur


# ----- schema ----------------------------------------------------------------------------------
def read_version(conn: sqlite3.Connection) -> int | None:
    """The newest migration applied to the database on `conn` (None: no koban schema)."""
    if conn.execute(QUERIES["has_schema_table"]).fetchone() is None:
        return None
    value = conn.execute(QUERIES["schema_version"]).fetchone()[0]
    return int(value) if value is not None else None


# ----- filters ---------------------------------------------------------------------------------
def filter_clause(flt: JobFilter) -> tuple[str, dict[str, Any]]:
    """The {where} condition and bound parameters (plus :limit) for a JobFilter."""
    parts = ["1"]
    params: dict[str, Any] = {"limit": int(flt.limit) if flt.limit else -1}

    def one_of(column: str, values: Sequence[Any]) -> None:
        name = f"f_{column}"
        if len(values) == 1:
            # Equality lets an index on (column, id) serve a newest-first list with no sort.
            parts.append(f"{column} = :{name}")
            params[name] = values[0]
        else:
            parts.append(f"{column} IN (SELECT value FROM json_each(:{name}))")
            params[name] = json.dumps(list(values))

    if flt.ids is not None:
        one_of("id", [int(i) for i in flt.ids] or [None])  # no ids: nothing matches
    if flt.states:
        one_of("state", [str(JobState(s)) for s in flt.states])
    if flt.queues:
        one_of("queue", list(flt.queues))
    if flt.workers:
        one_of("worker", list(flt.workers))
    if flt.tags:
        # Every wanted tag is among the job's tags (PostgreSQL's `tags @> wanted`).
        parts.append(
            "NOT EXISTS (SELECT 1 FROM json_each(:f_tags) AS wanted WHERE wanted.value NOT IN "
            "(SELECT value FROM json_each(koban_jobs.tags)))"
        )
        params["f_tags"] = json.dumps(list(flt.tags))
    if flt.args_text:
        parts.append("instr(args, :f_args_text) > 0")
        params["f_args_text"] = flt.args_text
    if flt.inserted_before is not None:
        parts.append("inserted_at < :f_inserted_before")
        params["f_inserted_before"] = to_us(flt.inserted_before)
    if flt.inserted_after is not None:
        parts.append("inserted_at > :f_inserted_after")
        params["f_inserted_after"] = to_us(flt.inserted_after)
    if flt.before_id is not None:
        parts.append("id < :f_before_id")
        params["f_before_id"] = int(flt.before_id)
    return " AND ".join(parts), params


def _filtered(name: str, flt: JobFilter) -> tuple[str, dict[str, Any]]:
    where, params = filter_clause(flt)
    return QUERIES[name].replace("{where}", where), params


# ----- operations ------------------------------------------------------------------------------
def _op_insert(
    conn: sqlite3.Connection, outbox: Outbox, jobs: Sequence[Job], now: datetime | None
) -> list[Job]:
    t = now_us(now)
    cur = _cursor(conn)
    out: list[Job | None] = []
    woken: dict[str, None] = {}  # queues that gained available jobs, in order
    for job in jobs:
        if job.scheduled_at is not None:
            run_at = to_us(job.scheduled_at)
        else:
            run_at = t + round((job.schedule_in or 0) * 1_000_000)
        state = "scheduled" if run_at > t else "available"
        mask = None
        if job.unique_key is not None:
            mask = job.unique.states_mask if job.unique is not None else _DEFAULT_UNIQUE_MASK
        rows = cur.execute(
            QUERIES["insert_job"],
            {
                "state": state,
                "queue": job.queue,
                "worker": job.worker,
                "args": dump_json(job.args),
                "meta": dump_json(job.meta),
                "tags": dump_json(list(job.tags)),
                "priority": job.priority,
                "max_attempts": job.max_attempts,
                "now": t,
                "scheduled_at": run_at,
                "unique_key": job.unique_key,
                "unique_states": mask,
            },
        ).fetchall()
        if rows:
            out.append(row_to_job(rows[0]))
            if state == "available":
                woken[job.queue] = None
        else:
            out.append(None)  # its unique key is held: report the holder below
    conflicts = [job.unique_key for job, got in zip(jobs, out, strict=True) if got is None]
    if conflicts:
        found = cur.execute(QUERIES["jobs_by_unique_key"], {"keys": json.dumps(conflicts)})
        by_key = {row["unique_key"]: row_to_job(row) for row in found.fetchall()}
        for i, job in enumerate(jobs):
            if out[i] is None:
                holder = by_key.get(job.unique_key) or Job(
                    worker=job.worker, args=job.args, queue=job.queue, unique_key=job.unique_key
                )
                replace = getattr(job.unique, "replace", ())
                if replace and holder.id is not None:
                    replaced = _replace(cur, holder.id, job, replace, t)
                    if replaced is not None:
                        holder = by_key[job.unique_key or ""] = replaced
                        if replaced.state is JobState.AVAILABLE:
                            woken[replaced.queue] = None
                dup = Job(**{f: getattr(holder, f) for f in _JOB_COLUMNS})
                dup.conflict = True
                out[i] = dup
    for queue in woken:
        outbox.send(conn, INSERT_CHANNEL, {"queue": queue}, t)
    return [job for job in out if job is not None]


def _op_get(conn: sqlite3.Connection, job_id: int) -> Job | None:
    row = _cursor(conn).execute(QUERIES["get_job"], {"id": job_id}).fetchone()
    return row_to_job(row) if row is not None else None


def _op_list(conn: sqlite3.Connection, flt: JobFilter) -> list[Job]:
    query, params = _filtered("list_jobs", flt)
    return [row_to_job(r) for r in _cursor(conn).execute(query, params).fetchall()]


def _op_cancel(
    conn: sqlite3.Connection, _outbox: Outbox, flt: JobFilter, now: datetime | None
) -> list[Job]:
    query, params = _filtered("cancel_jobs", flt)
    rows = _cursor(conn).execute(query, {**params, "now": now_us(now)}).fetchall()
    return sorted((row_to_job(r) for r in rows), key=lambda j: j.id or 0)


def _op_retry(
    conn: sqlite3.Connection, _outbox: Outbox, flt: JobFilter, now: datetime | None
) -> list[Job]:
    query, params = _filtered("retry_jobs", flt)
    rows = _cursor(conn).execute(query, {**params, "now": now_us(now)}).fetchall()
    return sorted((row_to_job(r) for r in rows), key=lambda j: j.id or 0)


def _op_delete(conn: sqlite3.Connection, _outbox: Outbox, flt: JobFilter) -> list[int]:
    query, params = _filtered("delete_jobs", flt)
    return sorted(r[0] for r in conn.execute(query, params).fetchall())


_MINUTE_US = 60_000_000


def _op_estimate(conn: sqlite3.Connection, flt: JobFilter) -> tuple[int, bool]:
    where, params = filter_clause(dataclasses.replace(flt, before_id=None, limit=None))
    row = conn.execute(QUERIES["estimate_jobs"].replace("{where}", where), params).fetchone()
    return int(row[0]), True


def _op_throughput(
    conn: sqlite3.Connection, minutes: int, now: datetime | None
) -> list[Throughput]:
    until = now_us(now) // _MINUTE_US * _MINUTE_US
    since = until - (minutes - 1) * _MINUTE_US
    completed = dict.fromkeys(range(since, until + 1, _MINUTE_US), 0)
    failed = dict(completed)
    for minute, n in conn.execute(QUERIES["throughput_completed"], {"since": since}):
        if minute in completed:
            completed[minute] += n
    for (errors,) in conn.execute(QUERIES["throughput_errors"], {"since": since}):
        for error in json.loads(errors):
            if not isinstance(error, dict) or error.get("type") == "koban.Cancel":
                continue
            try:
                at = to_us(datetime.fromisoformat(str(error.get("at"))))
            except (TypeError, ValueError):
                continue
            minute = at // _MINUTE_US * _MINUTE_US
            if minute in failed:
                failed[minute] += 1
    return [
        Throughput(from_us(m) or datetime.min, completed[m], failed[m]) for m in sorted(completed)
    ]


def _op_count(conn: sqlite3.Connection) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for queue, state, n in conn.execute(QUERIES["count_by_queue_and_state"]).fetchall():
        out.setdefault(queue, {})[state] = n
    return out


def _op_fetch(
    conn: sqlite3.Connection,
    _outbox: Outbox,
    queue: str,
    limit: int,
    node: str,
    producer: str,
    now: datetime | None,
) -> list[Job]:
    rows = (
        _cursor(conn)
        .execute(
            QUERIES["fetch_jobs"],
            {
                "queue": queue,
                "limit": limit,
                "now": now_us(now),
                "attempted_by": json.dumps([node, producer], ensure_ascii=False),
            },
        )
        .fetchall()
    )
    jobs = [row_to_job(r) for r in rows]
    jobs.sort(key=lambda j: (j.priority, j.scheduled_at, j.id))
    return jobs


def _op_ack(
    conn: sqlite3.Connection, _outbox: Outbox, acks: Sequence[Ack], now: datetime | None
) -> int:
    t = now_us(now)
    plain = [a for a in acks if a.state is JobState.COMPLETED and not a.meta]
    others = [a for a in acks if not (a.state is JobState.COMPLETED and not a.meta)]
    count = 0
    if plain:
        cur = conn.executemany(
            QUERIES["complete_job"],
            [{"id": a.job_id, "attempt": a.attempt, "now": t} for a in plain],
        )
        count += max(cur.rowcount, 0)
    cur = _cursor(conn)
    for a in others:
        key = {"id": a.job_id, "attempt": a.attempt}
        row = cur.execute(QUERIES["executing_attempt"], key).fetchone()
        if row is None:  # no longer executing this attempt (cancelled, rescued...)
            continue
        meta = json.loads(row["meta"])
        if a.snooze:
            snoozed = _as_int(meta.get("snoozed"))
            meta = {**meta, **(a.meta or {}), "snoozed": snoozed + 1}
        elif a.meta:
            meta = {**meta, **a.meta}
        errors = json.loads(row["errors"])
        if a.error is not None:
            errors.append(a.error)
        cur.execute(
            QUERIES["record_outcome"],
            {
                **key,
                "state": str(a.state),
                "now": t,
                "scheduled_at": t + round(a.delay * 1_000_000) if a.delay is not None else None,
                "given_back": 1 if a.snooze else 0,
                "meta": dump_json(meta),
                "errors": dump_json(errors),
            },
        )
        count += cur.rowcount
    return count


def _as_int(value: Any) -> int:
    try:
        return int(value or 0)
    except (TypeError, ValueError):
        return 0


def _op_stage(
    conn: sqlite3.Connection, _outbox: Outbox, limit: int, now: datetime | None
) -> list[str]:
    rows = conn.execute(QUERIES["stage_jobs"], {"limit": limit, "now": now_us(now)}).fetchall()
    return sorted({r[0] for r in rows})


def _op_notify(
    conn: sqlite3.Connection, outbox: Outbox, channel: str, payload: dict[str, Any]
) -> None:
    outbox.send(conn, channel, payload, now_us(None))


# ----- sync connections ------------------------------------------------------------------------
class _SyncConnections:
    """Connections for sync calls, each lent to one thread at a time and kept for reuse."""

    def __init__(self, open_connection: Callable[[], sqlite3.Connection], keep: int) -> None:
        import threading

        self._open = open_connection
        self._keep = keep
        self._lock = threading.Lock()
        self._idle: list[sqlite3.Connection] = []
        self._pid = os.getpid()
        self._inherited: list[sqlite3.Connection] = []

    @contextmanager
    def connection(self) -> Any:
        with self._lock:
            if self._pid != os.getpid():
                # Forked: connections made by the parent must not be used (or closed) here.
                self._inherited += self._idle
                self._idle, self._pid = [], os.getpid()
            conn = self._idle.pop() if self._idle else None
        if conn is None:
            conn = self._open()
        try:
            yield conn
        except BaseException:
            rollback(conn)
            conn.close()
            raise
        with self._lock:
            if len(self._idle) < self._keep and not conn.in_transaction:
                self._idle.append(conn)
                return
        conn.close()

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()


# ----- the engine ------------------------------------------------------------------------------
class SQLiteEngine(Engine):
    """Jobs in one SQLite file, shared by every thread and process on this machine.

    >>> engine = SQLiteEngine("sqlite:///var/koban.db")      # relative: ./var/koban.db
    >>> engine = SQLiteEngine("sqlite:////srv/app/koban.db")  # absolute

    Transactional enqueue: pass your own `sqlite3.Connection` to the same file as `conn=`; the
    jobs are inserted in your transaction and exist once you commit (a rollback leaves none).
    The async `insert(..., conn=...)` accepts one too and runs right in the calling thread,
    because a sqlite3 connection belongs to the thread that uses it. Open such transactions
    with BEGIN IMMEDIATE (or use `connect()`), and keep them short: while one is open no other
    connection can write, and nodes wait (up to `busy_timeout` seconds) to record outcomes.
    Jobs inserted this way wake nodes by polling, within `notifier.POLL_SECONDS`.
    """

    kind = "sqlite"
    #: Other processes' inserts are seen by listeners polling every 0.2 s; this is the
    #: fallback while that listener is failing.
    poll_interval = 1.0

    def __init__(
        self, url: str, *, busy_timeout: float = DEFAULT_BUSY_TIMEOUT, sync_connections: int = 4
    ) -> None:
        check_library()
        self.url = url
        self.path = path_from_url(url)
        self.busy_timeout = float(busy_timeout)
        self._key = os.path.realpath(self.path)
        self._executor: ThreadPoolExecutor | None = None
        self._conn: sqlite3.Connection | None = None
        self._sync = _SyncConnections(self._open_checked, keep=sync_connections)

    def __repr__(self) -> str:
        return f"<SQLiteEngine {self.path}>"

    # ----- connections ----------------------------------------------------------------------
    def _translated(self) -> Any:
        return translated(self.path, self.busy_timeout)

    def _open_checked(self) -> sqlite3.Connection:
        """A connection to the existing, migrated database, in WAL mode."""
        with self._translated():
            if check_file(self.path, create=False) is None:
                raise SchemaNotMigratedError(
                    f"SQLite database {self.path} does not exist; create it with "
                    f"`koban migrate --database {self.url}`"
                )
            conn = connect(self.path, create=False, busy_timeout=self.busy_timeout)
            try:
                # Read before any write: a corrupt file fails here and is left as it is.
                self._check_version(read_version(conn))
                use_wal(conn, self.path)
            except BaseException:
                conn.close()
                raise
            return conn

    def connect(self) -> sqlite3.Connection:
        """A sqlite3 connection to this database, set up like koban's own (WAL, busy timeout).

        For your own transactions with transactional enqueue: autocommit mode, so open them
        with `conn.execute("BEGIN IMMEDIATE")` and end them with COMMIT or ROLLBACK.
        """
        return self._open_checked()

    def _check_version(self, version: int | None) -> None:
        if version is None or version < LATEST_VERSION:
            raise SchemaNotMigratedError(
                f"the SQLite database {self.path} has koban schema version "
                f"{version or 'none'}, this koban needs {LATEST_VERSION}; run "
                f"`koban migrate --database {self.url}`"
            )
        if version > LATEST_VERSION:
            raise SchemaTooNewError(
                f"the SQLite database {self.path} has koban schema version {version}, newer "
                f"than this koban knows ({LATEST_VERSION}): it was created by a newer koban. "
                "Upgrade koban on this machine, or point the URL at another file"
            )

    def _read_sync(self, op: ReadOp[T]) -> T:
        with self._translated(), self._sync.connection() as conn:
            return op(conn)

    def _write_sync(self, op: WriteOp[T]) -> T:
        with self._translated(), self._sync.connection() as conn:
            return write_transaction(conn, op, Outbox(self._key))

    def _thread(self) -> tuple[ThreadPoolExecutor, sqlite3.Connection]:
        if self._executor is None or self._conn is None:
            raise RuntimeError(
                "the engine is not open; use `async with app:` or `await app.open()`"
            )
        return self._executor, self._conn

    async def _read(self, op: ReadOp[T]) -> T:
        """Run a read on the engine's thread and connection."""
        executor, conn = self._thread()
        return await asyncio.get_running_loop().run_in_executor(executor, self._run_read, conn, op)

    async def _write(self, op: WriteOp[T]) -> T:
        """Run a write transaction on the engine's thread and connection."""
        executor, conn = self._thread()
        return await asyncio.get_running_loop().run_in_executor(executor, self._run_write, conn, op)

    def _run_read(self, conn: sqlite3.Connection, op: ReadOp[T]) -> T:
        with self._translated():
            return op(conn)

    def _run_write(self, conn: sqlite3.Connection, op: WriteOp[T]) -> T:
        with self._translated():
            return write_transaction(conn, op, Outbox(self._key))

    # ----- lifecycle ------------------------------------------------------------------------
    async def open(self) -> None:
        if self._executor is not None:
            return
        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="koban-sqlite")
        try:
            conn = await asyncio.get_running_loop().run_in_executor(executor, self._open_checked)
        except BaseException:
            executor.shutdown(wait=False)
            raise
        self._executor, self._conn = executor, conn

    async def close(self) -> None:
        executor, conn = self._executor, self._conn
        self._executor = self._conn = None
        if executor is None:
            return
        if conn is not None:
            try:
                # Queued behind any operation still running on that thread.
                await asyncio.get_running_loop().run_in_executor(executor, conn.close)
            except Exception as exc:
                log.debug("closing %s failed: %s", self.path, exc)
        executor.shutdown(wait=False)

    def close_sync(self) -> None:
        self._sync.close()

    # ----- schema ---------------------------------------------------------------------------
    def migration_status(self) -> MigrationStatus:
        with self._translated():
            size = check_file(self.path, create=False)
            if not size:
                return MigrationStatus(current=None, latest=LATEST_VERSION)
            conn = connect(self.path, create=False, busy_timeout=self.busy_timeout)
            try:
                return MigrationStatus(current=read_version(conn), latest=LATEST_VERSION)
            finally:
                conn.close()

    def migrate(self) -> list[int]:
        with self._translated():
            size = check_file(self.path, create=True)
            conn = connect(self.path, create=True, busy_timeout=self.busy_timeout)
            try:
                return self._migrate(conn, existing=bool(size))
            finally:
                conn.close()

    def _migrate(self, conn: sqlite3.Connection, *, existing: bool) -> list[int]:
        current = read_version(conn)  # reads the schema first: a corrupt file stops here
        if current is not None and current > LATEST_VERSION:
            self._check_version(current)
        if current == LATEST_VERSION:
            use_wal(conn, self.path)
            return []
        if existing:
            # Changing a damaged file could make it worse: check it before the first write.
            problems = [r[0] for r in conn.execute("PRAGMA quick_check").fetchall()]
            if problems != ["ok"]:
                raise DatabaseError(
                    f"SQLite database {self.path} is corrupt ({'; '.join(problems[:3])}); "
                    "koban does not modify it. Restore it from a backup, or recover it with "
                    "the sqlite3 shell's .recover command"
                )
        use_wal(conn, self.path)
        applied: list[int] = []
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.execute(QUERIES["create_schema_table"])
            # Again under the write lock: another process may have migrated meanwhile.
            current = read_version(conn)
            if current is not None and current > LATEST_VERSION:
                self._check_version(current)
            for version, _name, text in MIGRATIONS:
                if current is None or version > current:
                    for statement in split_statements(text):
                        conn.execute(statement)
                    conn.execute(
                        QUERIES["record_migration"], {"version": version, "now": now_us(None)}
                    )
                    applied.append(version)
            conn.execute("COMMIT")
        except BaseException:
            rollback(conn)
            raise
        return applied

    @classmethod
    def migration_sql(cls) -> str:
        out = [
            "-- koban schema for SQLite. koban switches the file to WAL mode when it opens it.",
            "PRAGMA journal_mode = WAL;",
            QUERIES["create_schema_table"] + ";",
        ]
        for version, name, text in MIGRATIONS:
            out.append(
                f"-- {name}\n{text.strip()}\nINSERT INTO koban_schema (version) VALUES ({version});"
            )
        return "\n\n".join(out) + "\n"

    # ----- client ---------------------------------------------------------------------------
    def insert_sync(
        self,
        jobs: Sequence[Job],
        conn: Any = None,
        now: datetime | None = None,
        *,
        prepare: Callable[[Job], None] | None = None,
    ) -> list[Job]:
        if not jobs:
            return []
        prepare_all(jobs, prepare)
        if conn is not None:
            return self._insert_in_callers_transaction(conn, jobs, now)
        return self._write_sync(functools.partial(_op_insert, jobs=jobs, now=now))

    async def insert(
        self,
        jobs: Sequence[Job],
        conn: Any = None,
        now: datetime | None = None,
        *,
        prepare: Callable[[Job], None] | None = None,
    ) -> list[Job]:
        if not jobs:
            return []
        prepare_all(jobs, prepare)
        if conn is not None:
            # The caller's connection belongs to the caller's thread; the insert is as short as
            # the caller's own statements on it.
            return self._insert_in_callers_transaction(conn, jobs, now)
        return await self._write(functools.partial(_op_insert, jobs=jobs, now=now))

    def _insert_in_callers_transaction(
        self, conn: Any, jobs: Sequence[Job], now: datetime | None
    ) -> list[Job]:
        """Insert on the caller's connection, inside its transaction; never commit it."""
        if not isinstance(conn, sqlite3.Connection):
            raise ConfigurationError(
                f"conn= must be a sqlite3.Connection to {self.path} on a SQLite app, got "
                f"{type(conn).__module__}.{type(conn).__qualname__}"
            )
        self._check_same_file(conn)
        with self._translated():
            autocommit = getattr(conn, "autocommit", -1)  # Python 3.12+; -1: legacy control
            if not conn.in_transaction and (
                autocommit is True or (autocommit == -1 and conn.isolation_level is None)
            ):
                # A connection that commits every statement: the batch is its own transaction.
                return write_transaction(
                    conn, functools.partial(_op_insert, jobs=jobs, now=now), Outbox(self._key)
                )
            if not conn.in_transaction:
                # The transaction sqlite3 would open before our first INSERT; the caller's
                # commit() or rollback() ends it.
                conn.execute(f"BEGIN {conn.isolation_level or ''}")
            conn.execute("SAVEPOINT koban_insert")
            try:
                jobs_out = _op_insert(conn, Outbox(self._key, deliver_here=False), jobs, now)
            except BaseException:
                conn.execute("ROLLBACK TO koban_insert")
                conn.execute("RELEASE koban_insert")
                raise
            conn.execute("RELEASE koban_insert")
            return jobs_out

    def _check_same_file(self, conn: sqlite3.Connection) -> None:
        cur = conn.cursor()
        cur.row_factory = None
        main = next((r[2] for r in cur.execute("PRAGMA database_list") if r[1] == "main"), "")
        if not main or os.path.realpath(main) != os.path.realpath(self.path):
            raise ConfigurationError(
                f"conn= is connected to {main or 'an in-memory database'}, but this app "
                f"stores jobs in {self.path}; pass a connection to {self.path}"
            )

    def get_job_sync(self, job_id: int) -> Job | None:
        return self._read_sync(functools.partial(_op_get, job_id=job_id))

    async def get_job(self, job_id: int) -> Job | None:
        return await self._read(functools.partial(_op_get, job_id=job_id))

    def list_jobs_sync(self, flt: JobFilter) -> list[Job]:
        return self._read_sync(functools.partial(_op_list, flt=flt))

    async def list_jobs(self, flt: JobFilter) -> list[Job]:
        return await self._read(functools.partial(_op_list, flt=flt))

    def cancel_jobs_sync(self, flt: JobFilter, now: datetime | None = None) -> list[Job]:
        return self._write_sync(functools.partial(_op_cancel, flt=flt, now=now))

    async def cancel_jobs(self, flt: JobFilter, now: datetime | None = None) -> list[Job]:
        return await self._write(functools.partial(_op_cancel, flt=flt, now=now))

    def retry_jobs_sync(self, flt: JobFilter, now: datetime | None = None) -> list[Job]:
        return self._write_sync(functools.partial(_op_retry, flt=flt, now=now))

    async def retry_jobs(self, flt: JobFilter, now: datetime | None = None) -> list[Job]:
        return await self._write(functools.partial(_op_retry, flt=flt, now=now))

    def delete_jobs_sync(self, flt: JobFilter) -> list[int]:
        return self._write_sync(functools.partial(_op_delete, flt=flt))

    async def delete_jobs(self, flt: JobFilter) -> list[int]:
        return await self._write(functools.partial(_op_delete, flt=flt))

    async def count_by_queue_and_state(self) -> dict[str, dict[str, int]]:
        return await self._read(_op_count)

    async def estimate_jobs(self, flt: JobFilter) -> tuple[int, bool]:
        return await self._read(functools.partial(_op_estimate, flt=flt))

    async def throughput(self, minutes: int = 60, now: datetime | None = None) -> list[Throughput]:
        op = functools.partial(_op_throughput, minutes=max(1, int(minutes)), now=now)
        return await self._read(op)

    # ----- runtime --------------------------------------------------------------------------
    async def fetch(
        self, queue: str, limit: int, node: str, producer: str, now: datetime | None = None
    ) -> list[Job]:
        if limit <= 0:
            return []
        return await self._write(
            functools.partial(
                _op_fetch, queue=queue, limit=limit, node=node, producer=producer, now=now
            )
        )

    async def ack(self, acks: Sequence[Ack], now: datetime | None = None) -> int:
        if not acks:
            return 0
        return await self._write(functools.partial(_op_ack, acks=acks, now=now))

    async def stage(self, limit: int, now: datetime | None = None) -> list[str]:
        return await self._write(functools.partial(_op_stage, limit=limit, now=now))

    # ----- notifications --------------------------------------------------------------------
    async def notify(self, channel: str, payload: dict[str, Any]) -> None:
        await self._write(functools.partial(_op_notify, channel=channel, payload=payload))

    def notify_sync(self, channel: str, payload: dict[str, Any]) -> None:
        self._write_sync(functools.partial(_op_notify, channel=channel, payload=payload))

    async def listen(
        self,
        handler: NotificationHandler,
        on_state: Callable[[bool], Awaitable[None] | None] | None = None,
    ) -> None:
        await notifier.listen(self._key, self._open_checked, handler, on_state)

    # ----- cluster --------------------------------------------------------------------------
    async def heartbeat(
        self,
        node: NodeInfo,
        live_within: float,
        now: datetime | None = None,
        *,
        takeover: bool = True,
    ) -> NodeInfo:
        return await self._write(
            functools.partial(
                _op_heartbeat, node=node, live_within=live_within, now=now, takeover=takeover
            )
        )

    async def remove_node(self, name: str) -> None:
        await self._write(functools.partial(_op_remove_node, name=name))

    async def forget_nodes(self, older_than: float, now: datetime | None = None) -> int:
        return await self._write(
            functools.partial(_op_forget_nodes, older_than=older_than, now=now)
        )

    def list_nodes_sync(self) -> list[NodeInfo]:
        return self._read_sync(_op_list_nodes)

    async def list_nodes(self) -> list[NodeInfo]:
        return await self._read(_op_list_nodes)

    async def acquire_leadership(
        self, node: str, lease: float, now: datetime | None = None
    ) -> datetime | None:
        return await self._write(
            functools.partial(_op_acquire_leadership, node=node, lease=lease, now=now)
        )

    async def resign_leadership(self, node: str) -> bool:
        return await self._write(functools.partial(_op_resign_leadership, node=node))

    async def rescue_jobs(
        self,
        rescue_after: float,
        limit: int,
        now: datetime | None = None,
        *,
        by: str | None = None,
    ) -> list[Job]:
        return await self._write(
            functools.partial(_op_rescue, rescue_after=rescue_after, limit=limit, now=now, by=by)
        )

    async def prune_jobs(
        self, max_age: Mapping[str, float], limit: int, now: datetime | None = None
    ) -> int:
        # One short transaction per state: other writers get the lock in between.
        deleted = 0
        for state, age in max_age.items():
            if deleted >= limit:
                break
            deleted += await self._write(
                functools.partial(
                    _op_prune, state=str(JobState(state)), age=age, limit=limit - deleted, now=now
                )
            )
        return deleted

    async def insert_cron_jobs(
        self, name: str, signature: str, plan: CronPlan, now: datetime | None = None
    ) -> list[Job]:
        return await self._write(
            functools.partial(_op_cron, name=name, signature=signature, plan=plan, now=now)
        )

    def list_cron_sync(self) -> list[CronRecord]:
        return self._read_sync(_op_list_cron)

    async def list_cron(self) -> list[CronRecord]:
        return await self._read(_op_list_cron)

    def control_queue_sync(
        self,
        queue: str,
        changes: Mapping[str, Any],
        node: str | None = None,
        now: datetime | None = None,
    ) -> bool:
        return self._write_sync(
            functools.partial(_op_control_queue, queue=queue, changes=changes, node=node, now=now)
        )

    async def control_queue(
        self,
        queue: str,
        changes: Mapping[str, Any],
        node: str | None = None,
        now: datetime | None = None,
    ) -> bool:
        return await self._write(
            functools.partial(_op_control_queue, queue=queue, changes=changes, node=node, now=now)
        )

    def queue_settings_sync(self) -> dict[str, QueueState]:
        return self._read_sync(_op_queue_settings)

    async def queue_settings(self) -> dict[str, QueueState]:
        return await self._read(_op_queue_settings)

    def count_by_queue_and_state_sync(self) -> dict[str, dict[str, int]]:
        return self._read_sync(_op_count)


# ----- cluster operations ----------------------------------------------------------------------
_REPLACEABLE = ("args", "meta", "tags", "priority", "max_attempts", "queue", "scheduled_at")


def _replace(
    cur: sqlite3.Cursor, job_id: int, job: Job, fields: Sequence[str], t: int
) -> Job | None:
    """Update `fields` of job `job_id` from `job` if it has not started; the updated job."""
    if job.scheduled_at is not None:
        run_at = to_us(job.scheduled_at)
    else:
        run_at = t + round((job.schedule_in or 0) * 1_000_000)
    params: dict[str, Any] = {f"set_{f}": int(f in fields) for f in _REPLACEABLE}
    params.update(
        id=job_id,
        now=t,
        args=dump_json(job.args),
        meta=dump_json(job.meta),
        tags=dump_json(list(job.tags)),
        priority=job.priority,
        max_attempts=job.max_attempts,
        queue=job.queue,
        scheduled_at=run_at,
    )
    row = cur.execute(QUERIES["replace_job"], params).fetchone()
    return row_to_job(row) if row is not None else None


def _row_to_node(row: sqlite3.Row) -> NodeInfo:
    keys = row.keys()
    return NodeInfo(
        name=row["name"],
        started_at=from_us(row["started_at"]),
        heartbeat_at=from_us(row["heartbeat_at"]),
        queues=json.loads(row["queues"]),
        meta=json.loads(row["meta"]),
        leader=bool(row["leader"]) if "leader" in keys else False,
    )


def _op_heartbeat(
    conn: sqlite3.Connection,
    _outbox: Outbox,
    node: NodeInfo,
    live_within: float,
    now: datetime | None,
    takeover: bool = True,
) -> NodeInfo:
    # The write transaction serialises registrations, so two nodes starting at once agree on
    # when the cluster started.
    t = now_us(now)
    cur = _cursor(conn)
    meta = dict(node.meta)
    row = cur.execute(QUERIES["get_node"], {"name": node.name}).fetchone()
    stored = json.loads(row["meta"]) if row is not None else {}
    if row is not None and not takeover and stored.get("incarnation") != meta.get("incarnation"):
        return _row_to_node(row)  # another incarnation registered the name: left as it is
    if row is not None and stored.get("incarnation") == meta.get("incarnation"):
        started = row["started_at"]
        for key in ("cluster_started_at", "control"):
            if key in stored:
                meta[key] = stored[key]
    else:
        started = t
        since = t - round(live_within * 1_000_000)
        starts = []
        for other in cur.execute(
            QUERIES["live_node_metas"], {"name": node.name, "since": since}
        ).fetchall():
            value = json.loads(other["meta"]).get("cluster_started_at")
            if isinstance(value, str):
                starts.append(datetime.fromisoformat(value))
        cluster_start = min(starts) if starts else from_us(t)
        meta["cluster_started_at"] = cluster_start.isoformat() if cluster_start else None
    row = cur.execute(
        QUERIES["upsert_node"],
        {
            "name": node.name,
            "started_at": started,
            "now": t,
            "queues": dump_json(node.queues),
            "meta": dump_json(meta),
        },
    ).fetchone()
    return _row_to_node(row)


def _op_remove_node(conn: sqlite3.Connection, _outbox: Outbox, name: str) -> None:
    conn.execute(QUERIES["remove_node"], {"name": name})


def _op_forget_nodes(
    conn: sqlite3.Connection, _outbox: Outbox, older_than: float, now: datetime | None
) -> int:
    before = now_us(now) - round(older_than * 1_000_000)
    return max(conn.execute(QUERIES["forget_nodes"], {"before": before}).rowcount, 0)


def _op_list_nodes(conn: sqlite3.Connection) -> list[NodeInfo]:
    return [_row_to_node(r) for r in _cursor(conn).execute(QUERIES["list_nodes"]).fetchall()]


def _op_acquire_leadership(
    conn: sqlite3.Connection, _outbox: Outbox, node: str, lease: float, now: datetime | None
) -> datetime | None:
    t = now_us(now)
    row = conn.execute(
        QUERIES["acquire_leadership"],
        {"node": node, "now": t, "expires_at": t + round(lease * 1_000_000)},
    ).fetchone()
    return from_us(row[0]) if row is not None else None


def _op_resign_leadership(conn: sqlite3.Connection, _outbox: Outbox, node: str) -> bool:
    return conn.execute(QUERIES["resign_leadership"], {"node": node}).fetchone() is not None


def _op_rescue(
    conn: sqlite3.Connection,
    _outbox: Outbox,
    rescue_after: float,
    limit: int,
    now: datetime | None,
    by: str | None = None,
) -> list[Job]:
    t = now_us(now)
    at = from_us(t)
    rows = (
        _cursor(conn)
        .execute(
            QUERIES["rescue_jobs"],
            {
                "now": t,
                "at": at.isoformat() if at else None,
                "since": t - round(rescue_after * 1_000_000),
                "late": t - round(rescue_after * 500_000),
                "by": by,
                "limit": limit,
            },
        )
        .fetchall()
    )
    return sorted((row_to_job(r) for r in rows), key=lambda j: j.id or 0)


def _op_prune(
    conn: sqlite3.Connection,
    _outbox: Outbox,
    state: str,
    age: float,
    limit: int,
    now: datetime | None,
) -> int:
    before = now_us(now) - round(age * 1_000_000)
    cur = conn.execute(QUERIES["prune_jobs"], {"state": state, "before": before, "limit": limit})
    return max(cur.rowcount, 0)


def _cron_record(row: sqlite3.Row) -> CronRecord:
    updated = from_us(row["updated_at"])
    assert updated is not None
    return CronRecord(
        name=row["name"],
        signature=row["signature"],
        last_tick=from_us(row["last_tick"]),
        updated_at=updated,
    )


def _op_cron(
    conn: sqlite3.Connection,
    outbox: Outbox,
    name: str,
    signature: str,
    plan: CronPlan,
    now: datetime | None,
) -> list[Job]:
    # BEGIN IMMEDIATE already holds the write lock: no other scheduler can read this record
    # until the jobs and the new last tick are committed together.
    t = now_us(now)
    params = {"name": name, "signature": signature, "now": t}
    cur = _cursor(conn)
    cur.execute(QUERIES["cron_create"], params)
    record = _cron_record(cur.execute(QUERIES["cron_get"], {"name": name}).fetchone())
    if record.signature != signature:
        record = _cron_record(cur.execute(QUERIES["cron_reset"], params).fetchone())
    jobs, last_tick = plan(record)
    inserted = _op_insert(conn, outbox, jobs, now) if jobs else []
    if last_tick is not None:
        cur.execute(QUERIES["cron_advance"], {**params, "tick": to_us(last_tick)})
    return inserted


def _op_list_cron(conn: sqlite3.Connection) -> list[CronRecord]:
    return [_cron_record(r) for r in _cursor(conn).execute(QUERIES["list_cron"]).fetchall()]


def _op_control_queue(
    conn: sqlite3.Connection,
    _outbox: Outbox,
    queue: str,
    changes: Mapping[str, Any],
    node: str | None,
    now: datetime | None,
) -> bool:
    unknown = set(changes) - {"paused", "limit"}
    if unknown:
        raise ValueError(f"unknown queue setting(s): {', '.join(sorted(unknown))}")
    cur = _cursor(conn)
    if node is None:
        paused = changes.get("paused")
        cur.execute(
            QUERIES["control_queue"],
            {
                "queue": queue,
                "paused": None if paused is None else int(bool(paused)),
                "limit": changes.get("limit"),
                "set_paused": int("paused" in changes),
                "set_limit": int("limit" in changes),
                "now": now_us(now),
            },
        )
        # A cluster-wide setting replaces the per-node ones of the same keys.
        for row in cur.execute(QUERIES["node_metas"]).fetchall():
            meta = json.loads(row["meta"])
            settings = meta.get("control", {}).get(queue)
            if isinstance(settings, dict) and any(k in settings for k in changes):
                for key in changes:
                    settings.pop(key, None)
                conn.execute(
                    QUERIES["set_node_meta"], {"name": row["name"], "meta": dump_json(meta)}
                )
        return True
    row = cur.execute(QUERIES["get_node"], {"name": node}).fetchone()
    if row is None:
        return False
    meta = json.loads(row["meta"])
    control = meta.setdefault("control", {})
    settings = control.setdefault(queue, {})
    for key, value in changes.items():
        if value is None:
            settings.pop(key, None)
        else:
            settings[key] = value
    conn.execute(QUERIES["set_node_meta"], {"name": node, "meta": dump_json(meta)})
    return True


def _op_queue_settings(conn: sqlite3.Connection) -> dict[str, QueueState]:
    return {
        r["name"]: QueueState(name=r["name"], paused=bool(r["paused"]), limit=r["limit"])
        for r in _cursor(conn).execute(QUERIES["queue_settings"]).fetchall()
    }
