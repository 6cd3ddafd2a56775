"""Time, injectable so tests of backoff, scheduling and rescue do not sleep."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta


class Clock:
    """The wall clock. Every time koban stores is UTC."""

    def now(self) -> datetime:
        return datetime.now(UTC)

    @property
    def frozen(self) -> bool:
        """True when time only moves when a test moves it."""
        return False


class FrozenClock(Clock):
    """A clock that stands still until `advance` or `set` moves it.

    >>> clock = FrozenClock(datetime(2026, 7, 1, tzinfo=UTC))
    >>> clock.advance(seconds=90)
    """

    def __init__(self, at: datetime | None = None) -> None:
        self._now = (at or datetime.now(UTC)).astimezone(UTC)

    def now(self) -> datetime:
        return self._now

    @property
    def frozen(self) -> bool:
        return True

    def advance(self, seconds: float = 0, **delta: float) -> datetime:
        self._now += timedelta(seconds=seconds, **delta)
        return self._now

    def set(self, at: datetime) -> None:
        self._now = at.astimezone(UTC)
