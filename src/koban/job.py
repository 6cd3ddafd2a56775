"""The job: one row in the jobs table, and the values a worker returns.

States and their transitions are defined here once; everything else refers to them::

    scheduled ──stager──▶ available ──fetch──▶ executing ──▶ completed
    retryable ──stager──▶     ▲                    ├──▶ retryable (raise, attempts left)
                              │                    ├──▶ discarded (raise on last attempt, Discard)
                              │                    ├──▶ cancelled (Cancel)
                              └──── rescue ────────┴──▶ scheduled (Snooze)
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any

from koban.errors import JobValidationError


class JobState(StrEnum):
    AVAILABLE = "available"
    SCHEDULED = "scheduled"
    EXECUTING = "executing"
    RETRYABLE = "retryable"
    COMPLETED = "completed"
    DISCARDED = "discarded"
    CANCELLED = "cancelled"


#: States a job never leaves on its own.
FINISHED_STATES = frozenset({JobState.COMPLETED, JobState.DISCARDED, JobState.CANCELLED})
#: States from which a job will still run.
PENDING_STATES = frozenset({JobState.AVAILABLE, JobState.SCHEDULED, JobState.RETRYABLE})

DEFAULT_MAX_ATTEMPTS = 20
DEFAULT_QUEUE = "default"
#: Largest encoded args accepted by enqueue, in bytes. Overridable per app.
DEFAULT_MAX_ARGS_BYTES = 1024 * 1024


@dataclass(slots=True)
class Job:
    """A unit of work and everything known about its runs.

    Workers receive a `Job`; `enqueue` returns one. A job built with `Worker.new(...)`
    has no `id` until it is inserted.
    """

    worker: str
    args: dict[str, Any] = field(default_factory=dict)
    queue: str = DEFAULT_QUEUE
    state: JobState = JobState.AVAILABLE
    priority: int = 0
    max_attempts: int = DEFAULT_MAX_ATTEMPTS
    meta: dict[str, Any] = field(default_factory=dict)
    tags: list[str] = field(default_factory=list)
    id: int | None = None
    attempt: int = 0
    errors: list[dict[str, Any]] = field(default_factory=list)
    inserted_at: datetime | None = None
    scheduled_at: datetime | None = None
    attempted_at: datetime | None = None
    completed_at: datetime | None = None
    cancelled_at: datetime | None = None
    discarded_at: datetime | None = None
    attempted_by: list[str] | None = None
    unique_key: str | None = None
    #: Set on a job returned by enqueue when a unique job already existed.
    conflict: bool = False
    # Seconds from now at which to schedule on insert (used before the row exists).
    schedule_in: float | None = field(default=None, repr=False, compare=False)
    # Unique settings, used by insert to compute `unique_key`; not stored as such.
    unique: Any = field(default=None, repr=False, compare=False)
    _cancel_event: threading.Event | None = field(default=None, repr=False, compare=False)

    @property
    def cancelled(self) -> bool:
        """True once someone asked to cancel this running job.

        Sync workers check it at safe points and return; async workers are cancelled for them.
        """
        return self._cancel_event is not None and self._cancel_event.is_set()

    def to_dict(self) -> dict[str, Any]:
        """The job as JSON-ready data (times as ISO 8601 strings)."""
        out: dict[str, Any] = {}
        for name in _PUBLIC_FIELDS:
            value = getattr(self, name)
            out[name] = value.isoformat() if isinstance(value, datetime) else value
        out["state"] = str(self.state)
        return out


_PUBLIC_FIELDS = (
    "id", "state", "queue", "worker", "args", "meta", "tags", "priority", "attempt",
    "max_attempts", "errors", "inserted_at", "scheduled_at", "attempted_at", "completed_at",
    "cancelled_at", "discarded_at", "attempted_by", "unique_key", "conflict",
)  # fmt: skip


def encode_json(value: Any, *, what: str, worker: str, limit: int | None = None) -> str:
    """Encode `value` as compact JSON or raise a JobValidationError naming the worker."""
    if not isinstance(value, dict):
        raise JobValidationError(
            f"{what} for worker {worker!r} must be a JSON object (a dict), "
            f"got {type(value).__name__}"
        )
    try:
        text = json.dumps(value, separators=(",", ":"), allow_nan=False, ensure_ascii=False)
    except (TypeError, ValueError) as exc:
        raise JobValidationError(
            f"{what} for worker {worker!r} is not JSON-serialisable: {exc}. "
            "Pass plain dicts, lists, strings, numbers, booleans and None "
            "(convert dates to ISO strings, ids to ints)."
        ) from None
    if limit is not None and len(text.encode()) > limit:
        raise JobValidationError(
            f"{what} for worker {worker!r} is {len(text.encode())} bytes encoded, above the "
            f"limit of {limit} bytes; store large payloads elsewhere and pass a reference."
        )
    if "\x00" in text:
        raise JobValidationError(
            f"{what} for worker {worker!r} contains a NUL character, which databases refuse; "
            "encode binary data (for example base64) first."
        )
    return text


def validate(job: Job, *, max_args_bytes: int | None = DEFAULT_MAX_ARGS_BYTES) -> tuple[str, str]:
    """Check a job before insert; return its args and meta encoded as JSON."""
    name = job.worker
    if not isinstance(job.queue, str) or not job.queue.strip():
        raise JobValidationError(f"queue for worker {name!r} must be a non-empty string")
    if isinstance(job.priority, bool) or not isinstance(job.priority, int):
        raise JobValidationError(
            f"priority for worker {name!r} must be an int from 0 to 9, got {job.priority!r}"
        )
    if not 0 <= job.priority <= 9:
        raise JobValidationError(
            f"priority for worker {name!r} must be from 0 (runs first) to 9, got {job.priority}"
        )
    if isinstance(job.max_attempts, bool) or not isinstance(job.max_attempts, int):
        raise JobValidationError(
            f"max_attempts for worker {name!r} must be an int of at least 1, "
            f"got {job.max_attempts!r}"
        )
    if job.max_attempts < 1:
        raise JobValidationError(
            f"max_attempts for worker {name!r} must be at least 1, got {job.max_attempts}"
        )
    if not isinstance(job.tags, list) or not all(isinstance(t, str) for t in job.tags):
        raise JobValidationError(f"tags for worker {name!r} must be a list of strings")
    if job.schedule_in is not None:
        if isinstance(job.schedule_in, bool) or not isinstance(job.schedule_in, int | float):
            raise JobValidationError(f"schedule_in for worker {name!r} must be a number of seconds")
        if job.schedule_in != job.schedule_in or job.schedule_in in (float("inf"), float("-inf")):
            raise JobValidationError(f"schedule_in for worker {name!r} must be finite")
    if job.scheduled_at is not None and job.scheduled_at.tzinfo is None:
        raise JobValidationError(
            f"scheduled_at for worker {name!r} must be timezone-aware (koban stores UTC)"
        )
    args = encode_json(job.args, what="args", worker=name, limit=max_args_bytes)
    meta = encode_json(job.meta, what="meta", worker=name)
    return args, meta


@dataclass(frozen=True, slots=True)
class Snooze:
    """Return from a worker to run the job again in `seconds`, without using up an attempt."""

    seconds: float


@dataclass(frozen=True, slots=True)
class Cancel:
    """Return from a worker to stop the job for good: it ends `cancelled`."""

    reason: str = ""


@dataclass(frozen=True, slots=True)
class Discard:
    """Return from a worker to give up on the job: it ends `discarded`."""

    reason: str = ""
