"""PostgreSQL-only behaviour: surviving terminated connections, LISTEN/NOTIFY and its fallback,
bulk inserts by COPY."""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest

import koban
from helpers import await_until, count_jobs, make_app, sql_rows, wait_for_state, wait_until
from koban import Job, JobState
from koban.engines.base import JobFilter, NodeInfo, NotificationHandler
from koban.engines.postgres import PostgresEngine
from koban.engines.postgres import engine as engine_module
from koban.engines.postgres.engine import (
    _NODE_REGISTRY_LOCK,
    COPY_MIN_JOBS,
    QUERIES,
    _may_be_closed,
    _op_cancel,
    _op_estimate,
    _op_list,
)
from koban.engines.postgres.notifier import listen

#: Nothing listens on port 1: every connection attempt is refused at once.
DEAD_URL = "postgresql://root@127.0.0.1:1/koban"


@pytest.fixture
async def apps(pg_url: str) -> AsyncIterator[Callable[..., koban.Koban]]:
    created: list[koban.Koban] = []

    def factory(**options: Any) -> koban.Koban:
        app = make_app(pg_url, **options)
        created.append(app)
        return app

    yield factory
    for app in created:
        await app.close()


def terminate_other_backends(url: str) -> list[int]:
    """Kill every other session on the test database, as a failover or an admin would."""
    rows = sql_rows(
        url,
        # Terminate in the SELECT list, so only rows that passed the WHERE (this database,
        # not this session) are touched; in the WHERE the planner may call it first.
        "SELECT pid, pg_terminate_backend(pid) FROM pg_stat_activity "
        "WHERE datname = current_database() AND pid <> pg_backend_pid()",
    )
    pids = [r[0] for r in rows]
    wait_until_ended(url, pids)
    return pids


def wait_until_ended(url: str, pids: list[int]) -> None:
    """pg_terminate_backend only signals: wait until those sessions have ended, as they have
    by the time a restart or a failover is over."""
    wait_until(
        lambda: not sql_rows(url, "SELECT 1 FROM pg_stat_activity WHERE pid = ANY(%s)", [pids]),
        what=f"sessions {pids} to end",
    )


def listener_pids(url: str) -> set[int]:
    rows = sql_rows(
        url,
        "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
        "AND query LIKE 'LISTEN koban_%%'",
    )
    return {r[0] for r in rows}


async def test_node_survives_terminated_connections(apps: Callable[..., koban.Koban]) -> None:
    app = apps(queues={"default": 5})
    gate = asyncio.Event()

    @app.worker
    async def noop(job: Job) -> None: ...

    @app.worker
    async def spans_the_outage(job: Job) -> None:
        await gate.wait()

    async with app:
        warm = await noop.aenqueue()
        await wait_for_state(app, warm.id or 0, JobState.COMPLETED)
        await await_until(lambda: listener_pids(app.engine.url), what="the node to LISTEN")
        running = await spans_the_outage.aenqueue()
        await wait_for_state(app, running.id or 0, JobState.EXECUTING)

        killed = set(terminate_other_backends(app.engine.url))
        assert killed, "the node had no connections to terminate"

        # The job running during the outage records its outcome once the database is back.
        gate.set()
        await wait_for_state(app, running.id or 0, JobState.COMPLETED)
        # The notifier reconnects: a new session is listening.
        await await_until(
            lambda: listener_pids(app.engine.url) - killed, what="the notifier to reconnect"
        )
        # And the node keeps taking new work.
        jobs = await app.aenqueue_many(noop.new({"i": i}) for i in range(20))
        for job in jobs:
            await wait_for_state(app, job.id or 0, JobState.COMPLETED)
        assert app.node is not None and app.node.running_jobs == 0

    # The client's own connections were terminated too; it reconnects on next use.
    again = app.enqueue(Job(worker="w.after"))
    assert again.id is not None


async def test_node_survives_repeated_terminations(apps: Callable[..., koban.Koban]) -> None:
    app = apps(queues={"default": 5})

    @app.worker
    async def noop(job: Job) -> None: ...

    async with app:
        for round_ in range(3):
            terminate_other_backends(app.engine.url)
            job = await noop.aenqueue({"round": round_})
            await wait_for_state(app, job.id or 0, JobState.COMPLETED)


def test_a_closed_idle_connection_is_seen_without_a_round_trip(pg_url: str) -> None:
    with psycopg.connect(pg_url, autocommit=True) as conn:
        assert not _may_be_closed(conn)
        conn.execute("SELECT 1").fetchall()
        assert not _may_be_closed(conn)  # a finished statement leaves nothing to read
        sql_rows(pg_url, "SELECT pg_terminate_backend(%s)", [conn.info.backend_pid])
        wait_until_ended(pg_url, [conn.info.backend_pid])
        assert _may_be_closed(conn)
        with pytest.raises(psycopg.OperationalError):
            conn.execute("SELECT 1")
        assert _may_be_closed(conn)  # broken now


@pytest.mark.parametrize("calls", ["async", "sync"])
async def test_client_calls_replace_pooled_connections_the_server_closed(
    pg_url: str, calls: str
) -> None:
    """No node: only client calls use the pools. Each checks its connection by a poll of the
    socket rather than a round trip, and must still replace every connection that died idle."""
    app = make_app(pg_url)

    @app.worker
    async def noop(job: Job) -> None: ...

    async def enqueue(i: int) -> Job:
        if calls == "async":
            return await noop.aenqueue({"i": i})
        return await asyncio.to_thread(noop.enqueue, {"i": i})

    try:
        await app.open()
        # Several connections in the pool, all idle once these return.
        await asyncio.gather(*(enqueue(i) for i in range(4)))
        for round_ in range(3):
            killed = terminate_other_backends(pg_url)
            assert killed, "the client had no connections to terminate"
            job = await enqueue(100 + round_)
            assert job.id is not None
            assert (await app.aget_job(job.id)) is not None
    finally:
        await app.close()


def test_threads_making_their_first_sync_call_at_once_share_one_pool(
    pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The sync pool is opened on first use. Threads arriving together must not each open one:
    the extra pools were dropped unclosed, each with its connection and threads."""
    opened: list[object] = []

    class CountedPool(engine_module._ClientPool):  # type: ignore[misc]
        def open(self, *args: Any, **kwargs: Any) -> None:
            opened.append(self)
            super().open(*args, **kwargs)

    monkeypatch.setattr(engine_module, "_ClientPool", CountedPool)
    app = make_app(pg_url)

    @app.worker
    def noop(job: Job) -> None: ...

    threads = 8
    barrier = threading.Barrier(threads)
    ids: list[int] = []

    def first_call(i: int) -> None:
        barrier.wait()
        ids.append(noop.enqueue({"i": i}).id or 0)

    workers = [threading.Thread(target=first_call, args=(i,)) for i in range(threads)]
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    app.engine.close_sync()
    assert len(set(ids)) == threads
    assert len(opened) == 1


class DeafEngine(PostgresEngine):
    """A PostgreSQL engine whose notifier can never connect: notifications are down."""

    poll_interval = 0.2

    async def listen(
        self,
        handler: NotificationHandler,
        on_state: Callable[[bool], Awaitable[None] | None] | None = None,
    ) -> None:
        await listen(DEAD_URL, handler, on_state)


async def test_polling_fallback_while_the_listener_is_down(pg_url: str) -> None:
    app = make_app(pg_url, engine=DeafEngine(pg_url))

    @app.worker
    async def noop(job: Job) -> None: ...

    try:
        async with app:
            for _ in range(3):
                job = await noop.aenqueue()
                # No notification can arrive; the short poll finds the job well before the
                # healthy-listener poll interval (10 s) would.
                await wait_for_state(app, job.id or 0, JobState.COMPLETED, timeout=5)
    finally:
        await app.close()


def collect_insert_notifications(url: str, action: Callable[[], Any]) -> list[dict[str, Any]]:
    """The koban_insert notifications sent while `action` runs, in order."""
    with psycopg.connect(url, autocommit=True) as listener:
        listener.execute("LISTEN koban_insert")
        action()
        # Notifications arrive in commit order: once the sentinel is here, all are.
        with psycopg.connect(url, autocommit=True) as other:
            other.execute("SELECT pg_notify('koban_insert', 'sentinel')")
        got: list[dict[str, Any]] = []
        for note in listener.notifies(timeout=10):
            if note.payload == "sentinel":
                return got
            got.append(json.loads(note.payload))
    raise AssertionError(f"the sentinel notification never arrived; got {got}")


def test_one_notification_per_queue_per_insert_statement(pg_url: str) -> None:
    app = make_app(pg_url)

    def insert() -> None:
        app.enqueue_many(
            [Job(worker="w.n", args={"i": i}) for i in range(300)]
            + [Job(worker="w.n", queue="mailers", args={"i": i}) for i in range(50)]
            + [Job(worker="w.n", queue="reports", schedule_in=600) for _ in range(10)]
        )
        app.enqueue(Job(worker="w.n"))
        app.engine.close_sync()  # sends what the throttle still holds

    try:
        notes = collect_insert_notifications(pg_url, insert)
    finally:
        app.engine.close_sync()

    # The batch: one per queue that gained available jobs (none for only-scheduled
    # "reports"); then one for the single insert (sent at once or held and sent once).
    assert sorted(n["queue"] for n in notes[:2]) == ["default", "mailers"]
    assert notes[2:] == [{"queue": "default"}]


def test_a_flood_of_single_inserts_sends_one_notification_per_interval(pg_url: str) -> None:
    app = make_app(pg_url)
    # A long interval makes the count exact: the first insert wakes the queue, the other 199
    # are held, and closing sends the single trailing notification.
    app.engine._throttle.interval = 3600  # type: ignore[attr-defined]

    def insert() -> None:
        for i in range(200):
            app.enqueue(Job(worker="w.n", queue="flood", args={"i": i}))
        app.engine.close_sync()

    try:
        notes = collect_insert_notifications(pg_url, insert)
    finally:
        app.engine.close_sync()
    assert notes == [{"queue": "flood"}, {"queue": "flood"}]


async def test_a_held_notification_still_wakes_an_idle_node(pg_url: str) -> None:
    app = make_app(pg_url)
    app.engine._throttle.interval = 0.3  # type: ignore[attr-defined]
    ran: list[int] = []

    @app.worker
    async def track(job: Job) -> None:
        ran.append(job.args["i"])

    async with app:
        assert app.node is not None
        await await_until(lambda: app.node is not None and app.node._listening, what="LISTEN")
        await track.aenqueue({"i": 1})  # wakes the queue at once
        await track.aenqueue({"i": 2})  # held: woken by the trailing notification
        # Well before the 10 s safety poll of a node whose notifications work.
        await await_until(lambda: sorted(ran) == [1, 2], timeout=5, what="both jobs to run")


def test_rolled_back_enqueue_sends_no_notification(pg_url: str) -> None:
    app = make_app(pg_url)

    def insert() -> None:
        with psycopg.connect(pg_url) as conn:
            app.enqueue(Job(worker="w.n", queue="rolled"), conn=conn)
            conn.rollback()
            app.enqueue(Job(worker="w.n", queue="committed"), conn=conn)
            conn.commit()

    try:
        notes = collect_insert_notifications(pg_url, insert)
    finally:
        app.engine.close_sync()
    assert notes == [{"queue": "committed"}]


async def test_open_reports_a_database_that_is_down() -> None:
    engine = PostgresEngine(DEAD_URL)
    with pytest.raises(koban.DatabaseUnavailableError, match="cannot connect to PostgreSQL"):
        await engine.open()
    await engine.close()


# ----- bulk insert by COPY ---------------------------------------------------------------------
#: A batch inserted by COPY rather than by one INSERT statement.
BULK = COPY_MIN_JOBS + 10


def bulk(queue: str = "default", n: int = BULK) -> list[Job]:
    return [Job(worker="w.bulk", queue=queue, args={"i": i}) for i in range(n)]


def test_bulk_insert_in_callers_transaction(pg_url: str) -> None:
    app = make_app(pg_url)

    def insert() -> None:
        with psycopg.connect(pg_url) as conn:
            app.enqueue_many(bulk("rolled"), conn=conn)
            assert conn.execute("SELECT count(*) FROM koban_jobs").fetchone() == (BULK,)
            assert count_jobs(pg_url) == 0  # nobody else sees them before the commit
            conn.rollback()
            kept = app.enqueue_many(bulk("committed"), conn=conn)
            assert count_jobs(pg_url) == 0
            conn.commit()
            assert [j.id for j in app.list_jobs(queues=["committed"])][::-1] == [j.id for j in kept]

    try:
        notes = collect_insert_notifications(pg_url, insert)
    finally:
        app.engine.close_sync()
    # The notification rides in the caller's transaction: none for the rolled-back batch.
    assert notes == [{"queue": "committed"}]
    assert count_jobs(pg_url) == BULK


def test_bulk_insert_on_callers_autocommit_connection(pg_url: str) -> None:
    app = make_app(pg_url)
    try:
        with psycopg.connect(pg_url, autocommit=True) as conn:
            # No transaction open: the batch is one transaction of its own, committed at once.
            app.enqueue_many(bulk(), conn=conn)
            assert count_jobs(pg_url) == BULK
            # Inside the caller's transaction block, it goes with the block.
            with pytest.raises(RuntimeError), conn.transaction():
                app.enqueue_many(bulk(), conn=conn)
                assert count_jobs(pg_url) == BULK
                raise RuntimeError("the caller's block fails")
            assert conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
        assert count_jobs(pg_url) == BULK
    finally:
        app.engine.close_sync()


async def test_async_bulk_insert_in_callers_transaction(pg_url: str) -> None:
    app = make_app(pg_url)
    try:
        async with await psycopg.AsyncConnection.connect(pg_url) as aconn:
            await app.aenqueue_many(bulk("rolled"), conn=aconn)
            await aconn.rollback()
            kept = await app.aenqueue_many(bulk("committed"), conn=aconn)
            assert count_jobs(pg_url) == 0
            await aconn.commit()
        assert count_jobs(pg_url) == BULK
        stored = await app.alist_jobs(queues=["committed"])
        assert sorted(j.id or 0 for j in stored) == [j.id for j in kept]
    finally:
        await app.close()


async def test_a_bulk_insert_wakes_a_running_node(pg_url: str) -> None:
    app = make_app(pg_url)
    ran: list[int] = []

    @app.worker
    async def track(job: Job) -> None:
        ran.append(job.args["i"])

    async with app:
        await await_until(lambda: app.node is not None and app.node._listening, what="LISTEN")
        await app.aenqueue_many(track.new({"i": i}) for i in range(BULK))
        # Well before the 10 s safety poll of a node whose notifications work.
        await await_until(lambda: len(ran) == BULK, timeout=5, what="the async batch to run")
        await asyncio.to_thread(app.enqueue_many, [track.new({"i": i}) for i in range(BULK)])
        await await_until(lambda: len(ran) == 2 * BULK, timeout=5, what="the sync batch to run")
    assert sorted(ran) == sorted(list(range(BULK)) * 2)


def test_bulk_insert_returns_times_in_the_sessions_zone(pg_url: str) -> None:
    """As the row reads back: in the session's TimeZone, a delay added as elapsed time even
    across a daylight-saving change."""
    zoned = pg_url + ("&" if "?" in pg_url else "?") + "options=-c%20TimeZone%3DAmerica/New_York"
    app = make_app(zoned, clock=koban.FrozenClock(datetime(2030, 3, 9, 12, 0, tzinfo=UTC)))
    try:
        jobs = app.enqueue_many(
            Job(worker="w.tz", schedule_in=86_400 * (i % 3) + 0.25, args={"i": i})
            for i in range(BULK)
        )
        for job in jobs:
            stored = app.get_job(job.id or 0)
            assert stored is not None and stored == job
            for returned, read in [
                (job.inserted_at, stored.inserted_at),
                (job.scheduled_at, stored.scheduled_at),
            ]:
                assert returned == read and returned is not None and read is not None
                assert returned.utcoffset() == read.utcoffset()
        assert {j.scheduled_at.utcoffset() for j in jobs if j.scheduled_at} == {
            timedelta(hours=-5),
            timedelta(hours=-4),
        }
    finally:
        app.engine.close_sync()


@pytest.mark.parametrize("mode", ["sync", "async"])
async def test_a_refused_bulk_insert_inserts_nothing_and_names_the_job(
    pg_url: str, mode: str
) -> None:
    # A row already holds the id the sequence hands out fifth: the COPY's fifth row collides.
    sql_rows(pg_url, "INSERT INTO koban_jobs (id, worker) VALUES (5, 'w.squatter')")
    app = make_app(pg_url)
    jobs = [Job(worker=f"w.job{i}", args={"i": i}) for i in range(BULK)]
    try:
        with pytest.raises(psycopg.errors.UniqueViolation) as raised:
            if mode == "sync":
                app.enqueue_many(jobs)
            else:
                await app.aenqueue_many(jobs)
    finally:
        await app.close()
    note = " ".join(getattr(raised.value, "__notes__", []))
    assert f"none of the {BULK} jobs" in note
    assert "refused job 5 (worker 'w.job4', queue 'default')" in note
    assert sql_rows(pg_url, "SELECT worker FROM koban_jobs") == [("w.squatter",)]


def reserved_ids(url: str) -> int:
    """How many ids the jobs' id sequence has handed out (COPY reserves its ids first)."""
    query = "SELECT last_value - CASE WHEN is_called THEN 0 ELSE 1 END FROM koban_jobs_id_seq"
    return int(sql_rows(url, query)[0][0])


@pytest.mark.parametrize("mode", ["sync", "async"])
async def test_a_bad_job_deep_in_a_bulk_insert_stops_the_copy_and_inserts_nothing(
    pg_url: str, mode: str
) -> None:
    """A pooled bulk insert validates each job as COPY sends the batch, so a bad job is found
    after earlier chunks already reached PostgreSQL: the COPY is aborted and nothing stays."""
    app = make_app(pg_url)
    jobs = [Job(worker="w.deep", args={"i": i}) for i in range(2000)]
    jobs[1800].args = {"when": object()}
    before = reserved_ids(pg_url)
    try:
        with pytest.raises(koban.JobValidationError, match="not JSON-serialisable") as raised:
            if mode == "sync":
                app.enqueue_many(jobs)
            else:
                await app.aenqueue_many(jobs)
        assert "w.deep" in str(raised.value)
        assert count_jobs(pg_url) == 0
        # The ids were reserved and 1,800 rows sent before the bad job was reached.
        assert reserved_ids(pg_url) >= before + 2000
        # A queue of the wrong type is refused as bad input too, not as a TypeError.
        bad_queue = [Job(worker="w.deep", args={"i": i}) for i in range(200)]
        bad_queue[150].queue = ["default"]  # type: ignore[assignment]
        with pytest.raises(koban.JobValidationError, match=r"queue for worker 'w\.deep'"):
            if mode == "sync":
                app.enqueue_many(bad_queue)
            else:
                await app.aenqueue_many(bad_queue)
        # The connection went back to the pool fit for use.
        jobs[1800].args = {"i": 1800}
        stored = app.enqueue_many(jobs) if mode == "sync" else await app.aenqueue_many(jobs)
        assert [j.args["i"] for j in stored] == list(range(2000))
        assert [j.id for j in stored] == sorted(j.id or 0 for j in stored)
        assert count_jobs(pg_url) == 2000
    finally:
        await app.close()


def test_a_bad_job_in_a_bulk_insert_on_the_callers_connection_leaves_its_transaction_usable(
    pg_url: str,
) -> None:
    """On the caller's connection every job is validated before any statement is sent: a bad
    job must not abort the caller's transaction."""
    app = make_app(pg_url)
    jobs = bulk()
    jobs[-1].args = {"when": object()}
    try:
        with psycopg.connect(pg_url) as conn:
            conn.execute("INSERT INTO koban_jobs (worker) VALUES ('w.callers_own')")
            with pytest.raises(koban.JobValidationError):
                app.enqueue_many(jobs, conn=conn)
            assert conn.info.transaction_status == psycopg.pq.TransactionStatus.INTRANS
            conn.execute("SELECT 1")  # not aborted
            conn.commit()
        assert sql_rows(pg_url, "SELECT worker FROM koban_jobs") == [("w.callers_own",)]
    finally:
        app.engine.close_sync()


async def test_a_call_that_gets_no_pooled_connection_says_nothing_was_sent(pg_url: str) -> None:
    app = make_app(pg_url)
    await app.open()
    engine = app.engine
    assert isinstance(engine, PostgresEngine)
    apool, spool = engine._async_pool(), engine._sync()
    held_async = [await apool.getconn() for _ in range(apool.max_size)]
    held_sync = [spool.getconn() for _ in range(spool.max_size)]
    apool.timeout = spool.timeout = 0.2  # instead of 30 s
    try:
        with pytest.raises(koban.DatabaseUnavailableError, match=r"came free within 0\.2 s") as a:
            await app.aenqueue(Job(worker="w.starved"))
        with pytest.raises(koban.DatabaseUnavailableError, match="Nothing was sent") as s:
            app.enqueue_many([Job(worker="w.starved", args={"i": i}) for i in range(BULK)])
        with pytest.raises(koban.DatabaseUnavailableError, match="pooled connections were busy"):
            await app.aget_job(1)
        for raised, pool in ((a, apool), (s, spool)):
            assert f"all {pool.max_size} of this process's" in str(raised.value)
            assert "may or may not" not in str(raised.value)
    finally:
        for c in held_async:
            await apool.putconn(c)
        for c in held_sync:
            spool.putconn(c)
    try:
        assert count_jobs(pg_url) == 0
        assert (await app.aenqueue(Job(worker="w.fed"))).id is not None
        assert app.enqueue(Job(worker="w.fed")).id is not None
    finally:
        await app.close()


def lock_waiters(url: str) -> list[int]:
    """Sessions on the test database waiting for a lock."""
    rows = sql_rows(
        url,
        "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
        "AND wait_event_type = 'Lock' AND pid <> pg_backend_pid()",
    )
    return [r[0] for r in rows]


@pytest.mark.parametrize("size", [1, BULK], ids=["statement", "copy"])
@pytest.mark.parametrize("mode", ["sync", "async"])
async def test_an_insert_whose_connection_is_killed_raises_database_unavailable(
    pg_url: str, size: int, mode: str
) -> None:
    app = make_app(pg_url)
    jobs = [Job(worker="w.killed", args={"i": i}) for i in range(size)]
    try:
        with psycopg.connect(pg_url) as locker:
            # Hold the insert mid-statement: it waits for this lock until its backend is killed.
            locker.execute("LOCK TABLE koban_jobs IN SHARE MODE")
            if mode == "sync":
                insert: Any = asyncio.create_task(asyncio.to_thread(app.enqueue_many, jobs))
            else:
                insert = asyncio.create_task(app.aenqueue_many(jobs))
            waiting = await await_until(lambda: lock_waiters(pg_url), what="the insert to wait")
            sql_rows(pg_url, "SELECT pg_terminate_backend(%s)", [waiting[0]])
            with pytest.raises(koban.DatabaseUnavailableError) as raised:
                await insert
            locker.rollback()
        message = str(raised.value)
        assert "may or may not have committed" in message
        assert "w.killed" in message and "enqueue" in message
        assert isinstance(raised.value.__cause__, psycopg.OperationalError)
        assert count_jobs(pg_url) == 0
        # The pool replaced the dead connection: the next insert goes through.
        again = app.enqueue_many(jobs) if mode == "sync" else await app.aenqueue_many(jobs)
        assert len(again) == size and count_jobs(pg_url) == size
    finally:
        await app.close()


def test_bulk_insert_in_callers_pipeline_uses_one_statement(pg_url: str) -> None:
    """A connection in pipeline mode cannot COPY: a batch on it is one INSERT, as before. The
    jobs come back as stored, ids and all, though pipeline results arrive only on a sync."""
    app = make_app(pg_url)
    unique = koban.Unique(period=60)
    try:
        with psycopg.connect(pg_url) as conn:
            with conn.pipeline():
                conn.execute("SELECT 1")  # the caller's own statement, queued before ours
                many = app.enqueue_many(bulk(), conn=conn)
                one = app.enqueue(Job(worker="w.one"), conn=conn)
                first = app.enqueue(Job(worker="w.u", unique=unique), conn=conn)
                again = app.enqueue(Job(worker="w.u", unique=unique), conn=conn)
            conn.commit()
        assert count_jobs(pg_url) == BULK + 2
        stored = {job.id: job for job in app.list_jobs()}
        assert [job.id for job in many] == sorted(job.id or 0 for job in many)
        for job in [*many, one, first]:
            assert job.id in stored and stored[job.id].worker == job.worker
            assert job.state is JobState.AVAILABLE and job.inserted_at is not None
        assert again.conflict and again.id == first.id
    finally:
        app.engine.close_sync()


async def test_async_insert_in_callers_pipeline_returns_ids(pg_url: str) -> None:
    app = make_app(pg_url)
    try:
        async with await psycopg.AsyncConnection.connect(pg_url) as conn:
            async with conn.pipeline():
                one = await app.aenqueue(Job(worker="w.one"), conn=conn)
                many = await app.aenqueue_many(bulk(), conn=conn)
            await conn.commit()
        ids = {job.id for job in app.list_jobs()}
        assert one.id in ids and {job.id for job in many} <= ids and len(ids) == BULK + 1
    finally:
        await app.close()


class Switchable:
    """A TCP relay to PostgreSQL, in the test's event loop, that can go away and come back as
    a restarted server does: `down()` closes every relayed connection and refuses new ones,
    `up()` accepts again on the same port."""

    def __init__(self, url: str) -> None:
        info = psycopg.conninfo.conninfo_to_dict(url)
        self.target = (str(info.get("host") or "127.0.0.1"), int(info.get("port") or 5432))
        self.port = 0
        self.server: asyncio.Server | None = None
        self.writers: list[asyncio.StreamWriter] = []
        self.url = psycopg.conninfo.make_conninfo(url, host="127.0.0.1", port=0)

    async def up(self) -> None:
        self.server = await asyncio.start_server(
            self._relay, "127.0.0.1", self.port, reuse_address=True
        )
        self.port = self.server.sockets[0].getsockname()[1]
        self.url = psycopg.conninfo.make_conninfo(self.url, port=self.port)

    async def down(self) -> None:
        assert self.server is not None
        self.server.close()
        for writer in self.writers:
            writer.close()
        self.writers.clear()
        await self.server.wait_closed()

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(*self.target)
        self.writers += [writer, up_writer]

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError, asyncio.CancelledError):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            dst.close()

        await asyncio.gather(pump(reader, up_writer), pump(up_reader, writer))


async def test_a_node_waiting_for_a_connection_resumes_soon_after_the_server_returns(
    pg_url: str,
) -> None:
    """Every pooled connection died with the server, and the pool's one try to replace them
    failed: a fetch waiting for a connection gets one within about a second of the server's
    return, not at the end of its 30 s wait."""
    relay = Switchable(pg_url)
    await relay.up()
    engine = PostgresEngine(relay.url)
    try:
        await engine.open()
        assert await engine.fetch("q", 1, "node-1", "p") == []
        pool = engine._async_pool()
        assert pool.timeout == 30
        await relay.down()
        with pytest.raises(psycopg.OperationalError):
            await engine.fetch("q", 1, "node-1", "p")  # the pool discards its dead connections
        waiting = asyncio.create_task(engine.fetch("q", 1, "node-1", "p"))
        await asyncio.sleep(2.5)  # the pool gives up replacing them; the fetch waits
        assert not waiting.done()
        await relay.up()
        assert await asyncio.wait_for(waiting, 10) == []
    finally:
        await engine.close()
        if relay.server is not None:
            await relay.down()


def test_a_client_call_waiting_through_an_outage_resumes_soon_after_the_server_returns(
    pg_url: str,
) -> None:
    """A sync client call made while the server is away waits for it. psycopg_pool's own
    reconnection would back off (attempts at about 1, 3, 7, 15 s) and hand the call a
    connection only at its next attempt; koban's pool asks again every second instead."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    def in_loop(coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, loop).result(30)

    relay = Switchable(pg_url)
    in_loop(relay.up())
    engine = PostgresEngine(relay.url)
    try:
        assert engine.list_jobs_sync(JobFilter(limit=1)) == []
        in_loop(relay.down())
        finished: list[float] = []

        def list_one() -> None:
            engine.list_jobs_sync(JobFilter(limit=1))
            finished.append(time.monotonic())

        call = threading.Thread(target=list_one)
        call.start()
        time.sleep(8.0)  # an outage past psycopg_pool's first three reconnection attempts
        assert call.is_alive()
        in_loop(relay.up())
        back = time.monotonic()
        call.join(20)
        assert finished, "the call failed or never returned"
        assert finished[0] - back < 3.0, f"it resumed {finished[0] - back:.1f} s after the server"
    finally:
        engine.close_sync()
        if relay.server is not None:
            in_loop(relay.down())
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)


async def test_a_session_stuck_in_a_registration_stalls_no_heartbeat_for_long(
    pg_url: str,
) -> None:
    """A node cut off between the registry lock and its COMMIT leaves its session idle in
    transaction, holding the lock. Registered nodes' heartbeats take no lock and go on; a new
    registration waits only until the server ends the stuck session (5 s idle)."""
    engine = PostgresEngine(pg_url)
    await engine.open()
    live = NodeInfo(name="node-live", meta={"incarnation": "a"})
    try:
        first = await engine.heartbeat(live, 5.0)
        stuck = psycopg.connect(pg_url)  # a transaction left open, as by a vanished client
        stuck.execute(QUERIES["lock_node_registry"], {"key": _NODE_REGISTRY_LOCK})
        again = await asyncio.wait_for(engine.heartbeat(live, 5.0), 3)
        assert again.started_at == first.started_at
        assert again.heartbeat_at and first.heartbeat_at and again.heartbeat_at > first.heartbeat_at
        newcomer = NodeInfo(name="node-new", meta={"incarnation": "b"})
        registered = await asyncio.wait_for(engine.heartbeat(newcomer, 5.0), 20)
        assert registered.name == "node-new"
        assert registered.meta["cluster_started_at"] == first.meta["cluster_started_at"]
        with pytest.raises(psycopg.errors.IdleInTransactionSessionTimeout):
            stuck.execute("SELECT 1")  # the server ended it
        stuck.close()
    finally:
        await engine.close()


def _plan(conn: psycopg.Connection[Any], op: Any) -> str:
    """The plan of the first statement a client operation sends, seq scans discouraged."""
    query, params = next(op)
    with conn.transaction():
        conn.execute("SET LOCAL enable_seqscan = off")
        return "\n".join(
            r[0] for r in conn.execute(psycopg.sql.SQL("EXPLAIN {}").format(query), params)
        )


def test_listing_indexes_leave_out_executing_jobs_and_filters_still_use_them(
    pg_url: str,
) -> None:
    app = make_app(pg_url)
    try:
        app.enqueue_many([Job(worker="w.common", args={"n": n}) for n in range(400)])
        rare = app.enqueue_many([Job(worker="w.rare", queue="rare") for _ in range(4)])
        with psycopg.connect(pg_url, autocommit=True) as conn:
            conn.execute(
                "UPDATE koban_jobs SET state = 'executing', attempt = 1, "
                "attempted_by = ARRAY['node-1'], attempted_at = now() WHERE id = %s",
                (rare[0].id,),
            )
            conn.execute(
                "UPDATE koban_jobs SET state = 'completed', completed_at = now() "
                "WHERE id % 5 = 0 AND queue = 'default'"
            )
            conn.execute("ANALYZE koban_jobs")
            predicates = dict(
                conn.execute(
                    "SELECT indexrelid::regclass::text, pg_get_expr(indpred, indrelid) "
                    "FROM pg_index WHERE indexrelid::regclass::text = ANY(%s)",
                    (["koban_jobs_state_idx", "koban_jobs_queue_idx", "koban_jobs_worker_idx"],),
                ).fetchall()
            )
            assert predicates == dict.fromkeys(
                ["koban_jobs_state_idx", "koban_jobs_queue_idx", "koban_jobs_worker_idx"],
                "(state <> 'executing'::text)",
            )
            # No executing job has an entry in the listing indexes.
            [(entries,)] = conn.execute(
                "SELECT count(*) FROM koban_jobs WHERE queue = 'rare' AND state <> 'executing'"
            ).fetchall()
            assert entries == 3

            by_queue = _plan(conn, _op_list(JobFilter(queues=["rare"], limit=10)))
            assert "koban_jobs_queue_idx" in by_queue and "koban_jobs_executing_idx" in by_queue
            by_worker = _plan(conn, _op_list(JobFilter(workers=["w.rare"])))
            assert "koban_jobs_worker_idx" in by_worker and "koban_jobs_executing_idx" in by_worker
            by_state = _plan(conn, _op_list(JobFilter(states=["completed"], limit=10)))
            assert "koban_jobs_state_idx" in by_state and "executing" not in by_state
            # A limited list reads each branch in id order and stops: no sort of every match.
            for flt in [JobFilter(limit=51), JobFilter(queues=["default"], limit=5)]:
                assert "Merge Append" in _plan(conn, _op_list(flt)), flt
            cancel = _plan(conn, _op_cancel(JobFilter(queues=["rare"]), None))
            assert "koban_jobs_queue_idx" in cancel and "koban_jobs_executing_idx" in cancel
            count = _plan(conn, _op_estimate(JobFilter(queues=["rare"])))
            assert "koban_jobs_queue_idx" in count and "koban_jobs_executing_idx" in count

        listed = app.list_jobs(JobFilter(queues=["rare"]))
        assert [j.id for j in listed] == [j.id for j in reversed(rare)]
        assert listed[-1].state is JobState.EXECUTING
    finally:
        app.engine.close_sync()


def test_a_limited_cancel_takes_the_next_job_when_a_locked_one_moved_on(pg_url: str) -> None:
    """The limit applies to the rows still matching once locked, as FOR UPDATE ... LIMIT does,
    also when the filter spans executing jobs and other states."""
    app = make_app(pg_url)
    try:
        first, second, running = app.enqueue_many(
            [Job(worker="w.cc", queue="cc") for _ in range(3)]
        )
        sql_rows(
            pg_url,
            "UPDATE koban_jobs SET state = 'executing', attempt = 1, attempted_by = "
            "ARRAY['node-1'], attempted_at = now() WHERE id = %s",
            (running.id,),
        )
        result: list[list[Job]] = []
        with psycopg.connect(pg_url) as other:
            other.execute(
                "UPDATE koban_jobs SET state = 'completed', completed_at = now() WHERE id = %s",
                (first.id,),
            )
            cancel = threading.Thread(
                target=lambda: result.append(app.cancel_jobs(JobFilter(queues=["cc"], limit=1)))
            )
            cancel.start()
            waiting = "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
            assert wait_until(lambda: sql_rows(pg_url, waiting)[0][0] >= 1, 10)
            other.commit()
            cancel.join(10)
        assert [[j.id for j in jobs] for jobs in result] == [[second.id]]
        assert [j.state for j in app.list_jobs(JobFilter(queues=["cc"]))] == [
            JobState.EXECUTING,
            JobState.CANCELLED,
            JobState.COMPLETED,
        ]
    finally:
        app.engine.close_sync()


def test_only_tagged_jobs_are_in_the_tags_index_and_a_tag_filter_uses_it(pg_url: str) -> None:
    app = make_app(pg_url)
    try:
        untagged = app.enqueue_many([Job(worker="w.a", args={"n": n}) for n in range(300)])
        tagged = app.enqueue_many([Job(worker="w.a", tags=["nightly", f"t{n}"]) for n in range(3)])
        with psycopg.connect(pg_url, autocommit=True) as conn:
            conn.execute("ANALYZE koban_jobs")
            [(predicate,)] = conn.execute(
                "SELECT pg_get_expr(indpred, indrelid) FROM pg_index "
                "WHERE indexrelid = 'koban_jobs_tags_idx'::regclass"
            ).fetchall()
            assert predicate == "(tags <> '{}'::text[])"
            with conn.transaction():
                conn.execute("SET LOCAL enable_seqscan = off")
                plan = "\n".join(
                    row[0]
                    for row in conn.execute(
                        "EXPLAIN SELECT id FROM koban_jobs WHERE tags @> ARRAY['nightly'] "
                        "AND tags <> '{}'"
                    )
                )
        assert "koban_jobs_tags_idx" in plan
        found = app.list_jobs(JobFilter(tags=["nightly"]))
        assert sorted(j.id or 0 for j in found) == sorted(j.id or 0 for j in tagged)
        assert len(untagged) == 300
    finally:
        app.engine.close_sync()


async def test_a_claimed_job_holds_every_field_as_stored(pg_url: str) -> None:
    app = make_app(pg_url)
    try:
        await app.open()
        [job] = await app.aenqueue_many(
            [
                Job(
                    worker="w.full",
                    args={"n": 1, "nested": {"x": [1, 2]}},
                    queue="default",
                    priority=3,
                    max_attempts=4,
                    meta={"source": "test"},
                    tags=["a", "b"],
                    unique=koban.Unique(period=60),
                )
            ]
        )
        [claimed] = await app.engine.fetch("default", 5, "node-x", "default.p1")
        stored = await app.aget_job(job.id or 0)
        assert stored is not None
        assert claimed == stored
        assert claimed.state is JobState.EXECUTING and claimed.attempted_by == [
            "node-x",
            "default.p1",
        ]
        assert claimed.unique_key is not None and claimed.unique_key == stored.unique_key
    finally:
        await app.close()


def test_column_rules_are_domains_so_a_claim_rechecks_only_what_it_writes(pg_url: str) -> None:
    """PostgreSQL runs every table CHECK on every new row version, whichever columns changed;
    a domain's check runs only where its column is written. Schema 5 keeps one table check,
    the state's, which every claim and outcome sets anyway. A table check added on another
    column would put its cost back on every claim and every outcome."""
    checks = sql_rows(
        pg_url,
        "SELECT conname FROM pg_constraint WHERE conrelid = 'koban_jobs'::regclass "
        "AND contype = 'c' ORDER BY conname",
    )
    assert checks == [("koban_jobs_state_check",)]
    domains = dict(
        sql_rows(
            pg_url,
            "SELECT a.attname, t.typname FROM pg_attribute AS a JOIN pg_type AS t "
            "ON t.oid = a.atttypid WHERE a.attrelid = 'koban_jobs'::regclass "
            "AND t.typtype = 'd'",
        )
    )
    assert domains == {
        "queue": "koban_queue_name",
        "worker": "koban_worker_name",
        "args": "koban_json_object",
        "meta": "koban_json_object",
        "priority": "koban_priority",
        "attempt": "koban_attempt",
        "max_attempts": "koban_max_attempts",
    }


async def test_schema_5_keeps_the_jobs_of_an_older_schema(fresh_pg_url: str) -> None:
    """Upgrading a database at schema 4 rewrites the jobs table into the domain types: every job
    stays as it was, and a node claims and completes them afterwards."""
    app = make_app(fresh_pg_url, queues={"older": 10})
    done: list[int] = []

    @app.worker
    async def old(job: Job) -> None:
        done.append(job.args["n"])

    name = app.resolve_worker(old).name
    with psycopg.connect(fresh_pg_url, autocommit=True) as conn, conn.transaction():
        conn.execute(
            "CREATE TABLE koban_schema (version integer PRIMARY KEY, "
            "applied_at timestamptz NOT NULL DEFAULT now())"
        )
        for version, _name, text in engine_module.MIGRATIONS[:4]:
            conn.execute(text.encode())
            conn.execute("INSERT INTO koban_schema (version) VALUES (%s)", (version,))
        conn.execute(
            "INSERT INTO koban_jobs (worker, queue, args, meta, priority, max_attempts) "
            "SELECT %s, 'older', jsonb_build_object('n', n), '{\"m\": 1}', n %% 10, 3 "
            "FROM generate_series(1, 50) AS n",
            (name,),
        )
    before = sql_rows(fresh_pg_url, "SELECT * FROM koban_jobs ORDER BY id")
    engine = PostgresEngine(fresh_pg_url)
    try:
        assert engine.migrate() == list(range(5, engine_module.LATEST_VERSION + 1))
    finally:
        engine.close_sync()
    assert sql_rows(fresh_pg_url, "SELECT * FROM koban_jobs ORDER BY id") == before
    async with app:
        await await_until(lambda: len(done) == 50, what="the older jobs to run")
        for row in before:
            await wait_for_state(app, row[0], JobState.COMPLETED)
    assert sorted(done) == list(range(1, 51))
