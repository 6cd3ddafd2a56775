"""koban.testing: modes, perform_job, assert/refute/all_enqueued, drain_queue, the pytest plugin."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

import koban
import koban.testing
from koban.job import JobState
from koban.testing import KobanTesting

CLOCK_START = datetime(2026, 7, 1, 12, 0, tzinfo=UTC)
calls: list[dict[str, object]] = []


@pytest.fixture
def app(db_url: str) -> Iterator[koban.Koban]:
    calls.clear()
    app = koban.Koban(
        db_url, queues={"default": 5, "mailers": 1}, clock=koban.FrozenClock(CLOCK_START)
    )

    @app.worker(max_attempts=3)
    def record(job: koban.Job) -> None:
        calls.append(job.args)

    @app.worker(max_attempts=3, backoff=lambda job: 30.0 * job.attempt)
    def flaky(job: koban.Job) -> None:
        raise RuntimeError(f"flaky failed on attempt {job.attempt}")

    @app.worker
    async def snoozer(job: koban.Job) -> koban.Snooze:
        return koban.Snooze(120)

    @app.worker
    def quitter(job: koban.Job) -> koban.Cancel:
        return koban.Cancel("not needed any more")

    @app.worker(queue="mailers")
    async def fan_out(job: koban.Job) -> None:
        await app.aenqueue_many([record.new({"n": i}) for i in range(job.args["count"])])

    app.test_workers = {  # type: ignore[attr-defined]
        "record": record, "flaky": flaky, "snoozer": snoozer, "quitter": quitter,
        "fan_out": fan_out,
    }  # fmt: skip
    yield app
    app.engine.close_sync()


def w(app: koban.Koban, name: str):  # type: ignore[no-untyped-def]
    return app.test_workers[name]  # type: ignore[attr-defined]


@pytest.fixture
def testing(app: koban.Koban) -> Iterator[KobanTesting]:
    with KobanTesting(app) as helper:
        yield helper


# ----- perform_job ---------------------------------------------------------------------------
def test_perform_job_completes_and_round_trips_args_through_json(
    app: koban.Koban, testing: KobanTesting
) -> None:
    outcome = testing.perform_job(w(app, "record"), {"ids": (1, 2)})

    assert outcome.state == "completed" and outcome.completed
    assert outcome.job.state == JobState.COMPLETED
    assert calls == [{"ids": [1, 2]}]


def test_perform_job_failure_is_retryable_with_the_workers_backoff(
    app: koban.Koban, testing: KobanTesting
) -> None:
    outcome = testing.perform_job(w(app, "flaky"), {}, attempt=2)

    assert outcome.state == "retryable"
    assert outcome.delay == 60.0
    assert outcome.job.scheduled_at == CLOCK_START + timedelta(seconds=60)
    assert outcome.error["type"] == "RuntimeError"
    assert outcome.error["message"] == "flaky failed on attempt 2"
    assert outcome.job.errors == [outcome.error]


def test_perform_job_on_the_last_attempt_discards(app: koban.Koban, testing: KobanTesting) -> None:
    outcome = testing.perform_job(w(app, "flaky"), {}, attempt=3)

    assert outcome.state == "discarded"
    assert outcome.job.discarded_at == CLOCK_START


def test_perform_job_reports_snooze_and_cancel(app: koban.Koban, testing: KobanTesting) -> None:
    snoozed = testing.perform_job(w(app, "snoozer"))
    cancelled = testing.perform_job("test_testing_helpers.app.<locals>.quitter")

    assert snoozed.state == "snoozed" and snoozed.delay == 120
    assert snoozed.job.attempt == 0 and snoozed.job.meta["snoozed"] == 1
    assert cancelled.state == "cancelled"
    assert cancelled.error["message"] == "not needed any more"


def test_perform_job_checks_args_as_enqueue_does(app: koban.Koban, testing: KobanTesting) -> None:
    with pytest.raises(koban.JobValidationError, match="not JSON-serialisable"):
        testing.perform_job(w(app, "record"), {"when": datetime.now(UTC)})
    with pytest.raises(koban.UnknownWorkerError, match=r"register it with @app\.worker"):
        testing.perform_job("nowhere.missing")


def test_perform_job_emits_telemetry_like_a_node(app: koban.Koban, testing: KobanTesting) -> None:
    events: list[str] = []
    app.telemetry.subscribe("*", lambda event, data: events.append(event))

    testing.perform_job(w(app, "flaky"))

    assert events == ["job:start", "job:exception"]


async def test_aperform_job_in_an_async_test(app: koban.Koban, testing: KobanTesting) -> None:
    outcome = await testing.aperform_job(w(app, "record"), {"n": 1})
    also_sync = testing.perform_job(w(app, "record"), {"n": 2})  # sync helper inside a loop

    assert outcome.completed and also_sync.completed
    assert calls == [{"n": 1}, {"n": 2}]


# ----- assert_enqueued / refute_enqueued / all_enqueued ---------------------------------------
def test_assert_enqueued_matches_args_as_a_subset(app: koban.Koban, testing: KobanTesting) -> None:
    record = w(app, "record")
    stored = record.enqueue({"athlete_id": 7, "full": True}, tags=["strava"])

    found = testing.assert_enqueued(worker=record, args={"athlete_id": 7}, queue="default")

    assert found.id == stored.id
    assert testing.assert_enqueued(record, tags=["strava"]).id == stored.id
    testing.refute_enqueued(worker=record, args={"athlete_id": 8})
    testing.refute_enqueued(worker=record, queue="mailers")
    assert calls == []  # manual mode: nothing ran


def test_assert_enqueued_failure_lists_what_was_enqueued(
    app: koban.Koban, testing: KobanTesting
) -> None:
    w(app, "record").enqueue({"athlete_id": 7})

    with pytest.raises(AssertionError) as failure:
        testing.assert_enqueued(worker=w(app, "record"), args={"athlete_id": 8})

    message = str(failure.value)
    assert "with args {'athlete_id': 8}" in message
    assert "{'athlete_id': 7}" in message


def test_refute_enqueued_failure_names_the_jobs(app: koban.Koban, testing: KobanTesting) -> None:
    job = w(app, "record").enqueue({"athlete_id": 7})

    with pytest.raises(AssertionError, match=f"found 1: #{job.id}"):
        testing.refute_enqueued(w(app, "record"))


def test_all_enqueued_is_oldest_first_and_only_pending_by_default(
    app: koban.Koban, testing: KobanTesting
) -> None:
    record = w(app, "record")
    jobs = [record.enqueue({"n": n}) for n in range(3)]
    later = record.enqueue({"n": 3}, schedule_in=3600)
    testing.drain_queue("default")
    fresh = record.enqueue({"n": 4})

    assert [j.id for j in testing.all_enqueued(record)] == [later.id, fresh.id]
    done = testing.all_enqueued(record, states=[JobState.COMPLETED])
    assert [j.id for j in done] == [j.id for j in jobs]


# ----- drain_queue ----------------------------------------------------------------------------
def test_drain_queue_runs_jobs_until_none_are_left(app: koban.Koban, testing: KobanTesting) -> None:
    w(app, "fan_out").enqueue({"count": 3})

    assert testing.drain_queue("mailers")["completed"] == 1
    counts = testing.drain_queue("default")

    assert counts == {"completed": 3, "retryable": 0, "discarded": 0, "cancelled": 0, "snoozed": 0}
    assert sorted(c["n"] for c in calls) == [0, 1, 2]  # type: ignore[type-var]
    assert testing.drain_queue("default")["completed"] == 0


def test_drain_queue_leaves_future_jobs_unless_with_scheduled(
    app: koban.Koban, testing: KobanTesting
) -> None:
    flaky = w(app, "flaky")
    job = flaky.enqueue({})
    w(app, "record").enqueue({"n": 1}, schedule_in=600)

    first = testing.drain_queue("default")
    assert first["retryable"] == 1 and first["completed"] == 0
    assert app.get_job(job.id).state == JobState.RETRYABLE

    rest = testing.drain_queue("default", with_scheduled=True)
    assert rest == {"completed": 1, "retryable": 1, "discarded": 1, "cancelled": 0, "snoozed": 0}
    gone = app.get_job(job.id)
    assert gone.state == JobState.DISCARDED and gone.attempt == 3


def test_drain_queue_runs_due_jobs_after_the_clock_moves(
    app: koban.Koban, testing: KobanTesting
) -> None:
    w(app, "record").enqueue({"n": 1}, schedule_in=600)
    assert testing.drain_queue("default")["completed"] == 0

    app.clock.advance(seconds=600)  # type: ignore[attr-defined]

    assert testing.drain_queue("default")["completed"] == 1


def test_drain_queue_stops_a_job_that_never_drains(app: koban.Koban, testing: KobanTesting) -> None:
    w(app, "snoozer").enqueue({})

    assert testing.drain_queue("default")["snoozed"] == 1
    with pytest.raises(RuntimeError, match="never drains"):
        testing.drain_queue("default", with_scheduled=True, limit=5)


def test_drain_queue_rejects_an_unknown_queue(testing: KobanTesting) -> None:
    with pytest.raises(koban.ConfigurationError, match="no queue 'nightly'"):
        testing.drain_queue("nightly")


async def test_adrain_queue_in_an_async_test(app: koban.Koban, testing: KobanTesting) -> None:
    await w(app, "record").aenqueue({"n": 1})

    counts = await testing.adrain_queue("default")

    assert counts["completed"] == 1
    await app.close()


# ----- modes ----------------------------------------------------------------------------------
def test_inline_mode_runs_at_enqueue_and_stores_nothing(
    app: koban.Koban, testing: KobanTesting
) -> None:
    with testing.inline():
        job = w(app, "record").enqueue({"n": 1})
        failed = w(app, "flaky").enqueue({})
        many = app.enqueue_many([w(app, "record").new({"n": n}) for n in (2, 3)])

    assert job.state == JobState.COMPLETED
    assert failed.state == JobState.RETRYABLE and failed.errors[0]["type"] == "RuntimeError"
    assert [j.state for j in many] == [JobState.COMPLETED, JobState.COMPLETED]
    assert calls == [{"n": 1}, {"n": 2}, {"n": 3}]
    assert app.list_jobs() == []

    stored = w(app, "record").enqueue({"n": 4})  # back to manual after the block
    assert stored.id is not None and stored.state == JobState.AVAILABLE
    assert len(calls) == 3


async def test_inline_mode_with_async_enqueue(app: koban.Koban, testing: KobanTesting) -> None:
    testing.mode = "inline"

    job = await w(app, "fan_out").aenqueue({"count": 2})

    assert job.state == JobState.COMPLETED
    assert calls == [{"n": 0}, {"n": 1}]
    testing.mode = "manual"
    assert (await w(app, "record").aenqueue({"n": 9})).state == JobState.AVAILABLE
    await app.close()


def test_unknown_mode_is_refused(testing: KobanTesting) -> None:
    with pytest.raises(koban.ConfigurationError, match="manual, inline"):
        testing.mode = "eager"


def test_closing_restores_the_apps_enqueue(app: koban.Koban) -> None:
    helper = KobanTesting(app, mode="inline")
    assert w(app, "record").enqueue({}).id is None
    helper.close()

    assert w(app, "record").enqueue({}).id is not None


# ----- module-level helpers -------------------------------------------------------------------
def test_module_helpers_use_the_active_app(app: koban.Koban) -> None:
    with koban.testing.use(app):
        w(app, "record").enqueue({"n": 1})
        koban.testing.assert_enqueued(worker=w(app, "record"), args={"n": 1})
        assert len(koban.testing.all_enqueued()) == 1
        assert koban.testing.drain_queue("default")["completed"] == 1
        koban.testing.refute_enqueued(w(app, "record"))


def test_module_helpers_find_the_app_of_a_worker(app: koban.Koban) -> None:
    assert koban.testing.perform_job(w(app, "record"), {"n": 1}).completed


def test_module_helpers_without_an_app_say_how_to_give_one() -> None:
    with pytest.raises(koban.ConfigurationError, match="koban_testing fixture"):
        koban.testing.drain_queue("default")


# ----- the pytest plugin ----------------------------------------------------------------------
PLUGIN_APP = """
import os
import koban

app = koban.Koban(os.environ["KOBAN_PLUGIN_TEST_URL"], queues={"default": 2})
ran = []

@app.worker
def greet(job):
    ran.append(job.args["name"])
"""

PLUGIN_TESTS = """
import pytest
import koban.testing
from pluginapp import greet, ran


def test_manual_by_default(koban_testing):
    assert koban_testing.mode == "manual"
    greet.enqueue({"name": "Ewa"})
    koban.testing.assert_enqueued(worker=greet, args={"name": "Ewa"})
    assert ran == []
    assert koban_testing.drain_queue("default")["completed"] == 1
    assert ran == ["Ewa"]


@pytest.mark.koban(mode="inline")
def test_inline_by_marker(koban_testing):
    assert greet.enqueue({"name": "Jan"}).state == "completed"
    assert "Jan" in ran


@pytest.mark.koban(mode="eager")
def test_bad_marker(koban_testing):
    pass
"""


def test_pytest_plugin_fixtures_and_marker(pg_url: str, tmp_path: Path) -> None:
    (tmp_path / "pluginapp.py").write_text(PLUGIN_APP)
    (tmp_path / "test_plugin_use.py").write_text(textwrap.dedent(PLUGIN_TESTS))
    (tmp_path / "pytest.ini").write_text("[pytest]\nkoban_app = pluginapp:app\n")
    env = {**__import__("os").environ, "KOBAN_PLUGIN_TEST_URL": pg_url, "PYTHONPATH": str(tmp_path)}

    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )

    assert "2 passed" in result.stdout, result.stdout + result.stderr
    assert "mode must be one of manual, inline" in result.stdout
    assert result.returncode == 1


def test_pytest_plugin_without_an_app_explains_how_to_set_one(tmp_path: Path) -> None:
    (tmp_path / "test_no_app.py").write_text("def test_it(koban_testing):\n    pass\n")

    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )

    assert result.returncode != 0
    assert "koban_app = 'package.module:app'" in result.stdout + result.stderr
