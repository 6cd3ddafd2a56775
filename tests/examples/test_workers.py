"""Worker tests for the Summer Challenge sync, on PostgreSQL against the local Strava stand-in."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

import koban
from koban.examples.summer_challenge.jobs import SyncAllWorker, SyncAthleteWorker
from koban.examples.summer_challenge.standin import StravaStandIn
from koban.examples.summer_challenge.store import Store
from koban.job import JobState
from koban.runtime.node import Node
from koban.testing import KobanTesting


def test_sync_stores_every_activity_and_completes_the_job(
    koban_testing: KobanTesting, strava: StravaStandIn, store: Store
) -> None:
    athlete = strava.athletes[1]
    job = SyncAthleteWorker.enqueue({"athlete_id": athlete.id})

    counts = koban_testing.drain_queue("default")

    assert counts["completed"] == 1
    assert sum(counts.values()) == 1
    assert koban_testing.app.get_job(job.id).state == JobState.COMPLETED
    assert store.activity_ids(athlete.id) == sorted(strava.activity_ids(athlete.id))
    assert store.get_athlete(athlete.id).last_synced_at is not None


def test_nightly_sync_fans_out_one_job_per_athlete(
    koban_testing: KobanTesting, strava: StravaStandIn, store: Store
) -> None:
    SyncAllWorker.enqueue({})

    counts = koban_testing.drain_queue("default")

    assert counts == {"completed": 4, "retryable": 0, "discarded": 0, "cancelled": 0, "snoozed": 0}
    done = koban_testing.all_enqueued(SyncAthleteWorker, states=[JobState.COMPLETED])
    assert sorted(j.args["athlete_id"] for j in done) == [a.id for a in strava.athletes]
    assert store.activity_ids() == sorted(strava.activity_ids())


def test_second_sync_fetches_only_new_activities(
    koban_testing: KobanTesting, strava: StravaStandIn, store: Store
) -> None:
    athlete = strava.athletes[2]
    assert koban_testing.perform_job(SyncAthleteWorker, {"athlete_id": athlete.id}).completed
    added = strava.add_activities(athlete.id, 3)

    outcome = koban_testing.perform_job(SyncAthleteWorker, {"athlete_id": athlete.id})

    assert outcome.completed
    assert {a["id"] for a in added} <= set(store.activity_ids(athlete.id))
    assert store.activity_ids(athlete.id) == sorted(strava.activity_ids(athlete.id))


def test_strava_down_retries_with_backoff_then_discards_after_three_attempts(
    koban_testing: KobanTesting,
    strava: StravaStandIn,
    store: Store,
    frozen_clock: koban.FrozenClock,
) -> None:
    strava.fail("error")
    athlete = strava.athletes[1]
    job = SyncAthleteWorker.enqueue({"athlete_id": athlete.id})

    first = koban_testing.drain_queue("default")
    failed = koban_testing.app.get_job(job.id)

    assert first["retryable"] == 1
    assert failed.state == JobState.RETRYABLE and failed.attempt == 1
    # koban's default curve with the app's base: 15 + 2**1 seconds, ±10% jitter.
    delay = (failed.scheduled_at - frozen_clock.now()).total_seconds()
    assert 17 * 0.9 <= delay <= 17 * 1.1
    assert failed.errors[0]["attempt"] == 1
    assert failed.errors[0]["type"].endswith("StravaUnavailable")
    assert "500" in failed.errors[0]["message"]

    rest = koban_testing.drain_queue("default", with_scheduled=True)
    gone = koban_testing.app.get_job(job.id)

    assert rest == {"completed": 0, "retryable": 1, "discarded": 1, "cancelled": 0, "snoozed": 0}
    assert gone.state == JobState.DISCARDED
    assert gone.attempt == 3
    assert [e["attempt"] for e in gone.errors] == [1, 2, 3]
    assert store.count_activities(athlete.id) == 0


def test_expired_token_is_refreshed_before_syncing(
    koban_testing: KobanTesting, strava: StravaStandIn, store: Store
) -> None:
    athlete = strava.athletes[0]  # connected with an access token that has expired
    old_token = store.get_athlete(athlete.id).access_token

    outcome = koban_testing.perform_job(SyncAthleteWorker, {"athlete_id": athlete.id})

    assert outcome.completed
    assert strava.refreshes[athlete.id] == 1
    saved = store.get_athlete(athlete.id)
    assert saved.access_token != old_token
    assert saved.access_token == athlete.access_token
    assert store.activity_ids(athlete.id) == sorted(strava.activity_ids(athlete.id))


def test_token_refused_mid_sync_is_refreshed_and_the_sync_continues(
    koban_testing: KobanTesting, strava: StravaStandIn, store: Store
) -> None:
    athlete = strava.athletes[1]
    strava.fail("expired_token", athlete_id=athlete.id, times=1)

    outcome = koban_testing.perform_job(SyncAthleteWorker, {"athlete_id": athlete.id})

    assert outcome.completed
    assert strava.refreshes[athlete.id] == 1
    assert store.activity_ids(athlete.id) == sorted(strava.activity_ids(athlete.id))


def test_revoked_refresh_token_discards_with_a_reason(
    koban_testing: KobanTesting, strava: StravaStandIn, store: Store
) -> None:
    athlete = strava.athletes[0]
    athlete.refresh_token = "revoked-by-the-athlete"

    outcome = koban_testing.perform_job(SyncAthleteWorker, {"athlete_id": athlete.id})

    assert outcome.state == "discarded"
    assert "connect Strava again" in outcome.error["message"]


@pytest.mark.parametrize("daily", [False, True], ids=["15-minute", "daily"])
def test_rate_limited_sync_snoozes_until_the_window_resets(
    koban_testing: KobanTesting,
    strava: StravaStandIn,
    store: Store,
    frozen_clock: koban.FrozenClock,
    daily: bool,
) -> None:
    strava.fail("rate_limit", daily=daily)
    athlete = strava.athletes[1]
    job = SyncAthleteWorker.enqueue({"athlete_id": athlete.id})
    now = frozen_clock.now()
    reset = (
        datetime(now.year, now.month, now.day, tzinfo=UTC) + timedelta(days=1)
        if daily
        else datetime.fromtimestamp(now.timestamp() // 900 * 900 + 900, UTC)
    )

    counts = koban_testing.drain_queue("default")
    snoozed = koban_testing.app.get_job(job.id)

    assert counts["snoozed"] == 1
    assert snoozed.state == JobState.SCHEDULED
    assert snoozed.scheduled_at == reset
    assert snoozed.attempt == 0  # not a failed attempt
    assert snoozed.errors == []
    assert snoozed.meta["snoozed"] == 1

    strava.heal()
    frozen_clock.set(reset)
    after = koban_testing.drain_queue("default")

    assert after["completed"] == 1
    done = koban_testing.app.get_job(job.id)
    assert done.state == JobState.COMPLETED and done.attempt == 1
    assert store.activity_ids(athlete.id) == sorted(strava.activity_ids(athlete.id))


def test_nightly_sync_is_unique_for_an_hour(
    koban_testing: KobanTesting, frozen_clock: koban.FrozenClock
) -> None:
    first = SyncAllWorker.enqueue({})
    frozen_clock.advance(seconds=60)
    second = SyncAllWorker.enqueue({})

    assert not first.conflict
    assert second.conflict and second.id == first.id
    assert len(koban_testing.all_enqueued(SyncAllWorker)) == 1

    frozen_clock.advance(seconds=3600)
    later = SyncAllWorker.enqueue({})

    assert not later.conflict and later.id != first.id


def test_athlete_who_left_is_cancelled(koban_testing: KobanTesting) -> None:
    outcome = koban_testing.perform_job(SyncAthleteWorker, {"athlete_id": 1})

    assert outcome.state == "cancelled"
    assert "no longer in the challenge" in outcome.error["message"]


@pytest.mark.koban(mode="inline")
def test_inline_mode_runs_the_whole_fan_out_at_enqueue(
    koban_testing: KobanTesting, strava: StravaStandIn, store: Store
) -> None:
    job = SyncAllWorker.enqueue({})

    assert job.state == JobState.COMPLETED
    assert store.activity_ids() == sorted(strava.activity_ids())
    koban_testing.refute_enqueued(SyncAthleteWorker)


async def test_completed_syncs_are_pruned_after_sixty_days(
    koban_testing: KobanTesting, strava: StravaStandIn, frozen_clock: koban.FrozenClock
) -> None:
    app = koban_testing.app
    job = await SyncAthleteWorker.aenqueue({"athlete_id": strava.athletes[1].id})
    assert (await koban_testing.adrain_queue("default"))["completed"] == 1
    pruner = next(p for p in app.plugins() if isinstance(p, koban.Pruner))
    node = Node(
        engine=app.engine,
        workers=app.workers,
        queues=app.queues,
        telemetry=app.telemetry,
        clock=app.clock,
        name="pruning-test",
    )

    frozen_clock.advance(days=59)
    assert await pruner.tick(node) == 0
    assert await app.aget_job(job.id) is not None

    frozen_clock.advance(days=1, seconds=1)
    assert await pruner.tick(node) == 1
    assert await app.aget_job(job.id) is None
    await app.close()
