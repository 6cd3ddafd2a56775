"""Fixtures for the cluster tests: apps on the engine under test, nodes that are not started
(their plugins are driven tick by tick under a frozen clock), closed after each test."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence
from datetime import UTC, datetime
from typing import Any

import pytest

import koban
from helpers import make_app
from koban.plugins.base import Plugin
from koban.runtime.node import Node

#: A fixed, microsecond-free instant for tests that freeze time.
T0 = datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC)

AppFactory = Callable[..., koban.Koban]


@pytest.fixture
def clock() -> koban.FrozenClock:
    return koban.FrozenClock(T0)


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


def idle_node(app: koban.Koban, name: str, plugins: Sequence[Plugin] = (), **kw: Any) -> Node:
    """A node of `app` that is never started: tests call its plugins' hooks themselves."""
    return Node(
        engine=app.engine,
        workers=app.workers,
        queues=kw.pop("queues", app.queues),
        telemetry=app.telemetry,
        clock=app.clock,
        plugins=list(plugins),
        name=name,
        shutdown_grace=1.0,
    )
