"""Recovery scenarios of the Summer Challenge sync, each on a real node and a real database."""

from __future__ import annotations

import signal
from datetime import UTC, datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import koban
from helpers import await_until, node_process, sql_rows, wait_until
from koban.examples.summer_challenge.jobs import (
    SyncAllWorker,
    SyncAthleteWorker,
    create_app,
    setup,
)
from koban.examples.summer_challenge.standin import StravaStandIn
from koban.examples.summer_challenge.store import Store
from koban.job import Job, JobState
from koban.testing import run_sync

from .conftest import seed, summer_settings

NODE_APP = "koban.examples.summer_challenge.jobs:app"


async def _job_when(app: koban.Koban, job_id: int, state: JobState, attempt: int) -> Job:
    async def reached() -> Job | None:
        job = await app.aget_job(job_id)
        return job if job and job.state == state and job.attempt == attempt else None

    return await await_until(reached, what=f"job {job_id} to be {state} after attempt {attempt}")


def _at(error: dict[str, object]) -> datetime:
    return datetime.fromisoformat(str(error["at"]))


async def test_strava_failing_is_retried_with_backoff_and_the_sync_recovers(
    summer_app: koban.Koban, strava: StravaStandIn, store: Store, frozen_clock: koban.FrozenClock
) -> None:
    """Scenario 2: Strava answers 500 twice; the node retries with backoff; attempt 3 syncs."""
    athlete = strava.athletes[1]
    strava.fail("error", times=2, athlete_id=athlete.id)

    async with summer_app:
        job = await SyncAthleteWorker.aenqueue({"athlete_id": athlete.id})
        for attempt in (1, 2):
            failed = await _job_when(summer_app, job.id, JobState.RETRYABLE, attempt)
            assert failed.scheduled_at > frozen_clock.now()  # waits for its backoff...
            frozen_clock.set(failed.scheduled_at)  # ...which the test lets pass at once
        done = await _job_when(summer_app, job.id, JobState.COMPLETED, 3)

    assert [e["attempt"] for e in done.errors] == [1, 2]
    assert all("500" in str(e["message"]) for e in done.errors)
    # Backoff from koban's curve: 15 + 2**attempt seconds, ±10%.
    gap = (_at(done.errors[1]) - _at(done.errors[0])).total_seconds()
    assert 17 * 0.9 <= gap <= 17 * 1.1
    assert store.activity_ids(athlete.id) == sorted(strava.activity_ids(athlete.id))


async def test_strava_down_for_good_is_discarded_after_three_attempts(
    summer_app: koban.Koban, strava: StravaStandIn, store: Store, frozen_clock: koban.FrozenClock
) -> None:
    """Scenario 2, the other ending: three failed attempts, each recorded, then discarded."""
    strava.fail("error")
    athlete = strava.athletes[2]

    async with summer_app:
        job = await SyncAthleteWorker.aenqueue({"athlete_id": athlete.id})
        for attempt in (1, 2):
            failed = await _job_when(summer_app, job.id, JobState.RETRYABLE, attempt)
            frozen_clock.set(failed.scheduled_at)
        gone = await _job_when(summer_app, job.id, JobState.DISCARDED, 3)

    assert [e["attempt"] for e in gone.errors] == [1, 2, 3]
    assert gone.discarded_at is not None
    assert store.count_activities(athlete.id) == 0


async def test_every_node_down_at_midnight_the_missed_sync_runs_when_a_node_starts(
    db_url: str, strava: StravaStandIn
) -> None:
    """Scenario 1: the node runs until 23:58 Warsaw time, every node is down over midnight,
    and the first node to start at 06:00 inserts the missed nightly sync, which syncs everyone.
    """
    warsaw = ZoneInfo("Europe/Warsaw")
    clock = koban.FrozenClock(datetime(2026, 7, 1, 23, 58, tzinfo=warsaw))
    evening = create_app(summer_settings(db_url, strava), clock=clock)
    store = setup(evening)
    seed(store, strava)

    async with evening:  # the scheduler registers the entry: from now on its ticks count
        await await_until(
            lambda: sql_rows(db_url, "SELECT count(*) FROM koban_cron")[0][0] == 1,
            what="the nightly cron entry to be registered",
        )
    evening.engine.close_sync()
    assert await evening.alist_jobs(workers=[SyncAllWorker.name]) == []

    clock.set(datetime(2026, 7, 2, 6, 0, tzinfo=warsaw))  # midnight passed with no node up
    morning = create_app(summer_settings(db_url, strava), clock=clock)
    async with morning:
        nightly = (
            await await_until(
                lambda: morning.alist_jobs(workers=[SyncAllWorker.name]),
                what="the missed nightly sync to be inserted",
            )
        )[0]
        await await_until(
            lambda: _all_synced(morning, len(strava.athletes)),
            what="every athlete's sync to complete",
        )
    morning.engine.close_sync()

    midnight = datetime(2026, 7, 2, 0, 0, tzinfo=warsaw)
    assert nightly.meta["cron_tick"] == midnight.astimezone(UTC).isoformat()
    assert len(await morning.alist_jobs(workers=[SyncAllWorker.name])) == 1  # once, not twice
    assert store.activity_ids() == sorted(strava.activity_ids())


async def _all_synced(app: koban.Koban, athletes: int) -> bool:
    jobs = await app.alist_jobs(workers=[SyncAllWorker.name, SyncAthleteWorker.name])
    return len(jobs) == athletes + 1 and all(j.state == JobState.COMPLETED for j in jobs)


def test_node_killed_mid_sync_is_rescued_after_restart_and_nothing_is_lost_or_doubled(
    db_url: str, strava: StravaStandIn, tmp_path: Path
) -> None:
    """Scenario 3: a node is SIGKILLed in the middle of the nightly sync. Restarted under its
    configured name, it rescues the syncs it was running (its jobs predate its restart) and
    finishes them; each athlete's cursor and the upserts leave every activity stored once.
    """
    settings = summer_settings(db_url, strava, per_page=5)
    app = create_app(settings)
    store = setup(app)
    seed(store, strava)
    strava.fail("slow", delay=0.3)  # every Strava call takes 0.3 s: the sync takes seconds
    env = {
        "SUMMER_CHALLENGE_DATABASE_URL": db_url,
        "STRAVA_BASE_URL": strava.url,
        "STRAVA_CLIENT_ID": settings.client_id,
        "STRAVA_CLIENT_SECRET": settings.client_secret,
        "SUMMER_CHALLENGE_PER_PAGE": "5",
    }

    with node_process(NODE_APP, db_url, tmp_path / "first.log", node="summer-1", env=env) as first:
        first.wait_started()
        SyncAllWorker.enqueue({})
        wait_until(
            lambda: store.count_activities() > 0 and app.list_jobs(states=["executing"]),
            what="the nightly sync to be under way",
        )
        first.signal(signal.SIGKILL)
        first.wait()

    stuck = app.list_jobs(states=["executing"], workers=[SyncAthleteWorker.name])
    assert stuck, "the killed node left no sync executing; nothing to rescue"
    assert 0 < store.count_activities() < strava.total_activities

    strava.heal()
    with node_process(
        NODE_APP, db_url, tmp_path / "second.log", node="summer-1", env=env
    ) as second:
        second.wait_started()
        wait_until(
            lambda: run_sync(lambda: _all_synced(app, len(strava.athletes))),
            timeout=60,
            what="every athlete's sync to complete after the restart",
        )
        second.signal(signal.SIGTERM)
        assert second.wait() == 0

    assert store.activity_ids() == sorted(strava.activity_ids())  # none lost, none doubled
    for job in stuck:
        rescued = app.get_job(job.id)
        assert rescued.state == JobState.COMPLETED
        assert rescued.meta["rescued"] == 1
        assert [e["type"] for e in rescued.errors] == ["koban.Rescued"]
    app.engine.close_sync()
