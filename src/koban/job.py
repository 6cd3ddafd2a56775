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
import math
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
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
#: Limits of the columns and of JSON that every engine stores and reads back intact.
MAX_QUEUE_LENGTH = 128
MAX_WORKER_LENGTH = 255
MAX_ATTEMPTS_LIMIT = 2**31 - 1
MAX_JSON_DEPTH = 256
#: schedule_in beyond this many seconds either way (100 years) is refused: times far enough out
#: are stored by the database but cannot be read back into a Python datetime.
MAX_SCHEDULE_IN = 100 * 366 * 86400
#: isinstance() targets on the enqueue path: tuples, built once (a `list | tuple` union is
#: built anew on every call).
_SEQUENCES = (list, tuple)
_CONTAINERS = (dict, list, tuple)


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
    # Args and meta as the JSON text `validate` checked, so the insert that follows sends it
    # as is instead of encoding again. Not an init field: `dataclasses.replace` starts afresh.
    encoded: tuple[str, str] | None = field(default=None, init=False, repr=False, compare=False)
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


def _text_problem(text: str) -> str | None:
    """Why a string cannot be stored as text, or None."""
    if "\x00" in text:
        return "a NUL character, which databases refuse; encode binary data (base64) first"
    if not text.isascii() and _SURROGATE.search(text):  # isascii is a flag: no scan
        return "a lone surrogate code point, which is not valid UTF-8"
    return None


_SURROGATE = re.compile("[\ud800-\udfff]")


def _check_tree(value: dict[str, Any], what: str, worker: str) -> None:
    """Refuse what JSON would silently change or a database would refuse: non-string keys
    (json turns 7 into "7"), NUL and lone surrogates in strings, and very deep nesting."""
    stack: list[tuple[Any, str, int]] = [(value, what, 1)]
    while stack:
        node, path, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise JobValidationError(
                f"{what} for worker {worker!r} is nested more than {MAX_JSON_DEPTH} levels "
                f"deep (at {path[:80]}...); flatten it"
            )
        if isinstance(node, dict):
            for key, child in node.items():
                if not isinstance(key, str):
                    raise JobValidationError(
                        f"{what} for worker {worker!r} has the key {key!r} "
                        f"({type(key).__name__}) in {path[:80]}; JSON object keys must be "
                        "strings (JSON would silently turn it into one)"
                    )
                stack.append((child, f"{path}[{key[:20]!r}]", depth + 1))
                stack.append((key, f"the key {key[:20]!r} in {path}", depth))
        elif isinstance(node, _SEQUENCES):
            stack.extend((child, f"{path}[{i}]", depth + 1) for i, child in enumerate(node))
        elif isinstance(node, str):
            problem = _text_problem(node)
            if problem:
                raise JobValidationError(
                    f"{what} for worker {worker!r} contains {problem} (in {path[:80]})"
                )


#: One encoder for every job: building one per call cost more than encoding small args.
_ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def _compact_json() -> Callable[[Any], str]:
    """`_ENCODER.encode`, without the C encoder it builds afresh on every call.

    That build was a third of encoding a job's args (6% of a bulk enqueue's time). The C
    encoder is json's own internal (`json.encoder.c_make_encoder`, the same arguments as
    `JSONEncoder.iterencode` gives it); where it is missing or takes other arguments, this is
    `_ENCODER.encode` itself. No circular-reference markers: `_plain` has already refused
    nesting deeper than MAX_JSON_DEPTH, and a cycle is infinitely deep.
    """
    from json import encoder

    c_make_encoder: Any = getattr(encoder, "c_make_encoder", None)
    try:
        make = c_make_encoder(
            None, _ENCODER.default, encoder.encode_basestring, None, ":", ",", False, False, False
        )
    except TypeError:  # None on Pythons without the C module, other arguments elsewhere
        return _ENCODER.encode
    return lambda value: "".join(make(value, 0))


_encode = _compact_json()


def _plain(node: dict[str, Any] | list[Any] | tuple[Any, ...], depth: int = 1) -> bool:
    """True if every object key below `node` is a string and nesting stays within the limit.

    The cheap walk every job takes; strings are checked on the encoded text instead, and
    `_check_tree` walks again, slowly, only to name a problem.
    """
    # A non-empty container at the limit holds values one level beyond it.
    if depth > MAX_JSON_DEPTH or (depth == MAX_JSON_DEPTH and node):
        return False
    if isinstance(node, dict):
        for key, child in node.items():
            if not isinstance(key, str):
                return False
            if isinstance(child, _CONTAINERS) and not _plain(child, depth + 1):
                return False
    else:
        for child in node:
            if isinstance(child, _CONTAINERS) and not _plain(child, depth + 1):
                return False
    return True


def encode_json(value: Any, *, what: str, worker: str, limit: int | None = None) -> str:
    """Encode `value` as compact JSON or raise a JobValidationError naming the worker."""
    if not isinstance(value, dict):
        raise JobValidationError(
            f"{what} for worker {worker!r} must be a JSON object (a dict), "
            f"got {type(value).__name__}"
        )
    text, size = _encode_checked(value, what, worker) if value else ("{}", 2)
    if limit is not None and size > limit:
        raise JobValidationError(
            f"{what} for worker {worker!r} is {size} bytes encoded, above the limit of "
            f"{limit} bytes (Koban(max_args_bytes=...)); store large payloads elsewhere and "
            "pass a reference."
        )
    return text


def _encode_checked(value: dict[str, Any], what: str, worker: str) -> tuple[str, int]:
    """`value` as JSON and its size in bytes, or a JobValidationError naming the problem."""
    if not _plain(value):
        _check_tree(value, what, worker)  # raises, naming the key or the depth
    try:
        text = _encode(value)
    except (TypeError, ValueError) as exc:
        _check_tree(value, what, worker)  # a NUL or lone surrogate is named first
        raise JobValidationError(
            f"{what} for worker {worker!r} is not JSON-serialisable: {exc}. "
            "Pass plain dicts, lists, strings, numbers, booleans and None "
            "(convert dates to ISO strings, ids to ints)."
        ) from None
    try:
        size = len(text.encode())
    except UnicodeEncodeError:  # JSON keeps a lone surrogate as it is (ensure_ascii=False)
        _check_tree(value, what, worker)
        raise JobValidationError(f"{what} for worker {worker!r} is not valid UTF-8") from None
    if "\\u0000" in text:  # a NUL, or a string holding a backslash and "u0000"
        _check_tree(value, what, worker)
    return text, size


def validate(job: Job, *, max_args_bytes: int | None = DEFAULT_MAX_ARGS_BYTES) -> tuple[str, str]:
    """Check a job before insert (setting `scheduled_at` to UTC); return args and meta as JSON.

    The JSON is also kept in `job.encoded` for the insert.
    """
    name = job.worker
    if not isinstance(name, str) or not 1 <= len(name) <= MAX_WORKER_LENGTH or _text_problem(name):
        raise JobValidationError(
            f"worker name {name!r} must be a string of 1 to {MAX_WORKER_LENGTH} characters"
        )
    if not isinstance(job.queue, str) or not job.queue.strip():
        raise JobValidationError(
            f"queue for worker {name!r} must be a non-empty string, got {job.queue!r}"
        )
    if len(job.queue) > MAX_QUEUE_LENGTH or _text_problem(job.queue):
        raise JobValidationError(
            f"queue for worker {name!r} must be at most {MAX_QUEUE_LENGTH} characters with no "
            f"NUL or lone surrogate, got {job.queue[:40]!r}"
        )
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
    if not 1 <= job.max_attempts <= MAX_ATTEMPTS_LIMIT:
        raise JobValidationError(
            f"max_attempts for worker {name!r} must be from 1 to {MAX_ATTEMPTS_LIMIT}, "
            f"got {job.max_attempts}"
        )
    if not isinstance(job.tags, list) or (
        job.tags and not all(isinstance(t, str) for t in job.tags)
    ):
        raise JobValidationError(
            f"tags for worker {name!r} must be a list of strings, got {job.tags!r:.80}"
        )
    for tag in job.tags:
        problem = _text_problem(tag)
        if problem:
            raise JobValidationError(
                f"tags for worker {name!r}: the tag {tag!r} contains {problem}"
            )
    if job.schedule_in is not None:
        if isinstance(job.schedule_in, bool) or not isinstance(job.schedule_in, int | float):
            raise JobValidationError(
                f"schedule_in for worker {name!r} must be a number of seconds, "
                f"got {job.schedule_in!r:.80}"
            )
        if not math.isfinite(job.schedule_in) or abs(job.schedule_in) > MAX_SCHEDULE_IN:
            raise JobValidationError(
                f"schedule_in for worker {name!r} must be a finite number of seconds within "
                f"100 years, got {job.schedule_in!r}; use scheduled_at for a fixed time"
            )
    if job.scheduled_at is not None:
        at = job.scheduled_at
        if not isinstance(at, datetime):
            raise JobValidationError(
                f"scheduled_at for worker {name!r} must be a timezone-aware datetime, "
                f"got {type(at).__name__} {at!r:.60}"
            )
        if at.utcoffset() is None:
            raise JobValidationError(
                f"scheduled_at for worker {name!r} must be timezone-aware (koban stores UTC), "
                f"got {at!r}"
            )
        try:
            # Stored as UTC: databases accept smaller UTC offsets than Python (PostgreSQL at
            # most 15:59), so an offset like -23:59 must not reach them.
            job.scheduled_at = at.astimezone(UTC)
        except OverflowError:
            raise JobValidationError(
                f"scheduled_at for worker {name!r} is {at.isoformat()}, which falls outside "
                "the years 1 to 9999 in UTC"
            ) from None
    args = encode_json(job.args, what="args", worker=name, limit=max_args_bytes)
    meta = encode_json(job.meta, what="meta", worker=name)
    job.encoded = (args, meta)
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
