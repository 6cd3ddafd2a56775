"""Fixtures for the conformance suite: apps on the engine under test, closed after each test."""

from __future__ import annotations

import pytest

import koban
from helpers import T0, AppFactory
from koban.plugins.stager import Stager


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
