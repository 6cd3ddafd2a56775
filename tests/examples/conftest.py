"""Fixtures for the Summer Challenge tests: a Strava stand-in and the app on a real database."""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import UTC, datetime

import pytest

import koban
from koban.examples.summer_challenge.jobs import create_app, setup
from koban.examples.summer_challenge.settings import Settings
from koban.examples.summer_challenge.standin import CLIENT_ID, CLIENT_SECRET, StravaStandIn
from koban.examples.summer_challenge.store import Athlete, Store


@pytest.fixture
def strava() -> Iterator[StravaStandIn]:
    """A Strava stand-in with 3 athletes (the first one's access token already expired)."""
    with StravaStandIn(athletes=3, activities=(12, 30), expired=1) as server:
        yield server


def summer_settings(database_url: str, strava: StravaStandIn, **changes: object) -> Settings:
    return Settings(
        database_url=database_url,
        strava_url=strava.url,
        client_id=CLIENT_ID,
        client_secret=CLIENT_SECRET,
        per_page=10,
    ).with_changes(**changes)


def seed(store: Store, strava: StravaStandIn) -> None:
    """Connect every stand-in athlete to the app, with the tokens Strava gave them."""
    store.clear()
    for a in strava.athletes:
        store.upsert_athlete(Athlete(a.id, a.name, a.access_token, a.refresh_token, a.expires_at))


@pytest.fixture
def frozen_clock() -> koban.FrozenClock:
    """A clock frozen 7.5 minutes into the current quarter hour (UTC).

    Tokens the stand-in issues expire hours from the real now, so they stay valid for it.
    """
    now = int(time.time())
    return koban.FrozenClock(datetime.fromtimestamp(now // 900 * 900 + 450, UTC))


@pytest.fixture
def summer_app(
    db_url: str, strava: StravaStandIn, frozen_clock: koban.FrozenClock
) -> Iterator[koban.Koban]:
    """The Summer Challenge app on each engine in turn, athletes seeded, time frozen."""
    app = create_app(summer_settings(db_url, strava), clock=frozen_clock)
    seed(setup(app), strava)
    yield app
    app.engine.close_sync()


@pytest.fixture
def koban_app(summer_app: koban.Koban) -> koban.Koban:
    """The app koban's pytest plugin (koban_testing) works on."""
    return summer_app


@pytest.fixture
def store(summer_app: koban.Koban) -> Store:
    return Store(summer_app.engine.url)
