"""Unique jobs: a key computed from chosen fields, enforced by a unique index in the database.

>>> Unique(period=3600, keys=("athlete_id",))   # one job per athlete per hour
>>> Unique(period=None, states=INCOMPLETE_STATES, replace=("scheduled_at",))  # debounce

A duplicate insert returns the job already holding the key, marked `conflict=True`; with
`replace`, the chosen fields of that job are first updated from the new one (only while it has
not started: available, scheduled or retryable).

The key is a hash of the chosen fields plus, when `period` is set, the period bucket the insert
time falls in (so "unique for an hour" means one job per clock-aligned hour bucket). The index
applies only while a job is in one of `states`; a job that leaves them frees the key.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from koban.errors import ConfigurationError
from koban.job import Job, JobState

#: Bit per state in the `unique_states` column; the unique index checks `state`'s bit.
STATE_BITS: dict[JobState, int] = {
    JobState.AVAILABLE: 1,
    JobState.SCHEDULED: 2,
    JobState.EXECUTING: 4,
    JobState.RETRYABLE: 8,
    JobState.COMPLETED: 16,
    JobState.DISCARDED: 32,
    JobState.CANCELLED: 64,
}

#: Presets for `Unique.states`.
#: Every state: one job per key for as long as the job exists (until pruned).
ALL_STATES: tuple[JobState, ...] = tuple(JobState)
#: Default: every state but the finished-unsuccessfully ones (a cancelled or discarded job
#: does not block a new one).
SUCCESSFUL_STATES: tuple[JobState, ...] = tuple(
    s for s in JobState if s not in (JobState.CANCELLED, JobState.DISCARDED)
)
#: Only jobs that have not finished yet block a new one.
INCOMPLETE_STATES: tuple[JobState, ...] = (
    JobState.AVAILABLE, JobState.SCHEDULED, JobState.EXECUTING, JobState.RETRYABLE,
)  # fmt: skip

FIELDS = ("worker", "queue", "args", "meta")
#: Fields of an existing job that `replace` may update on conflict.
REPLACEABLE = ("args", "meta", "tags", "priority", "max_attempts", "queue", "scheduled_at")


@dataclass(frozen=True, slots=True)
class Unique:
    """How to decide that two jobs are the same job."""

    period: float | None = 60.0
    fields: tuple[str, ...] = ("worker", "queue", "args")
    keys: tuple[str, ...] | None = None
    states: tuple[JobState, ...] = field(default=SUCCESSFUL_STATES)
    #: Fields of the existing job to update from the new one on conflict (see REPLACEABLE).
    replace: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if isinstance(self.period, timedelta):
            object.__setattr__(self, "period", self.period.total_seconds())
        if self.period is not None and not (
            isinstance(self.period, int | float)
            and not isinstance(self.period, bool)
            and self.period > 0
        ):
            raise ConfigurationError(
                f"Unique.period must be a positive number of seconds or None, got {self.period!r}"
            )
        bad = [f for f in self.fields if f not in FIELDS]
        if bad or not self.fields:
            raise ConfigurationError(
                f"Unique.fields must be chosen from {', '.join(FIELDS)}, got {self.fields!r}"
            )
        if isinstance(self.fields, str):
            object.__setattr__(self, "fields", (self.fields,))
        try:
            states = tuple(JobState(s) for s in self.states)
        except ValueError:
            raise ConfigurationError(
                f"Unique.states must be job states ({', '.join(JobState)}), got {self.states!r}"
            ) from None
        if JobState.EXECUTING not in states or not states:
            # An executing duplicate would otherwise slip in while the first one runs.
            states = (*states, JobState.EXECUTING)
        object.__setattr__(self, "states", states)
        if self.keys is not None:
            object.__setattr__(self, "keys", tuple(self.keys))
        replace = (self.replace,) if isinstance(self.replace, str) else tuple(self.replace)
        bad = [f for f in replace if f not in REPLACEABLE]
        if bad:
            raise ConfigurationError(
                f"Unique.replace must be chosen from {', '.join(REPLACEABLE)}, got {bad!r}"
            )
        object.__setattr__(self, "replace", replace)

    @property
    def states_mask(self) -> int:
        return states_mask(self.states)


def states_mask(states: Iterable[JobState]) -> int:
    mask = 0
    for state in states:
        mask |= STATE_BITS[JobState(state)]
    return mask


def unique_key(job: Job, unique: Unique, now: datetime) -> str:
    """The key two jobs share exactly when `unique` calls them the same job."""
    parts: dict[str, Any] = {}
    for name in unique.fields:
        value = getattr(job, name)
        if name in ("args", "meta") and unique.keys is not None:
            value = {k: value.get(k) for k in unique.keys}
        parts[name] = value
    if unique.period is not None:
        parts["period"] = int(now.timestamp() // unique.period)
    text = json.dumps(parts, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()
