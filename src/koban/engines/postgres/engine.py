"""PostgreSQL engine: the contract in `koban.engines.base`, on psycopg 3 and psycopg_pool.

Every operation is written once as a generator of statements (`_op_*`), run either on a sync
connection (client calls from sync code) or an async one (nodes and async client calls). An op
yields `(sql, params)` and receives the rows; it may also yield `TRANSACTION` (what follows
commits or fails as one) and `Copy` (rows sent by `COPY ... FROM STDIN`). A statement that
fails raises inside the op, at its `yield`, so an op can say what the failure means.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import re
import select
import threading
import time
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Generator,
    Iterable,
    Iterator,
    Mapping,
    Sequence,
)
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any, Final

import psycopg
import psycopg.types.json
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict
from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool, ConnectionPool, PoolTimeout

from koban.engines._sql import load_migrations, load_queries
from koban.engines.base import (
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
    redact,
)
from koban.engines.postgres import pool_logging
from koban.engines.postgres.notifier import InsertNotifyThrottle
from koban.errors import (
    ConfigurationError,
    DatabaseUnavailableError,
    SchemaNotMigratedError,
    SchemaTooNewError,
)
from koban.job import FINISHED_STATES, Job, JobState, encode_json

log = logging.getLogger("koban.engine")
pool_logging.install()

QUERIES = load_queries("koban.engines.postgres.sql")
MIGRATIONS = load_migrations("koban.engines.postgres.migrations")
LATEST_VERSION = MIGRATIONS[-1][0]
CHANNEL_PREFIX = "koban_"
_MIGRATE_LOCK = 7_405_361_029  # pg_advisory_xact_lock key serialising concurrent migrators


@dataclasses.dataclass(frozen=True, slots=True)
class Copy:
    """`COPY ... FROM STDIN` and the rows to send, yielded by an op like a statement."""

    sql: str
    data: Iterable[str]  # chunks in the statement's format (koban sends text)


class _Transaction:
    def __repr__(self) -> str:
        return "TRANSACTION"


#: Yielded by an op before statements that must commit or fail together. They run in one
#: transaction of their own on a connection in autocommit mode with none open (the pool's);
#: otherwise in the transaction that is open, or that psycopg opens for the caller to commit.
TRANSACTION: Final = _Transaction()

# A statement to run: (SQL, params). An op yields statements and receives their rows.
Statement = tuple[str | sql.SQL | sql.Composed, dict[str, Any]]
Op = Generator[Statement | Copy | _Transaction, list[dict[str, Any]], Any]

_JOB_COLUMNS = {
    "id", "state", "queue", "worker", "args", "meta", "tags", "errors", "priority", "attempt",
    "max_attempts", "attempted_by", "inserted_at", "scheduled_at", "attempted_at",
    "completed_at", "cancelled_at", "discarded_at", "unique_key",
}  # fmt: skip


_STATES = {str(state): state for state in JobState}


def row_to_job(row: dict[str, Any]) -> Job:
    fields = {k: v for k, v in row.items() if k in _JOB_COLUMNS}
    fields["state"] = _STATES[fields["state"]]  # a dict lookup: JobState() costs more per row
    return Job(**fields)


#: The columns `fetch_jobs` returns, in order (args, meta and errors as JSON text). A claimed
#: job has not finished, so its completed/cancelled/discarded times are left out.
FETCHED_COLUMNS = (
    "id", "state", "queue", "worker", "args", "meta", "tags", "errors", "priority", "attempt",
    "max_attempts", "attempted_by", "inserted_at", "scheduled_at", "attempted_at", "unique_key",
)  # fmt: skip


def fetched_job(row: tuple[Any, ...]) -> Job:
    """A claimed job from a `fetch_jobs` row (a node builds one per job it runs: rows as
    tuples save a dict per row, and its filtering, on the node's hottest path).

    The row carries args, meta and errors as JSON text, decoded here: psycopg's jsonb loader,
    Python code around `_json_loads` called once per value, was a tenth of a node's busy time
    in the burn-down.
    """
    (job_id, state, queue, worker, args, meta, tags, errors, priority, attempt, max_attempts,
     attempted_by, inserted_at, scheduled_at, attempted_at, unique_key) = row  # fmt: skip
    return Job(
        worker=worker, args=_json_loads(args), queue=queue, state=_STATES[state],
        priority=priority, max_attempts=max_attempts, meta=_json_loads(meta), tags=tags,
        id=job_id, attempt=attempt, errors=_json_loads(errors), inserted_at=inserted_at,
        scheduled_at=scheduled_at, attempted_at=attempted_at, attempted_by=attempted_by,
        unique_key=unique_key,
    )  # fmt: skip


#: How long one request for a pooled connection waits before it is made again (`_NodePool`).
POOL_REASK_SECONDS: Final = 1.0


class _NodePool(AsyncConnectionPool[Any]):
    """The node's pool: a wait for a connection is asked again every second, up to the timeout.

    The pool tries once to replace a connection that died (`reconnect_timeout=0`: the node's
    loops retry, and report, outages themselves), and psycopg_pool only tries to grow again when
    a request for a connection arrives. After a restart longer than that one try, the requests
    already waiting would wait out their whole timeout (30 s) with the server back. Asking again
    every second makes a new attempt, so the node resumes within about a second of the server.
    """

    async def getconn(self, timeout: float | None = None) -> Any:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + (self.timeout if timeout is None else timeout)
        while True:
            left = deadline - loop.time()
            try:
                return await super().getconn(timeout=max(0.001, min(POOL_REASK_SECONDS, left)))
            except PoolTimeout:
                if left <= POOL_REASK_SECONDS:
                    raise


class _ClientPool(ConnectionPool[Any]):
    """The sync client calls' pool, asking again every second as `_NodePool` does.

    psycopg_pool's own reconnection backs off exponentially (1, 2, 4, 8, ... s) while the
    server is away, and a call waiting for a connection gets one only at the next attempt:
    after a 30 s outage, calls kept failing for up to 30 s more with the server back. This
    pool tries once per request instead, and a waiting request is made again every second.
    """

    def getconn(self, timeout: float | None = None) -> Any:
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while True:
            left = deadline - time.monotonic()
            try:
                return super().getconn(timeout=max(0.001, min(POOL_REASK_SECONDS, left)))
            except PoolTimeout:
                if left <= POOL_REASK_SECONDS:
                    raise


def _may_be_closed(conn: psycopg.Connection[Any] | psycopg.AsyncConnection[Any]) -> bool:
    """Whether a pooled connection needs a round trip to prove it alive before a client call.

    An idle connection has nothing to read: the server speaks only when asked. When PostgreSQL
    ends a session that sits in the pool (a restart, a failover, pg_terminate_backend), its
    error and the connection's end arrive unasked and wait in the socket, where a poll that
    does not block sees them. TLS may hold them in its own buffer, out of the poll's sight, so
    a TLS connection is always checked.
    """
    if conn.closed or conn.broken or getattr(conn.pgconn, "ssl_in_use", True):
        return True
    fd = conn.fileno()
    try:
        if hasattr(select, "poll"):
            poller = select.poll()
            poller.register(fd, select.POLLIN | select.POLLPRI)
            return bool(poller.poll(0))
        return bool(select.select([fd], [], [], 0)[0])  # pragma: no cover - Windows
    except (OSError, ValueError):
        return True


def _check_client_connection(conn: psycopg.Connection[Any]) -> None:
    """The sync client pool's check: a round trip only for a connection that may be closed."""
    if _may_be_closed(conn):
        ConnectionPool.check_connection(conn)


def _int_array(values: Iterable[int]) -> str:
    """A PostgreSQL array literal of integers, for a parameter cast to `bigint[]`/`integer[]`."""
    return "{" + ",".join(map(str, values)) + "}"


def _json_loads(data: str | bytes) -> Any:
    """`json.loads` for jsonb columns (psycopg's loader calls it) and for the JSON text of a
    fetched job's args, meta and errors (`fetched_job`), with the values most job rows hold
    ready-made: meta and errors are usually empty.
    """
    text = data if isinstance(data, str) else bytes(data).decode()
    if text == "{}":
        return {}
    if text == "[]":
        return []
    return json.loads(text)


def _configure_sync(conn: psycopg.Connection[Any]) -> None:
    psycopg.types.json.set_json_loads(_json_loads, conn)


async def _configure_async(conn: psycopg.AsyncConnection[Any]) -> None:
    psycopg.types.json.set_json_loads(_json_loads, conn)


def _jobs_json(jobs: Sequence[Job]) -> str:
    return json.dumps(
        [
            {
                "ord": i,
                "queue": job.queue,
                "worker": job.worker,
                "args": job.args,
                "meta": job.meta,
                "tags": job.tags,
                "priority": job.priority,
                "max_attempts": job.max_attempts,
                "scheduled_at": job.scheduled_at.isoformat() if job.scheduled_at else None,
                "schedule_in": job.schedule_in,
                "unique_key": job.unique_key,
                "unique_states": job.unique.states_mask if job.unique_key else None,
            }
            for i, job in enumerate(jobs)
        ],
        separators=(",", ":"),
        ensure_ascii=False,
    )


#: Batches of at least this many jobs, none of them unique, are inserted by COPY.
COPY_MIN_JOBS = 50
#: Rows per chunk a COPY sends.
COPY_CHUNK_ROWS = 500


def _op_insert(
    jobs: Sequence[Job],
    now: datetime | None,
    notify: Sequence[str] | None = None,
    *,
    copy: bool = True,
    prepare: Callable[[Job], None] | None = None,
) -> Op:
    """Insert `jobs` and return them as stored, in input order; wake the queues in `notify`
    (None: all) that gained available jobs, with one notification each. `copy=False` keeps
    to one INSERT statement (a connection in pipeline mode cannot COPY). `prepare`: the jobs
    are to be prepared as COPY sends them (only for jobs `_copyable` accepts)."""
    if prepare is not None or (copy and _copyable(jobs)):
        return (yield from _op_copy_jobs(jobs, now, notify, prepare))
    rows = yield (
        QUERIES["insert_jobs"],
        {"jobs": _jobs_json(jobs), "now": now, "notify": None if notify is None else list(notify)},
    )
    inserted = iter(rows)  # in id order, which is input order
    out: list[Job | None] = []
    seen: set[str] = set()
    pending = next(inserted, None)
    for job in jobs:
        key = job.unique_key
        if pending is not None and (
            key is None or (key not in seen and pending["unique_key"] == key)
        ):
            out.append(row_to_job(pending))
            pending = next(inserted, None)
        else:
            out.append(None)
        if key is not None:
            seen.add(key)
    conflicts = [job.unique_key for job, got in zip(jobs, out, strict=True) if got is None]
    if conflicts:
        existing = yield QUERIES["jobs_by_unique_key"], {"keys": conflicts}
        by_key = {row["unique_key"]: row_to_job(row) for row in existing}
        by_key.update({j.unique_key: j for j in out if j is not None and j.unique_key})
        for i, job in enumerate(jobs):
            if out[i] is None:
                found = by_key.get(job.unique_key)
                if found is None:
                    # The holder left the unique states between insert and lookup: the key
                    # is free now, so report that nothing was inserted for this entry.
                    found = Job(
                        worker=job.worker, args=job.args, queue=job.queue, unique_key=job.unique_key
                    )
                replace = getattr(job.unique, "replace", ())
                if replace and found.id is not None:
                    rows = yield QUERIES["replace_job"], _replace_params(found.id, job, now)
                    if rows:
                        found = row_to_job(rows[0])
                        by_key[job.unique_key] = found
                dup = Job(**{f: getattr(found, f) for f in _JOB_COLUMNS})
                dup.conflict = True
                out[i] = dup
    return out


def _op_copy_jobs(
    jobs: Sequence[Job],
    now: datetime | None,
    notify: Sequence[str] | None,
    prepare: Callable[[Job], None] | None = None,
) -> Op:
    """Insert jobs no unique key can turn away by COPY, and build what is returned from what
    was sent: nothing is read back.

    In one transaction: reserve an id per job (in input order) with the insert time, COPY the
    rows, wake their queues as `insert_jobs` does.
    """
    yield TRANSACTION
    rows = yield QUERIES["reserve_job_ids"], {"n": len(jobs), "now": now}
    t: datetime = rows[0]["t"]
    # One session's nextval calls only grow; sorting guarantees ids follow the input order.
    ids = sorted(rows[0]["ids"])
    t_utc = t.astimezone(UTC)
    # Jobs inserted and due at the transaction's now() can leave both times to the columns'
    # default, which is that same now(): PostgreSQL then parses no times (a tenth of its work).
    due_now = now is None and not any(job.scheduled_at or job.schedule_in for job in jobs)
    stored: list[Job] = []

    def chunks() -> Iterator[str]:
        # Made while COPY sends them, so PostgreSQL parses one chunk while Python makes the
        # next one and its jobs.
        text = _CopyText(times=not due_now)
        lines: list[str] = []
        for job, job_id in zip(jobs, ids, strict=True):
            if prepare is not None:
                # Validation here overlaps PostgreSQL parsing the chunk sent before; what it
                # raises aborts the COPY, and the transaction rolls back: nothing inserted.
                prepare(job)
            args, meta = job.encoded or _encode(job)
            run_at = _run_at(job, t_utc)
            state = JobState.SCHEDULED if run_at > t_utc else JobState.AVAILABLE
            lines.append(text.line(job_id, state, job, args, meta, t_utc, run_at))
            stored.append(
                Job(
                    id=job_id,
                    state=state,
                    queue=job.queue,
                    worker=job.worker,
                    args=_as_stored(job.args, args),
                    meta=_as_stored(job.meta, meta),
                    tags=list(job.tags),
                    priority=job.priority,
                    max_attempts=job.max_attempts,
                    inserted_at=t,
                    # In the zone the database gave `t` in, as reading the row back would.
                    scheduled_at=t if run_at is t_utc else run_at.astimezone(t.tzinfo),
                )
            )
            if len(lines) == COPY_CHUNK_ROWS:
                yield "".join(lines)
                lines.clear()
        if lines:
            yield "".join(lines)

    try:
        yield Copy(QUERIES["copy_jobs_due_now" if due_now else "copy_jobs"], chunks())
    except psycopg.Error as exc:
        if not isinstance(exc, psycopg.OperationalError):
            exc.add_note(_refused(exc, jobs))
        raise
    wake = {
        job.queue
        for job in stored
        if job.state is JobState.AVAILABLE and (notify is None or job.queue in notify)
    }
    if wake:
        yield QUERIES["notify_inserts"], {"queues": sorted(wake)}
    return stored


def _encode(job: Job) -> tuple[str, str]:
    """Args and meta as JSON, for a job that did not come through `validate`."""
    return (
        encode_json(job.args, what="args", worker=job.worker),
        encode_json(job.meta, what="meta", worker=job.worker),
    )


def _run_at(job: Job, t_utc: datetime) -> datetime:
    """When `job` is due (in UTC), as `insert_jobs` computes it; `t_utc` itself if at once."""
    if job.scheduled_at is not None:
        return job.scheduled_at.astimezone(UTC)
    if not job.schedule_in:
        return t_utc
    # make_interval(secs => x) is rint(x * 1e6) microseconds.
    return t_utc + timedelta(microseconds=round(job.schedule_in * 1_000_000))


class _CopyText:
    """Rows of `copy_jobs` in COPY's text format.

    Written out here rather than by psycopg's `write_row`, whose adapters for the enum, list
    and datetime columns cost several times more per row. Workers, queues, tags and times
    repeat across a batch, so each is escaped once.
    """

    _ESCAPES = str.maketrans({"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"})

    def __init__(self, *, times: bool) -> None:
        self.times = times  # False: the statement leaves inserted_at and scheduled_at out
        self._texts: dict[str, str] = {}
        self._tags: dict[tuple[str, ...], str] = {}
        self._times: dict[datetime, str] = {}

    def line(
        self,
        job_id: int,
        state: JobState,
        job: Job,
        args: str,
        meta: str,
        inserted_at: datetime,
        scheduled_at: datetime,
    ) -> str:
        line = (
            f"{job_id}\t{state}\t{self._text(job.queue)}\t{self._text(job.worker)}\t"
            f"{self._json(args)}\t{self._json(meta)}\t{self._array(job.tags)}\t"
            f"{job.priority}\t{job.max_attempts}"
        )
        if self.times:
            return f"{line}\t{self._time(inserted_at)}\t{self._time(scheduled_at)}\n"
        return line + "\n"

    def _text(self, value: str) -> str:
        escaped = self._texts.get(value)
        if escaped is None:
            escaped = self._texts[value] = value.translate(self._ESCAPES)
        return escaped

    @staticmethod
    def _json(text: str) -> str:
        # JSON escapes tabs and line breaks itself: only its backslashes need escaping again.
        return text.replace("\\", "\\\\") if "\\" in text else text

    def _array(self, tags: Sequence[str]) -> str:
        if not tags:
            return "{}"
        key = tuple(tags)
        literal = self._tags.get(key)
        if literal is None:
            quoted = ('"' + tag.replace("\\", "\\\\").replace('"', '\\"') + '"' for tag in tags)
            literal = self._tags[key] = ("{" + ",".join(quoted) + "}").translate(self._ESCAPES)
        return literal

    def _time(self, at: datetime) -> str:
        text = self._times.get(at)
        if text is None:
            text = self._times[at] = at.isoformat()
        return text


def _jsonb_number(text: str) -> float | int:
    """A JSON number with a fraction or exponent as jsonb gives it back: numeric prints no
    exponent, so `1e+16` comes back as the integer 10000000000000000."""
    exponent = Decimal(text).as_tuple().exponent
    return int(Decimal(text)) if isinstance(exponent, int) and exponent >= 0 else float(text)


_STORED_JSON = json.JSONDecoder(parse_float=_jsonb_number)
_KEPT_AS_IS = frozenset({str, int, bool, type(None)})


def _as_stored(value: dict[str, Any], text: str) -> dict[str, Any]:
    """A copy of args or meta as reading the row back would give them: `text` (their JSON)
    as jsonb stores it, decoded; just a copy of `value` when it holds nothing JSON changes."""
    for item in value.values():
        if type(item) not in _KEPT_AS_IS:
            return _STORED_JSON.decode(text)
    return dict(value)


_COPY_LINE = re.compile(r"\bCOPY koban_jobs, line (\d+)")


def _refused(exc: psycopg.Error, jobs: Sequence[Job]) -> str:
    """What a failed COPY means for the caller: which job, and that none was inserted."""
    found = _COPY_LINE.search(exc.diag.context or "")
    line = int(found.group(1)) if found else 0
    which = ""
    if 1 <= line <= len(jobs):
        job = jobs[line - 1]
        which = f"; PostgreSQL refused job {line} (worker {job.worker!r}, queue {job.queue!r})"
    return f"koban: none of the {len(jobs)} jobs in this enqueue_many was inserted{which}"


def _replace_params(job_id: int, job: Job, now: datetime | None) -> dict[str, Any]:
    """Parameters of `replace_job`: the new job's values for the fields its unique replaces."""
    return {
        "id": job_id,
        "fields": list(job.unique.replace),
        "args": json.dumps(job.args, ensure_ascii=False),
        "meta": json.dumps(job.meta, ensure_ascii=False),
        "tags": list(job.tags),
        "priority": job.priority,
        "max_attempts": job.max_attempts,
        "queue": job.queue,
        "scheduled_at": job.scheduled_at,
        "schedule_in": job.schedule_in,
        "now": now,
    }


def _where(flt: JobFilter) -> tuple[sql.Composable, dict[str, Any]]:
    """A WHERE clause for a filter's fields other than its states, every value a bound
    parameter. `_branches` adds the states."""
    parts: list[sql.Composable] = [sql.SQL("true")]
    params: dict[str, Any] = {}
    if flt.ids is not None:
        parts.append(sql.SQL("id = ANY(%(ids)s::bigint[])"))
        params["ids"] = list(flt.ids)
    if flt.queues:
        parts.append(sql.SQL("queue = ANY(%(queues)s::text[])"))
        params["queues"] = list(flt.queues)
    if flt.workers:
        parts.append(sql.SQL("worker = ANY(%(workers)s::text[])"))
        params["workers"] = list(flt.workers)
    if flt.tags:
        # `tags <> '{}'`: the predicate of the tags index, which holds only tagged jobs.
        parts.append(sql.SQL("tags @> %(tags)s::text[] AND tags <> '{}'"))
        params["tags"] = list(flt.tags)
    if flt.args_text:
        parts.append(sql.SQL("strpos(args::text, %(args_text)s) > 0"))
        params["args_text"] = flt.args_text
    if flt.inserted_before is not None:
        parts.append(sql.SQL("inserted_at < %(inserted_before)s"))
        params["inserted_before"] = flt.inserted_before
    if flt.inserted_after is not None:
        parts.append(sql.SQL("inserted_at > %(inserted_after)s"))
        params["inserted_after"] = flt.inserted_after
    if flt.before_id is not None:
        parts.append(sql.SQL("id < %(before_id)s"))
        params["before_id"] = flt.before_id
    return sql.SQL(" AND ").join(parts), params


_ALL_STATES: Final = frozenset(str(s) for s in JobState)
_EXECUTING: Final = str(JobState.EXECUTING)


def _states_sql(states: frozenset[str]) -> sql.Composable:
    """`states` as literals, so the planner can prove the listing indexes' predicate."""
    if states == _ALL_STATES - {_EXECUTING}:
        return sql.SQL("state <> 'executing'")
    return sql.SQL("state IN ({})").format(
        sql.SQL(", ").join(sql.Literal(s) for s in sorted(states))
    )


def _branches(
    flt: JobFilter, allowed: frozenset[str] = _ALL_STATES
) -> tuple[sql.Composable, list[sql.Composable], dict[str, Any]]:
    """The filter's WHERE clause without its states, and the state conditions whose union is
    the filter's states among `allowed`, one per index path.

    The listing indexes hold no executing jobs (migration 4), so states that span executing
    and others give two conditions: the other states, which those indexes serve, and
    `state = 'executing'`, which koban_jobs_executing_idx serves (executing jobs are few). No
    condition when no state is left.
    """
    where, params = _where(flt)
    states = allowed
    if flt.states:
        states = allowed & frozenset(str(JobState(s)) for s in flt.states)
    conds: list[sql.Composable] = []
    if states - {_EXECUTING}:
        conds.append(_states_sql(states - {_EXECUTING}))
    if _EXECUTING in states:
        conds.append(sql.SQL("state = 'executing'"))
    return where, conds, params


def _matching(
    flt: JobFilter, columns: str, allowed: frozenset[str] = _ALL_STATES, order: str = ""
) -> tuple[sql.Composed, dict[str, Any]]:
    """A SELECT of `columns` of the filter's jobs among `allowed`, ordered by id when `order`
    ("ASC" or "DESC") and cut at the filter's limit. Selects nothing when no state is left.

    Two state conditions become a UNION ALL of one SELECT each. Ordered and limited, each
    branch is ordered and limited too: the planner does not push an outer ORDER BY ... LIMIT
    into the branches, and would otherwise read every matching row to sort them.
    """
    where, conds, params = _branches(flt, allowed)
    if not conds:
        return sql.SQL("SELECT {} FROM koban_jobs WHERE false").format(sql.SQL(columns)), params
    ordered = sql.SQL(" ORDER BY id {}").format(sql.SQL(order)) if order else sql.SQL("")
    tail = sql.SQL("{}{}").format(ordered, _limit(flt))
    selects = [
        sql.SQL("SELECT {} FROM koban_jobs WHERE {} AND {}").format(sql.SQL(columns), where, c)
        for c in conds
    ]
    if len(selects) == 1:
        return sql.SQL("{}{}").format(selects[0], tail), params
    inner = tail if order and flt.limit else sql.SQL("")
    branches = sql.SQL(" UNION ALL ").join(sql.SQL("({}{})").format(b, inner) for b in selects)
    return sql.SQL("SELECT * FROM ({}) AS m{}").format(branches, tail), params


def _limit(flt: JobFilter) -> sql.Composable:
    return sql.SQL(" LIMIT {}").format(sql.Literal(int(flt.limit))) if flt.limit else sql.SQL("")


def _op_list(flt: JobFilter) -> Op:
    query, params = _matching(flt, "*", order="DESC")
    rows = yield query, params
    return [row_to_job(r) for r in rows]


def _op_get(job_id: int) -> Op:
    rows = yield "SELECT * FROM koban_jobs WHERE id = %(id)s", {"id": job_id}
    return row_to_job(rows[0]) if rows else None


def _locked(flt: JobFilter, allowed: frozenset[str]) -> tuple[sql.Composed, dict[str, Any]]:
    """A SELECT of the ids of the filter's jobs among `allowed`, lowest first, up to its limit,
    locking each row.

    Locking in id order keeps two bulk actions from deadlocking. The limit applies above the
    lock, so a row that no longer matches once locked (it finished, moved or went meanwhile)
    is skipped and the next one taken. FOR UPDATE cannot lock through a UNION: two state
    conditions are ORed instead, which the planner serves with a BitmapOr of the two indexes.
    """
    where, conds, params = _branches(flt, allowed)
    if not conds:
        return sql.Composed([sql.SQL("SELECT id FROM koban_jobs WHERE false")]), params
    states = conds[0] if len(conds) == 1 else sql.SQL("({})").format(sql.SQL(" OR ").join(conds))
    query = sql.SQL("SELECT id FROM koban_jobs WHERE {} AND {} ORDER BY id{} FOR UPDATE").format(
        where, states, _limit(flt)
    )
    return query, params


_UNFINISHED: Final = frozenset(str(s) for s in JobState if s not in FINISHED_STATES)
_RETRIABLE: Final = _ALL_STATES - {_EXECUTING, str(JobState.AVAILABLE)}
_DELETABLE: Final = _ALL_STATES - {_EXECUTING}


def _op_cancel(flt: JobFilter, now: datetime | None) -> Op:
    locked, params = _locked(flt, _UNFINISHED)
    query = sql.SQL(
        "UPDATE koban_jobs SET state = 'cancelled', "
        "cancelled_at = coalesce(%(now)s::timestamptz, now()) "
        "WHERE id IN ({}) RETURNING *"
    ).format(locked)
    rows = yield query, {**params, "now": now}
    return [row_to_job(r) for r in rows]


def _op_retry(flt: JobFilter, now: datetime | None) -> Op:
    locked, params = _locked(flt, _RETRIABLE)
    query = sql.SQL(
        "UPDATE koban_jobs SET state = 'available', "
        "scheduled_at = coalesce(%(now)s::timestamptz, now()), "
        "max_attempts = greatest(max_attempts, attempt + 1), "
        "completed_at = NULL, cancelled_at = NULL, discarded_at = NULL "
        "WHERE id IN ({}) RETURNING *"
    ).format(locked)
    rows = yield query, {**params, "now": now}
    return [row_to_job(r) for r in rows]


def _op_delete(flt: JobFilter) -> Op:
    locked, params = _locked(flt, _DELETABLE)
    query = sql.SQL("DELETE FROM koban_jobs WHERE id IN ({}) RETURNING id").format(locked)
    rows = yield query, params
    return sorted(r["id"] for r in rows)


#: Up to this many matching jobs are counted exactly; beyond it the planner estimates.
EXACT_COUNT_LIMIT = 10_000


def _op_estimate(flt: JobFilter) -> Op:
    everything = dataclasses.replace(flt, before_id=None, limit=None)
    capped, params = _matching(dataclasses.replace(everything, limit=EXACT_COUNT_LIMIT + 1), "1")
    counted = yield sql.SQL("SELECT count(*) AS n FROM ({}) AS c").format(capped), params
    n = int(counted[0]["n"])
    if n <= EXACT_COUNT_LIMIT:
        return n, True
    matching, params = _matching(everything, "1")
    plan = yield sql.SQL("EXPLAIN (FORMAT JSON) {}").format(matching), params
    estimate = int(plan[0]["QUERY PLAN"][0]["Plan"]["Plan Rows"])
    return max(estimate, n), False


def _opens_transaction(conn: psycopg.Connection[Any] | psycopg.AsyncConnection[Any]) -> bool:
    """True if `TRANSACTION` must begin one: autocommit would commit each statement alone."""
    return conn.autocommit and conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE


def _returns_rows(cur: psycopg.Cursor[Any] | psycopg.AsyncCursor[Any]) -> bool:
    """Whether the statement just run returned rows (even none). `cur.description` would say
    it too, but builds a Column object per column first: a tenth of a single enqueue's CPU."""
    result = cur.pgresult
    return result is not None and result.status == psycopg.pq.ExecStatus.TUPLES_OK


def _no_rows(cur: psycopg.Cursor[Any] | psycopg.AsyncCursor[Any]) -> bool:
    """Whether the statement's result is here and holds no rows (it returned none)."""
    result = cur.pgresult
    return result is not None and result.status == psycopg.pq.ExecStatus.COMMAND_OK


def _fetch_rows(cur: psycopg.Cursor[Any]) -> list[Any]:
    """The rows the statement returned. In pipeline mode its result is not here yet: fetching
    syncs the pipeline, and is refused if the statement returned no rows after all."""
    if not _no_rows(cur):
        try:
            return cur.fetchall()
        except psycopg.ProgrammingError:
            if not _no_rows(cur):
                raise
    return []


async def _afetch_rows(cur: psycopg.AsyncCursor[Any]) -> list[Any]:
    """Async twin of `_fetch_rows`."""
    if not _no_rows(cur):
        try:
            return await cur.fetchall()
        except psycopg.ProgrammingError:
            if not _no_rows(cur):
                raise
    return []


def _run_sync(op: Op, conn: psycopg.Connection[Any]) -> Any:
    with contextlib.ExitStack() as transaction:
        try:
            statement = next(op)
            while True:
                rows: list[dict[str, Any]] = []
                try:
                    if isinstance(statement, _Transaction):
                        if _opens_transaction(conn):
                            transaction.enter_context(conn.transaction())
                    elif isinstance(statement, Copy):
                        with conn.cursor() as cur, cur.copy(statement.sql) as copy:
                            for chunk in statement.data:
                                copy.write(chunk)
                    else:
                        with conn.cursor(row_factory=dict_row) as cur:
                            cur.execute(statement[0], statement[1])
                            rows = _fetch_rows(cur)
                except psycopg.Error as exc:
                    statement = op.throw(exc)
                    continue
                statement = op.send(rows)
        except StopIteration as done:
            return done.value


async def _run_async(op: Op, conn: psycopg.AsyncConnection[Any]) -> Any:
    async with contextlib.AsyncExitStack() as transaction:
        try:
            statement = next(op)
            while True:
                rows: list[dict[str, Any]] = []
                try:
                    if isinstance(statement, _Transaction):
                        if _opens_transaction(conn):
                            await transaction.enter_async_context(conn.transaction())
                    elif isinstance(statement, Copy):
                        async with conn.cursor() as cur, cur.copy(statement.sql) as copy:
                            for chunk in statement.data:
                                await copy.write(chunk)
                    else:
                        async with conn.cursor(row_factory=dict_row) as cur:
                            await cur.execute(statement[0], statement[1])
                            rows = await _afetch_rows(cur)
                except psycopg.Error as exc:
                    statement = op.throw(exc)
                    continue
                statement = op.send(rows)
        except StopIteration as done:
            return done.value


def _streamed(
    jobs: Sequence[Job], conn: Any, prepare: Callable[[Job], None] | None
) -> Callable[[Job], None] | None:
    """`prepare` if the insert may call it while COPY sends the batch (a pooled connection, and
    a batch COPY takes); otherwise every job is prepared here, up front, and None returned."""
    if prepare is None:
        return None
    if conn is None and _copyable(jobs):
        return prepare
    prepare_all(jobs, prepare)
    return None


def _copyable(jobs: Sequence[Job]) -> bool:
    """Whether `jobs` go in by COPY: enough of them, and none a unique key could turn away.
    Also true only of plain Jobs with a string queue, read before they are validated."""
    return len(jobs) >= COPY_MIN_JOBS and all(
        type(job) is Job
        and job.unique is None
        and job.unique_key is None
        and type(job.queue) is str
        for job in jobs
    )


def _woken(inserted: Sequence[Job], wake: Sequence[str]) -> set[str]:
    """The queues in `wake` an insert's notification woke: those it added available jobs to."""
    return {
        job.queue
        for job in inserted
        if job.state is JobState.AVAILABLE and not job.conflict and job.queue in wake
    }


def _can_copy(conn: psycopg.Connection[Any] | psycopg.AsyncConnection[Any]) -> bool:
    """False on a connection in pipeline mode, where COPY is refused."""
    return conn.info.pipeline_status == psycopg.pq.PipelineStatus.OFF


def _connection_lost(exc: psycopg.Error) -> bool:
    """True if `exc` says the connection is gone (terminated, server restart, network), rather
    than that a statement failed."""
    state = exc.sqlstate
    return state is None or state.startswith("08") or state in ("57P01", "57P02", "57P03")


class PostgresEngine(Engine):
    """Jobs in PostgreSQL 14+.

    >>> engine = PostgresEngine("postgresql://app@localhost/app")
    """

    kind = "postgres"
    poll_interval = 1.0

    def __init__(self, url: str, *, pool_size: int = 10) -> None:
        try:
            conninfo_to_dict(url)
        except psycopg.ProgrammingError as exc:
            raise ConfigurationError(
                f"database URL {redact(url)!r} is malformed: {str(exc).strip()}. "
                "Expected postgresql://user[:password]@host[:port]/database"
            ) from None
        self.url = url
        self._pool_size = pool_size
        self._pool: AsyncConnectionPool | None = None
        self._sync_pool: ConnectionPool | None = None
        # Threads making their first sync call at once must share one pool, not each open one.
        self._sync_lock = threading.Lock()
        self._throttle = InsertNotifyThrottle(self._notify_inserts_sync)

    def __repr__(self) -> str:
        return f"<PostgresEngine {redact(self.url)}>"

    # ----- connections ----------------------------------------------------------------------
    def _connect_sync(self) -> psycopg.Connection[Any]:
        try:
            return psycopg.connect(self.url, autocommit=False)
        except psycopg.OperationalError as exc:
            raise self._unavailable(exc) from None

    def _unavailable(self, exc: Exception) -> DatabaseUnavailableError:
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return DatabaseUnavailableError(
            f"cannot connect to PostgreSQL at {redact(self.url)}: {detail}. "
            "Check the server is running and the URL's host, port, user and database."
        )

    async def open(self) -> None:
        if self._pool is not None:
            return
        # One direct connection first: a server that is down or a database that is not
        # migrated is reported at once, instead of after the pool's wait for a connection.
        try:
            probe = await psycopg.AsyncConnection.connect(self.url, connect_timeout=10)
        except psycopg.OperationalError as exc:
            raise self._unavailable(exc) from None
        async with probe:
            self._check_version(await _run_async(self._op_version(), probe))
        pool: AsyncConnectionPool[Any] = _NodePool(
            self.url,
            min_size=1,
            max_size=self._pool_size,
            kwargs={"autocommit": True},
            open=False,
            name="koban",
            configure=_configure_async,
            connection_class=pool_logging.NodeConnection,
            reconnect_timeout=0,
        )
        try:
            await pool.open(wait=True, timeout=10)
        except Exception as exc:
            await pool.close()
            raise self._unavailable(exc) from None
        self._pool = pool

    async def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            await pool.close()

    def close_sync(self) -> None:
        self._throttle.close()
        with self._sync_lock:
            pool, self._sync_pool = self._sync_pool, None
        if pool is not None:
            pool.close()

    def _sync(self) -> ConnectionPool:
        pool = self._sync_pool
        if pool is not None:
            return pool
        with self._sync_lock:
            if self._sync_pool is None:
                self._sync_pool = self._open_sync_pool()
            return self._sync_pool

    def _open_sync_pool(self) -> ConnectionPool:
        with self._connect_sync() as probe:  # fails fast, as in `open`
            self._check_version(_run_sync(self._op_version(), probe))
        pool: ConnectionPool[Any] = _ClientPool(
            self.url,
            min_size=1,
            max_size=4,
            kwargs={"autocommit": True},
            open=False,
            name="koban-sync",
            configure=_configure_sync,
            connection_class=pool_logging.ClientConnection,
            # Only client calls use this pool: check each connection before use, as
            # `_aexec` does, so a stale one is replaced rather than failing the caller.
            check=_check_client_connection,
            reconnect_timeout=0,  # the calls waiting ask again instead (`_ClientPool`)
        )
        try:
            pool.open(wait=True, timeout=10)
        except Exception as exc:
            pool.close()
            raise self._unavailable(exc) from None
        return pool

    def _async_pool(self) -> AsyncConnectionPool:
        if self._pool is None:
            raise RuntimeError(
                "the engine is not open; use `async with app:` or `await app.open()`"
            )
        return self._pool

    async def _aexec(self, op: Op, conn: Any = None) -> Any:
        if conn is not None:
            return await _run_async(op, conn)
        pool = self._async_pool()
        # Client calls check their connection first, so one the server closed while it sat
        # in the pool (a restart, a failover, pg_terminate_backend) is replaced instead of
        # failing the caller; a round trip only if the socket shows it may be closed
        # (`_may_be_closed`). The node's own statements skip the check: they retry anyway.
        try:
            for tries_left in range(pool.max_size, -1, -1):
                async with pool.connection() as c:
                    try:
                        if _may_be_closed(c):
                            await AsyncConnectionPool.check_connection(c)
                    except psycopg.OperationalError as exc:
                        if not tries_left:  # nothing was sent: say so, not "lost mid-call"
                            raise self._unavailable(exc) from exc
                        continue  # leaving the block hands the broken connection back: dropped
                    return await _run_async(op, c)
        except PoolTimeout as exc:
            raise self._pool_timeout(pool, exc) from exc

    def _exec(self, op: Op, conn: Any = None) -> Any:
        if conn is not None:
            return _run_sync(op, conn)
        pool = self._sync()
        try:
            with pool.connection() as c:
                return _run_sync(op, c)
        except PoolTimeout as exc:
            raise self._pool_timeout(pool, exc) from exc

    def _pool_timeout(
        self, pool: ConnectionPool | AsyncConnectionPool, exc: PoolTimeout
    ) -> DatabaseUnavailableError:
        """No pooled connection came free in time: the call never reached the database."""
        return DatabaseUnavailableError(
            f"no connection to PostgreSQL at {redact(self.url)} came free within "
            f"{pool.timeout:g} s: all {pool.max_size} of this process's pooled connections were "
            "busy, or new ones could not connect. Nothing was sent; retry the call, and if "
            "this persists check that the server is reachable and not at max_connections."
        )

    # ----- schema ---------------------------------------------------------------------------
    @staticmethod
    def _op_version() -> Op:
        # Two statements: PostgreSQL resolves every table a statement names before running
        # it, so one guarded by a CASE still fails on a database that was never migrated.
        found = yield "SELECT to_regclass('koban_schema') IS NOT NULL AS present", {}
        if not found[0]["present"]:
            return [{"version": None}]
        rows = yield "SELECT max(version) AS version FROM koban_schema", {}
        return rows

    def _check_version(self, rows: list[dict[str, Any]]) -> None:
        version = rows[0]["version"] if rows else None
        if version is None or version < LATEST_VERSION:
            raise SchemaNotMigratedError(
                f"the database at {redact(self.url)} has koban schema version "
                f"{version or 'none'}, this koban needs {LATEST_VERSION}; run "
                f"`koban migrate --database {redact(self.url)}`"
            )
        if version > LATEST_VERSION:
            raise SchemaTooNewError(
                f"the database at {redact(self.url)} has koban schema version {version}, newer "
                f"than this koban knows ({LATEST_VERSION}); upgrade koban on this machine"
            )

    def migration_status(self) -> MigrationStatus:
        with self._connect_sync() as conn:
            rows = _run_sync(self._op_version(), conn)
        return MigrationStatus(current=rows[0]["version"], latest=LATEST_VERSION)

    def migrate(self) -> list[int]:
        applied: list[int] = []
        with self._connect_sync() as conn, conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATE_LOCK,))
            conn.execute(
                "CREATE TABLE IF NOT EXISTS koban_schema ("
                "version integer PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
            )
            row = conn.execute("SELECT max(version) FROM koban_schema").fetchone()
            current = row[0] if row else None
            if current is not None and current > LATEST_VERSION:
                raise SchemaTooNewError(
                    f"the database at {redact(self.url)} has koban schema version {current}, "
                    f"newer than this koban knows ({LATEST_VERSION}); upgrade koban"
                )
            for version, _name, text in MIGRATIONS:
                if current is None or version > current:
                    conn.execute(text.encode())
                    conn.execute("INSERT INTO koban_schema (version) VALUES (%s)", (version,))
                    applied.append(version)
        return applied

    @classmethod
    def migration_sql(cls) -> str:
        out = [
            "CREATE TABLE IF NOT EXISTS koban_schema ("
            "version integer PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now());"
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
        prepare = _streamed(jobs, conn, prepare)
        if conn is not None:
            # The caller commits: the notification must ride in its transaction, unthrottled.
            return self._exec(_op_insert(jobs, now, copy=_can_copy(conn)), conn)
        queues = {job.queue for job in jobs}
        claim = self._throttle.claim(queues)
        with self._insert_errors(jobs):
            inserted = self._exec(_op_insert(jobs, now, claim.wake, prepare=prepare))
        self._throttle.settle(claim, _woken(inserted, claim.wake), queues.difference(claim.wake))
        return inserted

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
        prepare = _streamed(jobs, conn, prepare)
        if conn is not None:
            return await self._aexec(_op_insert(jobs, now, copy=_can_copy(conn)), conn)
        queues = {job.queue for job in jobs}
        claim = self._throttle.claim(queues)
        with self._insert_errors(jobs):
            inserted = await self._aexec(_op_insert(jobs, now, claim.wake, prepare=prepare))
        self._throttle.settle(claim, _woken(inserted, claim.wake), queues.difference(claim.wake))
        return inserted

    @contextlib.contextmanager
    def _insert_errors(self, jobs: Sequence[Job]) -> Iterator[None]:
        """Turn a pooled insert's connection failures into koban's errors, saying whether the
        insert may have committed."""
        try:
            yield
        except psycopg.OperationalError as exc:
            if _connection_lost(exc):
                raise self._insert_interrupted(jobs, exc) from exc
            raise

    def _insert_interrupted(
        self, jobs: Sequence[Job], exc: psycopg.Error
    ) -> DatabaseUnavailableError:
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        workers = sorted({str(job.worker) for job in jobs})
        named = ", ".join(repr(w) for w in workers[:3]) + (", ..." if len(workers) > 3 else "")
        what = f"1 job (worker {named})" if len(jobs) == 1 else f"{len(jobs)} jobs ({named})"
        return DatabaseUnavailableError(
            f"enqueue of {what} lost its connection to PostgreSQL at {redact(self.url)}: "
            f"{detail}. The insert may or may not have committed: check with get_job or "
            "list_jobs before enqueueing again, or enqueue in your own transaction (conn=) or "
            "as unique jobs so a retry cannot insert twice (see docs/guarantees.md)."
        )

    def get_job_sync(self, job_id: int) -> Job | None:
        return self._exec(_op_get(job_id))

    async def get_job(self, job_id: int) -> Job | None:
        return await self._aexec(_op_get(job_id))

    def list_jobs_sync(self, flt: JobFilter) -> list[Job]:
        return self._exec(_op_list(flt))

    async def list_jobs(self, flt: JobFilter) -> list[Job]:
        return await self._aexec(_op_list(flt))

    def cancel_jobs_sync(self, flt: JobFilter, now: datetime | None = None) -> list[Job]:
        return self._exec(_op_cancel(flt, now))

    async def cancel_jobs(self, flt: JobFilter, now: datetime | None = None) -> list[Job]:
        return await self._aexec(_op_cancel(flt, now))

    def retry_jobs_sync(self, flt: JobFilter, now: datetime | None = None) -> list[Job]:
        return self._exec(_op_retry(flt, now))

    async def retry_jobs(self, flt: JobFilter, now: datetime | None = None) -> list[Job]:
        return await self._aexec(_op_retry(flt, now))

    def delete_jobs_sync(self, flt: JobFilter) -> list[int]:
        return self._exec(_op_delete(flt))

    async def delete_jobs(self, flt: JobFilter) -> list[int]:
        return await self._aexec(_op_delete(flt))

    async def count_by_queue_and_state(self) -> dict[str, dict[str, int]]:
        rows = await self._rows(QUERIES["count_by_queue_and_state"], {})
        out: dict[str, dict[str, int]] = {}
        for row in rows:
            out.setdefault(row["queue"], {})[row["state"]] = row["n"]
        return out

    async def estimate_jobs(self, flt: JobFilter) -> tuple[int, bool]:
        return await self._aexec(_op_estimate(flt))

    async def throughput(self, minutes: int = 60, now: datetime | None = None) -> list[Throughput]:
        params = {"minutes": max(1, int(minutes)), "now": now}
        rows = await self._rows(QUERIES["throughput"], params)
        return [Throughput(r["minute"], int(r["completed"]), int(r["failed"])) for r in rows]

    # ----- runtime --------------------------------------------------------------------------
    @contextlib.asynccontextmanager
    async def _node_connection(self) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
        """A pooled connection for the node's own statements.

        When one fails with a connection error, the rest of the pool most likely died with it
        (a restart, a failover, pg_terminate_backend): check them all at once. Otherwise every
        later statement would draw another dead connection, and each part of the node would
        fail, recover and warn again, once per pooled connection rather than once per incident.
        """
        pool = self._async_pool()
        try:
            async with pool.connection() as conn:
                yield conn
        except psycopg.OperationalError:
            with contextlib.suppress(Exception):
                await pool.check()
            raise

    async def _rows(self, query: str, params: dict[str, Any]) -> list[dict[str, Any]]:
        async with (
            self._node_connection() as conn,
            conn.cursor(row_factory=dict_row) as cur,
        ):
            await cur.execute(query, params)
            return await cur.fetchall() if _returns_rows(cur) else []

    async def _execute(self, query: str, params: dict[str, Any]) -> int:
        async with self._node_connection() as conn, conn.cursor() as cur:
            await cur.execute(query, params)
            return cur.rowcount

    async def fetch(
        self, queue: str, limit: int, node: str, producer: str, now: datetime | None = None
    ) -> list[Job]:
        return self.claimed_jobs(await self.claim(queue, limit, node, producer, now))

    async def claim(
        self, queue: str, limit: int, node: str, producer: str, now: datetime | None = None
    ) -> list[tuple[Any, ...]]:
        if limit <= 0:
            return []
        async with self._node_connection() as conn, conn.cursor() as cur:
            await cur.execute(
                QUERIES["fetch_jobs"],
                {"queue": queue, "limit": limit, "node": node, "producer": producer, "now": now},
            )
            return await cur.fetchall()

    def claimed_jobs(self, rows: Sequence[Any]) -> list[Job]:
        jobs = [fetched_job(r) for r in rows]
        jobs.sort(key=lambda j: (j.priority, j.scheduled_at, j.id))
        return jobs

    async def ack(self, acks: Sequence[Ack], now: datetime | None = None) -> int:
        completed = [a for a in acks if a.state is JobState.COMPLETED and not a.meta]
        others = [a for a in acks if not (a.state is JobState.COMPLETED and not a.meta)]
        count = 0
        if completed:
            count += await self._execute(
                QUERIES["complete_jobs"],
                {
                    # Array literals, written at once: psycopg adapts a list element by
                    # element in Python, a cost the node paid on every ack.
                    "ids": _int_array(a.job_id for a in completed),
                    "attempts": _int_array(a.attempt for a in completed),
                    "now": now,
                },
            )
        if others:
            payload = json.dumps(
                [
                    {
                        "id": a.job_id,
                        "attempt": a.attempt,
                        "state": str(a.state),
                        "delay": a.delay,
                        "error": a.error,
                        "snooze": a.snooze,
                        "meta": a.meta,
                    }
                    for a in others
                ],
                default=str,
            )
            count += await self._execute(QUERIES["ack_jobs"], {"acks": payload, "now": now})
        return count

    async def stage(self, limit: int, now: datetime | None = None) -> list[str]:
        rows = await self._rows(QUERIES["stage_jobs"], {"limit": limit, "now": now})
        return [r["queue"] for r in rows]

    # ----- notifications --------------------------------------------------------------------
    async def notify(self, channel: str, payload: dict[str, Any]) -> None:
        await self._execute(
            QUERIES["notify"], {"channel": CHANNEL_PREFIX + channel, "payload": json.dumps(payload)}
        )

    def _notify_inserts_sync(self, queues: list[str]) -> None:
        with self._sync().connection() as conn:
            conn.execute(QUERIES["notify_inserts"], {"queues": queues})

    def notify_sync(self, channel: str, payload: dict[str, Any]) -> None:
        with self._sync().connection() as conn:
            conn.execute(
                QUERIES["notify"],
                {"channel": CHANNEL_PREFIX + channel, "payload": json.dumps(payload)},
            )

    async def listen(
        self,
        handler: NotificationHandler,
        on_state: Callable[[bool], Awaitable[None] | None] | None = None,
    ) -> None:
        from koban.engines.postgres.notifier import listen

        await listen(self.url, handler, on_state)

    # ----- cluster --------------------------------------------------------------------------
    async def _atx(self, op: Op) -> Any:
        """Run `op` in one transaction on a pooled connection."""
        async with self._node_connection() as conn, conn.transaction():
            return await _run_async(op, conn)

    def _tx(self, op: Op) -> Any:
        with self._sync().connection() as conn, conn.transaction():
            return _run_sync(op, conn)

    async def heartbeat(
        self,
        node: NodeInfo,
        live_within: float,
        now: datetime | None = None,
        *,
        takeover: bool = True,
    ) -> NodeInfo:
        async with self._node_connection() as conn:
            return await _run_async(_op_heartbeat(node, live_within, now, takeover), conn)

    async def remove_node(self, name: str) -> None:
        await self._execute(QUERIES["remove_node"], {"name": name})

    async def forget_nodes(self, older_than: float, now: datetime | None = None) -> int:
        return await self._execute(QUERIES["forget_nodes"], {"older_than": older_than, "now": now})

    def list_nodes_sync(self) -> list[NodeInfo]:
        return self._exec(_op_list_nodes())

    async def list_nodes(self) -> list[NodeInfo]:
        return await self._aexec(_op_list_nodes())

    async def acquire_leadership(
        self, node: str, lease: float, now: datetime | None = None
    ) -> datetime | None:
        rows = await self._rows(
            QUERIES["acquire_leadership"], {"node": node, "lease": lease, "now": now}
        )
        return rows[0]["expires_at"] if rows else None

    async def resign_leadership(self, node: str) -> bool:
        return bool(await self._rows(QUERIES["resign_leadership"], {"node": node}))

    async def rescue_jobs(
        self,
        rescue_after: float,
        limit: int,
        now: datetime | None = None,
        *,
        by: str | None = None,
    ) -> list[Job]:
        rows = await self._rows(
            QUERIES["rescue_jobs"],
            {"rescue_after": rescue_after, "limit": limit, "now": now, "by": by},
        )
        return [row_to_job(r) for r in rows]

    async def prune_jobs(
        self, max_age: Mapping[str, float], limit: int, now: datetime | None = None
    ) -> int:
        deleted = 0
        for state, age in max_age.items():
            if deleted >= limit:
                break
            deleted += await self._execute(
                QUERIES["prune_jobs"],
                {
                    "state": str(JobState(state)),
                    "max_age": age,
                    "limit": limit - deleted,
                    "now": now,
                },
            )
        return deleted

    async def reindex(self) -> list[str]:
        rows = await self._rows(QUERIES["job_indexes"], {})
        # A concurrent reindex that failed (or was killed) leaves an invalid copy behind that
        # every write would still maintain: drop those first.
        for row in rows:
            if not row["valid"] and ("_ccnew" in row["name"] or "_ccold" in row["name"]):
                await self._execute(
                    sql.SQL("DROP INDEX CONCURRENTLY IF EXISTS {}").format(  # type: ignore[arg-type]
                        sql.Identifier(row["name"])
                    ),
                    {},
                )
        done = []
        for row in rows:
            if row["valid"]:
                await self._execute(
                    sql.SQL("REINDEX INDEX CONCURRENTLY {}").format(  # type: ignore[arg-type]
                        sql.Identifier(row["name"])
                    ),
                    {},
                )
                done.append(row["name"])
        return done

    async def insert_cron_jobs(
        self, name: str, signature: str, plan: CronPlan, now: datetime | None = None
    ) -> list[Job]:
        return await self._atx(_op_cron(name, signature, plan, now))

    def list_cron_sync(self) -> list[CronRecord]:
        return self._exec(_op_list_cron())

    async def list_cron(self) -> list[CronRecord]:
        return await self._aexec(_op_list_cron())

    def control_queue_sync(
        self,
        queue: str,
        changes: Mapping[str, Any],
        node: str | None = None,
        now: datetime | None = None,
    ) -> bool:
        return self._tx(_op_control_queue(queue, changes, node, now))

    async def control_queue(
        self,
        queue: str,
        changes: Mapping[str, Any],
        node: str | None = None,
        now: datetime | None = None,
    ) -> bool:
        return await self._atx(_op_control_queue(queue, changes, node, now))

    def queue_settings_sync(self) -> dict[str, QueueState]:
        return self._exec(_op_queue_settings())

    async def queue_settings(self) -> dict[str, QueueState]:
        return await self._aexec(_op_queue_settings())

    def count_by_queue_and_state_sync(self) -> dict[str, dict[str, int]]:
        return self._exec(_op_counts())


# ----- cluster operations ---------------------------------------------------------------------
_NODE_REGISTRY_LOCK = 7_405_361_030  # pg_advisory_xact_lock key serialising node registrations


def _row_to_node(row: dict[str, Any]) -> NodeInfo:
    return NodeInfo(
        name=row["name"],
        started_at=row["started_at"],
        heartbeat_at=row["heartbeat_at"],
        queues=dict(row["queues"] or {}),
        meta=dict(row["meta"] or {}),
        leader=bool(row.get("leader", False)),
    )


def _op_heartbeat(
    node: NodeInfo, live_within: float, now: datetime | None, takeover: bool = True
) -> Op:
    params = {
        "name": node.name,
        "queues": json.dumps(node.queues, default=str),
        "meta": json.dumps(node.meta, default=str),
        "live_within": live_within,
        "now": now,
    }
    # A registered node refreshes its row in one statement and takes no lock: a node cut off
    # mid-heartbeat then holds nothing that other nodes' heartbeats wait for.
    rows = yield QUERIES["refresh_node"], params
    if rows:
        return _row_to_node(rows[0])
    # First registration, or the row was replaced or forgotten: register under the lock.
    yield TRANSACTION
    yield QUERIES["lock_node_registry"], {"key": _NODE_REGISTRY_LOCK}
    if not takeover:
        # Any row under the name now is another incarnation's (ours was not there to refresh).
        rows = yield QUERIES["get_node"], {"name": node.name}
        if rows:
            return _row_to_node(rows[0])
    rows = yield QUERIES["heartbeat_node"], params
    return _row_to_node(rows[0])


def _op_list_nodes() -> Op:
    rows = yield QUERIES["list_nodes"], {}
    return [_row_to_node(r) for r in rows]


def _cron_record(row: dict[str, Any]) -> CronRecord:
    return CronRecord(
        name=row["name"],
        signature=row["signature"],
        last_tick=row["last_tick"],
        updated_at=row["updated_at"],
    )


def _op_cron(name: str, signature: str, plan: CronPlan, now: datetime | None) -> Op:
    params: dict[str, Any] = {"name": name, "signature": signature, "now": now}
    yield QUERIES["cron_create"], params
    rows = yield QUERIES["cron_lock"], params
    record = _cron_record(rows[0])
    if record.signature != signature:
        rows = yield QUERIES["cron_reset"], params
        record = _cron_record(rows[0])
    jobs, last_tick = plan(record)
    inserted: list[Job] = []
    if jobs:
        inserted = yield from _op_insert(jobs, now)
    if last_tick is not None:
        yield QUERIES["cron_advance"], {**params, "tick": last_tick}
    return inserted


def _op_list_cron() -> Op:
    rows = yield QUERIES["list_cron"], {}
    return [_cron_record(r) for r in rows]


_CONTROL_KEYS = ("paused", "limit")


def _op_control_queue(
    queue: str, changes: Mapping[str, Any], node: str | None, now: datetime | None
) -> Op:
    unknown = set(changes) - set(_CONTROL_KEYS)
    if unknown:
        raise ValueError(f"unknown queue setting(s): {', '.join(sorted(unknown))}")
    if node is None:
        yield (
            QUERIES["control_queue"],
            {
                "queue": queue,
                "paused": changes.get("paused"),
                "limit": changes.get("limit"),
                "set_paused": "paused" in changes,
                "set_limit": "limit" in changes,
                "now": now,
            },
        )
        for key in changes:
            yield QUERIES["clear_node_control"], {"queue": queue, "key": key}
        return True
    rows = yield (
        QUERIES["control_node_queue"],
        {
            "node": node,
            "queue": queue,
            "set": json.dumps({k: v for k, v in changes.items() if v is not None}),
            "unset": [k for k, v in changes.items() if v is None],
        },
    )
    return bool(rows)


def _op_queue_settings() -> Op:
    rows = yield QUERIES["queue_settings"], {}
    return {
        r["name"]: QueueState(name=r["name"], paused=r["paused"], limit=r["limit"]) for r in rows
    }


def _op_counts() -> Op:
    rows = yield QUERIES["count_by_queue_and_state"], {}
    out: dict[str, dict[str, int]] = {}
    for row in rows:
        out.setdefault(row["queue"], {})[row["state"]] = row["n"]
    return out
