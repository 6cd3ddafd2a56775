"""Bad input to enqueue, fuzzed: every refusal is a clear JobValidationError and writes nothing.

Each property has two outcomes and nothing else: either the job is stored exactly as given
(one more row), or the call raises `koban.JobValidationError` naming the worker and the table
is unchanged. Any other exception (a driver error, a UnicodeEncodeError, a RecursionError) is a
bug: the caller could not tell what to fix, and some of those fired after the row was written.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import koban
from helpers import sql_rows
from koban.job import DEFAULT_MAX_ARGS_BYTES

from .strategies import (
    any_args,
    any_queue,
    any_schedule_in,
    any_scheduled_at,
    any_tags,
    normalise,
    numbers_and_junk,
    plain_text,
)

#: Examples per property; raise KOBAN_FUZZ_EXAMPLES (for example to 2000) for a deeper search.
EXAMPLES = int(os.environ.get("KOBAN_FUZZ_EXAMPLES", "60"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


def job_rows(url: str) -> list[tuple[Any, ...]]:
    """The table as (id, state, queue, worker, attempt) rows: what "unchanged" compares."""
    return sql_rows(url, "SELECT id, state, queue, worker, attempt FROM koban_jobs ORDER BY id")


def noop(job: koban.Job) -> None:
    """The worker every fuzzed job is enqueued for."""


def fuzz_app(url: str) -> koban.Koban:
    application = koban.Koban(url, max_args_bytes=4096)
    application.worker(noop)
    return application


@pytest.fixture
def app(db_url: str) -> Iterator[koban.Koban]:
    application = fuzz_app(db_url)
    yield application
    application.engine.close_sync()


@pytest.fixture
def pg_app(pg_url: str) -> Iterator[koban.Koban]:
    application = fuzz_app(pg_url)
    yield application
    application.engine.close_sync()


def attempt_enqueue(app: koban.Koban, url: str, args: Any = None, **options: Any) -> Any:
    """Enqueue and check the two allowed outcomes; returns the stored job or the error."""
    before = job_rows(url)
    try:
        job = app.enqueue(app.workers[WORKER].target.new(args, **options))  # type: ignore[union-attr]
    except koban.JobValidationError as exc:
        assert WORKER in str(exc), f"error does not name the worker: {exc}"
        assert job_rows(url) == before, f"a refused enqueue changed the table: {exc}"
        return exc
    after = job_rows(url)
    assert len(after) == len(before) + 1
    assert after[-1][0] == job.id
    return job


WORKER = f"{noop.__module__}.{noop.__qualname__}"


@FUZZ
@given(args=any_args)
def test_args_of_any_shape(app: koban.Koban, db_url: str, args: Any) -> None:
    outcome = attempt_enqueue(app, db_url, args)
    if isinstance(outcome, koban.Job):
        expected = {} if args is None else args  # no args means an empty object
        assert isinstance(expected, dict)
        assert normalise(outcome.args) == normalise(expected)
        stored = app.get_job(outcome.id)
        assert stored is not None and normalise(stored.args) == normalise(expected)


@FUZZ
@given(meta=any_args)
def test_meta_of_any_shape(app: koban.Koban, db_url: str, meta: Any) -> None:
    outcome = attempt_enqueue(app, db_url, {}, meta=meta)
    if isinstance(outcome, koban.Job):
        assert normalise(outcome.meta) == normalise({} if meta is None else meta)


@pytest.mark.parametrize(
    ("args", "why"),
    [
        ({"text": "a\x00b"}, "NUL"),
        ({"a\x00": 1}, "NUL"),
        ({"nested": [{"deep": "\x00"}]}, "NUL"),
        ({"text": "\ud800"}, "surrogate"),
        ({7: "int key"}, "key"),
        ({"nested": {None: 1}}, "key"),
        ({"n": math.nan}, "JSON"),
        ({"when": datetime(2024, 1, 1)}, "JSON"),
        ({"blob": b"\x00\x01"}, "JSON"),
        ({"big": 10**5000}, "JSON"),
    ],
)
def test_args_refusals_name_the_problem(app: koban.Koban, db_url: str, args: Any, why: str) -> None:
    outcome = attempt_enqueue(app, db_url, args)
    assert isinstance(outcome, koban.JobValidationError)
    assert why in str(outcome)


def test_deeply_nested_args_are_refused_clearly(app: koban.Koban, db_url: str) -> None:
    nested: Any = []
    for _ in range(5000):
        nested = [nested]
    outcome = attempt_enqueue(app, db_url, {"deep": nested})
    assert isinstance(outcome, koban.JobValidationError)
    assert "nested" in str(outcome)


def test_the_nesting_limit_is_exact_for_scalars_and_containers(
    app: koban.Koban, db_url: str
) -> None:
    def wrapped(levels: int, leaf: Any) -> dict[str, Any]:
        value: Any = leaf
        for _ in range(levels - 1):
            value = [value]
        return {"deep": value}  # args itself is level 1

    # 255 lists inside args: the innermost list is at level 256, its element at 257.
    assert isinstance(attempt_enqueue(app, db_url, wrapped(255, [])), koban.Job)
    for leaf in (1, "x", None, []):
        outcome = attempt_enqueue(app, db_url, wrapped(256, leaf))
        assert isinstance(outcome, koban.JobValidationError), leaf
        assert "nested more than 256 levels" in str(outcome)


@settings(FUZZ, max_examples=max(EXAMPLES * 2 // 3, 1))
@given(limit=st.integers(min_value=16, max_value=4096), extra=st.integers(-8, 8))
def test_args_size_limit_is_exact(db_url: str, limit: int, extra: int) -> None:
    app = koban.Koban(db_url, max_args_bytes=limit)
    app.worker(noop)
    # {"s":"..."} encodes to len(payload) + 8 bytes; "é" is two bytes in UTF-8.
    payload = "é" * ((limit - 8 + extra) // 2) + "x" * ((limit - 8 + extra) % 2)
    size = len(payload.encode()) + 8
    try:
        outcome = attempt_enqueue(app, db_url, {"s": payload})
    finally:
        app.engine.close_sync()
    if size <= limit:
        assert isinstance(outcome, koban.Job)
    else:
        assert isinstance(outcome, koban.JobValidationError)
        assert f"{size} bytes" in str(outcome) and str(limit) in str(outcome)
        assert "max_args_bytes" in str(outcome)


def test_default_args_limit_is_one_mebibyte(db_url: str) -> None:
    app = koban.Koban(db_url)
    app.worker(noop)
    try:
        head = len('{"s":""}')
        fits = attempt_enqueue(app, db_url, {"s": "x" * (DEFAULT_MAX_ARGS_BYTES - head)})
        assert isinstance(fits, koban.Job)
        too_big = attempt_enqueue(app, db_url, {"s": "x" * (DEFAULT_MAX_ARGS_BYTES - head + 1)})
        assert isinstance(too_big, koban.JobValidationError)
        assert "1048577 bytes" in str(too_big) and "1048576" in str(too_big)
    finally:
        app.engine.close_sync()


@pytest.mark.parametrize("limit", [0, -1, 1.5, "1MiB", True])
def test_invalid_args_limit_is_a_configuration_error(db_url: str, limit: Any) -> None:
    with pytest.raises(koban.ConfigurationError, match="max_args_bytes"):
        koban.Koban(db_url, max_args_bytes=limit)


@FUZZ
@given(priority=numbers_and_junk)
def test_priority(app: koban.Koban, db_url: str, priority: Any) -> None:
    outcome = attempt_enqueue(app, db_url, {}, priority=priority)
    if isinstance(outcome, koban.Job):
        expected = 0 if priority is None else priority
        assert type(expected) is int and 0 <= expected <= 9
        assert outcome.priority == expected
    else:
        assert "priority" in str(outcome)


@FUZZ
@given(max_attempts=numbers_and_junk)
def test_max_attempts(app: koban.Koban, db_url: str, max_attempts: Any) -> None:
    outcome = attempt_enqueue(app, db_url, {}, max_attempts=max_attempts)
    if isinstance(outcome, koban.Job):
        expected = 20 if max_attempts is None else max_attempts
        assert type(expected) is int and expected >= 1
        assert outcome.max_attempts == expected
    else:
        assert "max_attempts" in str(outcome)


@FUZZ
@given(queue=any_queue)
def test_queue(app: koban.Koban, db_url: str, queue: Any) -> None:
    outcome = attempt_enqueue(app, db_url, {}, queue=queue)
    if isinstance(outcome, koban.Job):
        assert outcome.queue == ("default" if queue is None else queue)
    else:
        assert "queue" in str(outcome)


@FUZZ
@given(tags=any_tags)
def test_tags(app: koban.Koban, db_url: str, tags: Any) -> None:
    outcome = attempt_enqueue(app, db_url, {}, tags=tags)
    if isinstance(outcome, koban.Job):
        assert not isinstance(tags, str), "a string was split into one tag per character"
        assert sorted(outcome.tags) == sorted(tags or [])
    else:
        assert "tags" in str(outcome)


@FUZZ
@given(schedule_in=any_schedule_in)
def test_schedule_in(app: koban.Koban, db_url: str, schedule_in: Any) -> None:
    outcome = attempt_enqueue(app, db_url, {}, schedule_in=schedule_in)
    if isinstance(outcome, koban.Job):
        assert outcome.scheduled_at is not None and outcome.inserted_at is not None
        if schedule_in is not None:
            waited = (outcome.scheduled_at - outcome.inserted_at).total_seconds()
            assert math.isclose(waited, float(schedule_in), abs_tol=1e-3, rel_tol=1e-9)
    else:
        assert "schedule_in" in str(outcome)


@FUZZ
@given(scheduled_at=any_scheduled_at)
def test_scheduled_at(app: koban.Koban, db_url: str, scheduled_at: Any) -> None:
    outcome = attempt_enqueue(app, db_url, {}, scheduled_at=scheduled_at)
    if isinstance(outcome, koban.Job):
        assert outcome.scheduled_at is not None
        if scheduled_at is not None:
            # In UTC: a local time inside a daylight-saving gap or fold never compares equal to
            # another zone's time (PEP 495), though it names the same instant.
            assert outcome.scheduled_at == scheduled_at.astimezone(UTC)
    else:
        assert "scheduled_at" in str(outcome)


@pytest.mark.parametrize("unique", [5, "yes", {"period": 60}, object()])
def test_unique_of_the_wrong_type(app: koban.Koban, db_url: str, unique: Any) -> None:
    outcome = attempt_enqueue(app, db_url, {}, unique=unique)
    assert isinstance(outcome, koban.JobValidationError)
    assert "unique" in str(outcome)


@settings(FUZZ, max_examples=max(EXAMPLES // 2, 1))
@given(
    good=st.integers(min_value=0, max_value=20),
    bad_at=st.integers(min_value=0, max_value=20),
    bad=st.sampled_from(
        [
            {"args": {"x": "\x00"}},
            {"priority": 10},
            {"max_attempts": 0},
            {"queue": ""},
            {"tags": "one"},
            {"schedule_in": 1e13},
            {"args": {"big": "x" * 5000}},
        ]
    ),
)
def test_enqueue_many_is_all_or_nothing(
    app: koban.Koban, db_url: str, good: int, bad_at: int, bad: dict[str, Any]
) -> None:
    worker = app.workers[WORKER].target
    jobs = [worker.new({"i": i}) for i in range(good)]  # type: ignore[union-attr]
    options = dict(bad)
    jobs.insert(min(bad_at, good), worker.new(options.pop("args", {}), **options))  # type: ignore[union-attr]
    before = job_rows(db_url)
    with pytest.raises(koban.JobValidationError, match=WORKER):
        app.enqueue_many(jobs)
    assert job_rows(db_url) == before


def test_enqueue_many_refuses_things_that_are_not_jobs(app: koban.Koban, db_url: str) -> None:
    before = job_rows(db_url)
    with pytest.raises(TypeError, match=r"Worker\.new"):
        app.enqueue_many([{"worker": WORKER}])  # type: ignore[list-item]
    assert job_rows(db_url) == before


@settings(FUZZ, max_examples=max(EXAMPLES // 2, 1))
@given(args=any_args, priority=numbers_and_junk)
async def test_aenqueue_agrees_with_enqueue(
    app: koban.Koban, db_url: str, args: Any, priority: Any
) -> None:
    worker = app.workers[WORKER].target
    before = job_rows(db_url)
    try:
        job = await worker.aenqueue(args, priority=priority)  # type: ignore[union-attr]
    except koban.JobValidationError as exc:
        assert WORKER in str(exc)
        assert job_rows(db_url) == before
        with pytest.raises(koban.JobValidationError):
            worker.enqueue(args, priority=priority)  # type: ignore[union-attr]
        assert job_rows(db_url) == before
    else:
        assert len(job_rows(db_url)) == len(before) + 1
        assert normalise(job.args) == normalise({} if args is None else args)
    finally:
        await app.close()


@settings(FUZZ, max_examples=max(EXAMPLES // 2, 1))
@given(
    bad=st.sampled_from(
        [
            {"args": {"x": "\x00"}},
            {"args": {"x": "\ud800"}},
            {"max_attempts": 2**31},
            {"queue": "q" * 129},
            {"tags": ["a\x00"]},
            {"schedule_in": 1e12},
        ]
    ),
    label=plain_text,
)
def test_refusal_leaves_the_callers_transaction_usable(
    pg_app: koban.Koban, pg_url: str, bad: dict[str, Any], label: str
) -> None:
    """A refused enqueue inside the caller's transaction must not abort that transaction."""
    worker = pg_app.workers[WORKER].target
    options = dict(bad)
    with psycopg.connect(pg_url) as conn:
        conn.execute("CREATE TEMP TABLE IF NOT EXISTS fuzz_note (label text)")
        conn.execute("INSERT INTO fuzz_note VALUES (%s)", (label,))
        with pytest.raises(koban.JobValidationError):
            worker.enqueue(options.pop("args", {}), conn=conn, **options)  # type: ignore[union-attr]
        row = conn.execute("SELECT count(*) FROM fuzz_note").fetchone()
        assert row is not None and row[0] >= 1


def test_far_future_and_far_past_schedules_are_refused_before_insert(
    app: koban.Koban, db_url: str
) -> None:
    """Times the database stores but Python cannot read back must never reach the table."""
    for option in (
        {"schedule_in": 10**12},
        {"schedule_in": -(10**12)},
        {"scheduled_at": datetime(1, 1, 1, tzinfo=UTC) + timedelta(hours=1)},
    ):
        outcome = attempt_enqueue(app, db_url, {}, **option)
        if isinstance(outcome, koban.Job):
            assert app.get_job(outcome.id) is not None
