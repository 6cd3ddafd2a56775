"""Recovery scenarios of the Summer Challenge sync, each on a real node and a real database."""

from __future__ import annotations

from datetime import datetime

import koban
from helpers import await_until
from koban.examples.summer_challenge.jobs import SyncAthleteWorker
from koban.examples.summer_challenge.standin import StravaStandIn
from koban.examples.summer_challenge.store import Store
from koban.job import Job, JobState


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
