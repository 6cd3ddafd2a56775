"""The app's tables on each engine: upserts are idempotent and the sync cursor only moves on."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

import koban
from koban.examples.summer_challenge.store import Athlete, Store

NOW = datetime(2026, 7, 1, 12, 0, tzinfo=UTC)


def _activity(activity_id: int, start: str, name: str = "Morning Run") -> dict[str, object]:
    return {"id": activity_id, "name": name, "sport_type": "Run", "distance": 5000.0,
            "moving_time": 1500, "elapsed_time": 1600, "total_elevation_gain": 12.0,
            "start_date": start}  # fmt: skip


@pytest.fixture
def store(db_url: str) -> Store:
    store = Store(db_url)
    store.create_tables()
    store.create_tables()  # safe to run again
    store.clear()
    store.upsert_athlete(Athlete(7, "Ewa", "access-1", "refresh-1", 1_700_000_000))
    return store


def test_the_same_page_saved_twice_leaves_the_same_rows(store: Store) -> None:
    page = [_activity(1, "2026-06-01T06:00:00Z"), _activity(2, "2026-06-02T06:00:00Z")]

    store.save_activities(7, page, NOW)
    store.save_activities(7, [*page[:1], _activity(2, "2026-06-02T06:00:00Z", "Renamed")], NOW)

    assert store.activity_ids(7) == [1, 2]
    assert store.get_athlete(7).synced_until == int(datetime(2026, 6, 2, 6, tzinfo=UTC).timestamp())


def test_an_old_page_arriving_late_does_not_rewind_the_cursor(store: Store) -> None:
    store.save_activities(7, [_activity(2, "2026-06-02T06:00:00Z")], NOW)
    store.save_activities(7, [_activity(1, "2026-06-01T06:00:00Z")], NOW)

    assert store.get_athlete(7).synced_until == int(datetime(2026, 6, 2, 6, tzinfo=UTC).timestamp())
    assert store.count_activities() == 2


def test_reconnecting_replaces_tokens_but_keeps_the_cursor(store: Store) -> None:
    store.save_activities(7, [_activity(1, "2026-06-01T06:00:00Z")], NOW)

    store.upsert_athlete(Athlete(7, "Ewa K.", "access-2", "refresh-2", 1_800_000_000))

    athlete = store.get_athlete(7)
    assert (athlete.name, athlete.access_token, athlete.refresh_token) == (
        "Ewa K.", "access-2", "refresh-2",
    )  # fmt: skip
    assert athlete.synced_until > 0


def test_a_page_with_a_malformed_activity_is_refused_whole(store: Store) -> None:
    broken = [_activity(1, "2026-06-01T06:00:00Z"), {"id": 2, "start_date": "not a date"}]

    with pytest.raises(ValueError):
        store.save_activities(7, broken, NOW)

    assert store.count_activities() == 0
    assert store.get_athlete(7).synced_until == 0


def test_an_unsupported_url_names_the_setting() -> None:
    with pytest.raises(koban.ConfigurationError, match="sqlite:///"):
        Store("mysql://localhost/summer")
