"""The engine queries behind the dashboard's counts and chart, on every engine."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import pytest

import koban
import koban.engines.postgres.engine as pg_engine
from helpers import wait_until
from koban.web.stats import LARGE_TABLE, job_counts, throughput
from web.opsapp import FLAKY, GREET, build, enqueue


def run(app: koban.Koban, coro: Callable[[], Any]) -> Any:
    async def body() -> Any:
        await app.open()
        try:
            return await coro()
        finally:
            await app.close()

    return asyncio.run(body())


def test_estimate_jobs_counts_small_results_exactly(db_url: str) -> None:
    app = build(db_url)
    for n in range(4):
        enqueue(app, GREET, {"n": n, "who": "ada" if n % 2 else "bob"}, tags=["t"] if n else [])
    enqueue(app, FLAKY, {"to": "x"}, schedule_in=60)
    engine = app.engine

    async def estimates() -> list[tuple[int, bool]]:
        return [
            await engine.estimate_jobs(koban.JobFilter()),
            await engine.estimate_jobs(koban.JobFilter(states=["available"])),
            await engine.estimate_jobs(koban.JobFilter(queues=["mailers"], states=["scheduled"])),
            await engine.estimate_jobs(koban.JobFilter(args_text='"ada"', tags=["t"])),
            await engine.estimate_jobs(koban.JobFilter(workers=["nobody"])),
            await engine.estimate_jobs(koban.JobFilter(before_id=2, limit=1)),  # both ignored
        ]

    assert run(app, estimates) == [(5, True), (4, True), (1, True), (2, True), (0, True), (5, True)]


def test_postgres_estimates_beyond_the_exact_limit(
    pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    app = build(pg_url)
    for n in range(5):
        enqueue(app, GREET, {"n": n})
    monkeypatch.setattr(pg_engine, "EXACT_COUNT_LIMIT", 2)
    count, exact = run(app, lambda: app.engine.estimate_jobs(koban.JobFilter()))
    assert exact is False
    assert count >= 3  # at least what was counted before giving up; otherwise the planner's


def test_job_counts_fill_every_state_and_configured_queue(db_url: str) -> None:
    app = build(db_url, queues={"default": 2, "mailers": 1, "empty": 1})
    enqueue(app, GREET, {})
    enqueue(app, GREET, {}, schedule_in=60)
    counts = run(app, lambda: job_counts(app, ["set-at-runtime"]))
    assert counts.exact is True
    assert set(counts.by_queue) == {"default", "mailers", "empty", "set-at-runtime"}
    assert counts.by_queue["default"]["available"] == 1
    assert counts.by_queue["default"]["scheduled"] == 1
    assert counts.by_queue["empty"] == dict.fromkeys(counts.by_queue["empty"], 0)
    assert len(counts.by_queue["empty"]) == 7
    assert counts.total("available") == 1
    assert LARGE_TABLE > 10_000


def test_throughput_buckets_completions_and_failed_attempts(db_url: str, run_node: Any) -> None:
    app = build(db_url)
    ok = [enqueue(app, GREET, {"n": n}) for n in range(3)]
    bad = enqueue(app, FLAKY, {"to": "x", "fail": True})
    cancelled = enqueue(app, GREET, {}, schedule_in=3600)
    app.cancel_job(cancelled.id or 0)
    run_node(build(db_url))

    def finished() -> bool:
        jobs = app.list_jobs(ids=[j.id for j in [*ok, bad]])
        return sorted(str(j.state) for j in jobs) == ["completed"] * 3 + ["discarded"]

    wait_until(finished, what="the jobs to finish")
    minutes = run(app, lambda: throughput(app, 60))
    assert len(minutes) == 60
    assert minutes == sorted(minutes, key=lambda m: m.minute)
    assert all(m.minute.second == 0 and m.minute.tzinfo is not None for m in minutes)
    assert minutes[-1].minute <= datetime.now(UTC)
    assert sum(m.completed for m in minutes) == 3
    assert sum(m.failed for m in minutes) == 1
    assert len(run(app, lambda: app.engine.throughput(5))) == 5
