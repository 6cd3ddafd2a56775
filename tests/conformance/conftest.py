"""Fixtures for the conformance suite: apps on the engine under test, closed after each test."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from typing import Any

import pytest

import koban
from helpers import make_app
from koban.plugins.stager import Stager

#: A fixed, microsecond-free instant for tests that freeze time.
T0 = datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC)

AppFactory = Callable[..., koban.Koban]


@pytest.fixture
async def apps(db_url: str) -> AsyncIterator[AppFactory]:
    """Build apps on the engine under test (`apps(**Koban options)`); all are closed after."""
    created: list[koban.Koban] = []

    def factory(**options: Any) -> koban.Koban:
        app = make_app(db_url, **options)
        created.append(app)
        return app

    yield factory
    for app in created:
        await app.close()


@pytest.fixture
def app(apps: AppFactory) -> koban.Koban:
    """An app on the engine under test with one queue, `default`, of 5 slots."""
    return apps(queues={"default": 5})


@pytest.fixture
def clock() -> koban.FrozenClock:
    return koban.FrozenClock(T0)


@pytest.fixture
def fast_stager() -> Stager:
    """A stager ticking every 50 ms, so retries with zero backoff run again promptly."""
    return Stager(interval=0.05)
