"""Telemetry events around every run, and the one-line-per-outcome job logger."""

from __future__ import annotations

import json
import logging
import uuid
from datetime import timedelta
from typing import Any

import koban
from helpers import wait_for_state
from koban import Job, JobState
from koban.telemetry import JobLogger


class ListHandler(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def private_logger() -> tuple[logging.Logger, ListHandler]:
    logger = logging.getLogger(f"tests.koban.jobs.{uuid.uuid4().hex}")
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    handler = ListHandler()
    logger.addHandler(handler)
    return logger, handler


async def test_job_events_carry_queue_wait_and_duration(app: koban.Koban) -> None:
    events: list[tuple[str, dict[str, Any]]] = []
    app.telemetry.subscribe("*", lambda event, data: events.append((event, data)))

    @app.worker(max_attempts=1)
    async def works(job: Job) -> None: ...

    @app.worker(max_attempts=1)
    def fails(job: Job) -> None:
        raise ValueError("bad input row 7")

    async with app:
        ok = await works.aenqueue(scheduled_at=koban.Clock().now() - timedelta(minutes=10))
        bad = await fails.aenqueue()
        await wait_for_state(app, ok.id or 0, JobState.COMPLETED)
        await wait_for_state(app, bad.id or 0, JobState.DISCARDED)

    job_events = [(e, d) for e, d in events if e.startswith("job:")]
    by_job: dict[int, list[tuple[str, dict[str, Any]]]] = {}
    for event, data in job_events:
        by_job.setdefault(data["job"].id, []).append((event, data))

    assert [e for e, _ in by_job[ok.id or 0]] == ["job:start", "job:stop"]
    assert [e for e, _ in by_job[bad.id or 0]] == ["job:start", "job:exception"]

    start, stop = (d for _, d in by_job[ok.id or 0])
    assert start["queue"] == "default" and start["job"].attempt == 1
    # Queue wait counts from when the job was due, ten minutes before it ran.
    assert start["queue_wait"] >= 600
    assert stop["state"] == "completed"
    assert stop["duration"] >= 0 and stop["queue_wait"] == start["queue_wait"]

    _, failure = (d for _, d in by_job[bad.id or 0])
    assert failure["state"] == "discarded"
    assert failure["error"] == "ValueError: bad input row 7"
    assert "ValueError: bad input row 7" in failure["traceback"]
    assert failure["duration"] >= 0 and failure["queue_wait"] >= 0


async def test_unsubscribe_and_failing_subscribers(app: koban.Koban) -> None:
    seen: list[str] = []
    stop = app.telemetry.subscribe("job:stop", lambda e, d: seen.append(e))

    def broken(event: str, data: dict[str, Any]) -> None:
        raise RuntimeError("subscriber bug")

    app.telemetry.subscribe("job:start", broken)

    @app.worker
    async def works(job: Job) -> None: ...

    async with app:
        first = await works.aenqueue()
        await wait_for_state(app, first.id or 0, JobState.COMPLETED)
        stop()
        second = await works.aenqueue()
        # A failing subscriber never fails the job.
        await wait_for_state(app, second.id or 0, JobState.COMPLETED)

    assert seen == ["job:stop"]


async def test_events_reach_subscribers_added_while_the_node_runs(app: koban.Koban) -> None:
    """The node skips building an event nobody listens to; it asks again for every job."""
    telemetry = app.telemetry
    assert not telemetry.listening("job:stop")
    stops: list[dict[str, Any]] = []

    @app.worker
    async def works(job: Job) -> None: ...

    async with app:
        unheard = await works.aenqueue()
        await wait_for_state(app, unheard.id or 0, JobState.COMPLETED)
        unsubscribe = telemetry.subscribe("job:stop", lambda e, d: stops.append(d))
        assert telemetry.listening("job:stop") and not telemetry.listening("job:start")
        heard = await works.aenqueue(scheduled_at=koban.Clock().now() - timedelta(minutes=5))
        await wait_for_state(app, heard.id or 0, JobState.COMPLETED)
        unsubscribe()
        assert not telemetry.listening("job:stop")
        everything = telemetry.subscribe("*", lambda e, d: None)
        assert telemetry.listening("job:start") and telemetry.listening("job:stop")
        everything()

    assert [d["job"].id for d in stops] == [heard.id]
    assert stops[0]["state"] == "completed" and stops[0]["queue_wait"] >= 300


async def test_job_logger_writes_one_line_per_outcome(app: koban.Koban) -> None:
    logger, handler = private_logger()
    JobLogger(logger).attach(app.telemetry)

    @app.worker(max_attempts=2)
    async def works(job: Job) -> None: ...

    @app.worker(max_attempts=2)
    async def fails(job: Job) -> None:
        raise ValueError("nope")

    @app.worker
    async def snoozes(job: Job) -> koban.Snooze:
        return koban.Snooze(3600)

    async with app:
        a = await works.aenqueue()
        b = await fails.aenqueue()
        c = await snoozes.aenqueue()
        await wait_for_state(app, a.id or 0, JobState.COMPLETED)
        await wait_for_state(app, b.id or 0, JobState.RETRYABLE)
        await wait_for_state(app, c.id or 0, JobState.SCHEDULED)

    lines = {r.getMessage().split("job_id=")[1].split()[0]: r for r in handler.records}
    assert len(handler.records) == 3 and set(lines) == {str(a.id), str(b.id), str(c.id)}
    ok, bad, snoozed = lines[str(a.id)], lines[str(b.id)], lines[str(c.id)]
    assert ok.levelno == logging.INFO and "state=completed" in ok.getMessage()
    assert f"worker={works.name}" in ok.getMessage() and "duration_ms=" in ok.getMessage()
    assert bad.levelno == logging.WARNING and "state=retryable" in bad.getMessage()
    assert "ValueError: nope" in bad.getMessage()
    assert "state=snoozed" in snoozed.getMessage()


async def test_job_logger_json_lines(app: koban.Koban) -> None:
    logger, handler = private_logger()
    JobLogger(logger, as_json=True).attach(app.telemetry)

    @app.worker
    async def works(job: Job) -> None: ...

    async with app:
        job = await works.aenqueue()
        await wait_for_state(app, job.id or 0, JobState.COMPLETED)

    [record] = handler.records
    line = json.loads(record.getMessage())
    assert line["job_id"] == job.id and line["state"] == "completed"
    assert line["queue"] == "default" and line["attempt"] == 1
    assert line["duration_ms"] >= 0 and line["queue_wait_ms"] >= 0
