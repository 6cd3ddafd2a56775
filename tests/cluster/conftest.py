"""Fixtures for the cluster tests: apps on the engine under test, nodes that are not started
(their plugins are driven tick by tick under a frozen clock), closed after each test."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest

import koban
from helpers import T0
from koban.plugins.base import Plugin
from koban.runtime.node import Node


@pytest.fixture
def clock() -> koban.FrozenClock:
    return koban.FrozenClock(T0)


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
