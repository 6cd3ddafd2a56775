"""Pruner: deletes finished jobs once they are old enough (leader only).

Completed, cancelled and discarded jobs older than `max_age` (60 days by default, measured from
when they finished) are deleted, oldest first, in batches of at most `batch` rows, each its own
short statement, so pruning never holds many locks or a long transaction. Each state can have
its own age, or None to keep it forever.

>>> Pruner(max_age=timedelta(days=7), by_state={"discarded": timedelta(days=90)})
>>> Pruner(max_age=None)   # never prune
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from datetime import timedelta
from typing import TYPE_CHECKING

from koban.errors import ConfigurationError
from koban.job import FINISHED_STATES
from koban.plugins.base import Plugin

if TYPE_CHECKING:
    from koban.runtime.node import Node

log = logging.getLogger("koban.pruner")

DEFAULT_MAX_AGE = timedelta(days=60)
Age = float | timedelta | None


def _age(value: Age, what: str) -> float | None:
    if value is None:
        return None
    seconds = value.total_seconds() if isinstance(value, timedelta) else value
    if isinstance(seconds, bool) or not isinstance(seconds, int | float) or seconds < 0:
        raise ConfigurationError(
            f"{what} must be a number of seconds, a timedelta, or None to keep jobs forever; "
            f"got {value!r}"
        )
    return float(seconds)


class Pruner(Plugin):
    """Deletes finished jobs older than their state's maximum age."""

    name = "pruner"
    leader_only = True

    def __init__(
        self,
        *,
        max_age: Age = DEFAULT_MAX_AGE,
        by_state: Mapping[str, Age] | None = None,
        interval: float = 60.0,
        batch: int = 5000,
        max_batches: int = 20,
    ) -> None:
        default = _age(max_age, "Pruner max_age")
        ages: dict[str, float | None] = {str(s): default for s in sorted(FINISHED_STATES)}
        for state, age in (by_state or {}).items():
            if state not in ages:
                raise ConfigurationError(
                    f"Pruner by_state: {state!r} is not a finished state; use one of "
                    f"{', '.join(ages)}"
                )
            ages[state] = _age(age, f"Pruner by_state[{state!r}]")
        #: {state: seconds} for the states that are pruned.
        self.max_age: dict[str, float] = {s: a for s, a in ages.items() if a is not None}
        if isinstance(interval, bool) or not isinstance(interval, int | float) or interval <= 0:
            raise ConfigurationError(
                f"Pruner interval must be a positive number of seconds, got {interval!r}"
            )
        self.interval = float(interval)
        for value, what in ((batch, "batch"), (max_batches, "max_batches")):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigurationError(
                    f"Pruner {what} must be a whole number of at least 1, got {value!r}"
                )
        self.batch = batch
        self.max_batches = max_batches

    def __repr__(self) -> str:
        return f"<Pruner {self.max_age}>"

    async def tick(self, node: Node) -> int:
        """Delete up to `max_batches` batches of old finished jobs; return how many."""
        if not self.max_age:
            return 0
        total = 0
        for _ in range(self.max_batches):
            deleted = await node.engine.prune_jobs(self.max_age, self.batch, now=node.db_now())
            total += deleted
            if deleted < self.batch or not node.is_leader:
                break
        if total:
            log.info("pruned %d finished job(s)", total)
            node.telemetry.emit("plugin:pruner", deleted=total)
        return total

    def next_delay(self, result: int) -> float:
        return 0.0 if result >= self.batch * self.max_batches else self.interval
