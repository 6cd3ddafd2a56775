"""The engine contract: every database operation koban performs, one method each.

Both engines (`postgres`, `sqlite`) implement it and pass one conformance suite
(`tests/conformance/`); nothing above this layer knows which engine is underneath.

Times are UTC. `now` parameters are None in production (the engine uses the database's clock or
the wall clock) and set by tests that inject a clock.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, ClassVar

from koban.job import Job, JobState

#: Called with (channel, payload) for every notification a node receives.
NotificationHandler = Callable[[str, dict[str, Any]], None]

#: Notification channels.
INSERT_CHANNEL = "insert"  # payload: {"queue": name}
SIGNAL_CHANNEL = "signal"  # payload: {"action": ..., "queue"/"job_id"/"node": ...}


@dataclass(frozen=True, slots=True)
class Ack:
    """The recorded outcome of one attempt, applied only if the job is still executing it."""

    job_id: int
    attempt: int
    state: JobState
    #: For retryable/scheduled: seconds from now until the job may run again.
    delay: float | None = None
    #: An entry appended to the job's errors (failed attempts, cancel and discard reasons).
    error: dict[str, Any] | None = None
    #: True for a snooze: the attempt is given back.
    snooze: bool = False
    #: Merged into the job's meta (for example recorded output or a snooze count).
    meta: dict[str, Any] | None = None


@dataclass(slots=True)
class JobFilter:
    """Which jobs a query or a bulk action applies to. Empty fields match everything."""

    ids: Sequence[int] | None = None
    states: Sequence[JobState | str] | None = None
    queues: Sequence[str] | None = None
    workers: Sequence[str] | None = None
    tags: Sequence[str] | None = None
    #: Substring searched in the JSON text of args.
    args_text: str | None = None
    inserted_before: datetime | None = None
    inserted_after: datetime | None = None
    #: Keyset pagination: only jobs with id below this one (lists are newest first).
    before_id: int | None = None
    limit: int | None = None

    def __post_init__(self) -> None:
        # Job ids are 64-bit: an id beyond that range names no job, so it is left out rather
        # than sent to a database that fails on it (PostgreSQL: bigint out of range).
        if self.ids is not None:
            self.ids = [
                i for i in self.ids if not (isinstance(i, int) and not _ID_MIN <= i <= _ID_MAX)
            ]
        if isinstance(self.before_id, int) and self.before_id > _ID_MAX:
            self.before_id = None  # every id is below it
        elif isinstance(self.before_id, int) and self.before_id < _ID_MIN:
            self.before_id = _ID_MIN  # none is


_ID_MIN, _ID_MAX = -(2**63), 2**63 - 1


@dataclass(slots=True)
class QueueState:
    """A queue's runtime settings, shared by every node through the database."""

    name: str
    paused: bool = False
    limit: int | None = None
    counts: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Throughput:
    """Jobs that completed and attempts that failed during one minute."""

    minute: datetime
    completed: int
    failed: int


@dataclass(slots=True)
class NodeInfo:
    """A node as registered in `koban_nodes`.

    `queues` is what the node reports at each heartbeat: {queue: {"limit", "paused",
    "running"}}. `meta` holds `incarnation` (one id per process start), `cluster_started_at`
    (ISO time the cluster this node joined was started) and `control` (per-node queue settings
    made with `pause_queue(..., node=...)` and the like).
    """

    name: str
    started_at: datetime | None = None
    heartbeat_at: datetime | None = None
    queues: dict[str, Any] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    #: True on the node that holds the leadership lease (filled in by `list_nodes`).
    leader: bool = False


@dataclass(slots=True)
class CronRecord:
    """The stored state of one cron entry."""

    name: str
    #: The entry's schedule ("expression zone"); a changed one starts the entry afresh.
    signature: str
    #: The newest tick inserted, or None if none was yet.
    last_tick: datetime | None
    #: When the entry was first seen or its schedule last changed, else its last insert.
    updated_at: datetime


#: Given an entry's locked record, the jobs to insert and the new last tick (None: unchanged).
CronPlan = Callable[[CronRecord], tuple[Sequence[Job], datetime | None]]


@dataclass(slots=True)
class MigrationStatus:
    current: int | None
    latest: int

    @property
    def up_to_date(self) -> bool:
        return self.current == self.latest


class Engine(ABC):
    """The storage contract. Construct with a URL; `open` before async use, `close` after."""

    #: Short name shown to users: "postgres" or "sqlite".
    kind: ClassVar[str]

    url: str

    # ----- schema ---------------------------------------------------------------------------
    @abstractmethod
    def migrate(self) -> list[int]:
        """Bring the schema to the latest version; return the versions applied (none: no-op)."""

    @abstractmethod
    def migration_status(self) -> MigrationStatus:
        """The schema version in the database and the latest this koban knows."""

    @classmethod
    @abstractmethod
    def migration_sql(cls) -> str:
        """Every migration as plain SQL, for projects that run their own migrations."""

    # ----- lifecycle ------------------------------------------------------------------------
    @abstractmethod
    async def open(self) -> None:
        """Connect for async use and check the schema is current (raises otherwise)."""

    @abstractmethod
    async def close(self) -> None:
        """Release async connections. Safe to call twice."""

    @abstractmethod
    def close_sync(self) -> None:
        """Release the connections used by sync calls. Safe to call twice."""

    # ----- client: sync and async twins -----------------------------------------------------
    @abstractmethod
    def insert_sync(
        self,
        jobs: Sequence[Job],
        conn: Any = None,
        now: datetime | None = None,
        *,
        prepare: Callable[[Job], None] | None = None,
    ) -> list[Job]:
        """Insert validated jobs in one round trip and return them as stored, in input order.

        With `conn` (the caller's own connection), insert inside the caller's transaction.
        A unique conflict returns the existing job with `conflict=True`.

        With `prepare`, the jobs are not validated yet: call it on each job before reading
        the job, and let what it raises abort the whole insert, leaving nothing inserted. An
        engine may call it while it sends the batch (`prepare_all` does it up front).
        """

    @abstractmethod
    async def insert(
        self,
        jobs: Sequence[Job],
        conn: Any = None,
        now: datetime | None = None,
        *,
        prepare: Callable[[Job], None] | None = None,
    ) -> list[Job]:
        """Async twin of `insert_sync`."""

    @abstractmethod
    def get_job_sync(self, job_id: int) -> Job | None: ...

    @abstractmethod
    async def get_job(self, job_id: int) -> Job | None: ...

    @abstractmethod
    def list_jobs_sync(self, flt: JobFilter) -> list[Job]:
        """Jobs matching `flt`, newest (highest id) first."""

    @abstractmethod
    async def list_jobs(self, flt: JobFilter) -> list[Job]: ...

    @abstractmethod
    def cancel_jobs_sync(self, flt: JobFilter, now: datetime | None = None) -> list[Job]:
        """Cancel unfinished jobs matching `flt`; executing ones are marked and signalled."""

    @abstractmethod
    async def cancel_jobs(self, flt: JobFilter, now: datetime | None = None) -> list[Job]: ...

    @abstractmethod
    def retry_jobs_sync(self, flt: JobFilter, now: datetime | None = None) -> list[Job]:
        """Make non-executing jobs available now, granting one more attempt if exhausted."""

    @abstractmethod
    async def retry_jobs(self, flt: JobFilter, now: datetime | None = None) -> list[Job]: ...

    @abstractmethod
    def delete_jobs_sync(self, flt: JobFilter) -> list[int]:
        """Delete non-executing jobs matching `flt`; return their ids."""

    @abstractmethod
    async def delete_jobs(self, flt: JobFilter) -> list[int]: ...

    @abstractmethod
    async def count_by_queue_and_state(self) -> dict[str, dict[str, int]]:
        """{queue: {state: count}} for every job in the table."""

    # ----- operations (dashboard, metrics, CLI) ---------------------------------------------
    @abstractmethod
    async def estimate_jobs(self, flt: JobFilter) -> tuple[int, bool]:
        """How many jobs match `flt`, as (count, exact), cheaply on a table of any size.

        Small results are counted; when more than a few thousand rows match, an engine may
        return its planner's estimate instead, with `exact` False. `flt.limit` and
        `flt.before_id` are ignored.
        """

    @abstractmethod
    async def throughput(self, minutes: int = 60, now: datetime | None = None) -> list[Throughput]:
        """Completed jobs and failed attempts per minute over the last `minutes` minutes.

        One entry per minute, oldest first, the current (partial) minute last, zeros included.
        A failed attempt is an entry in a job's errors other than a cancellation.
        """

    # ----- runtime --------------------------------------------------------------------------
    @abstractmethod
    async def fetch(
        self, queue: str, limit: int, node: str, producer: str, now: datetime | None = None
    ) -> list[Job]:
        """Claim up to `limit` available jobs of `queue` for one attempt.

        Order: priority, scheduled_at, id. Never hands one job to two callers, even across
        processes; never claims a job whose attempts are used up.
        """

    async def claim(
        self, queue: str, limit: int, node: str, producer: str, now: datetime | None = None
    ) -> Sequence[Any]:
        """Claim as `fetch` does, but return the claimed rows as the engine received them.

        `claimed_jobs` builds them into Jobs. A producer sends its next claim between the
        two steps, so the database works on it while the node builds and starts this batch.
        The default claims through `fetch`, its rows already Jobs.
        """
        return await self.fetch(queue, limit, node, producer, now)

    def claimed_jobs(self, rows: Sequence[Any]) -> list[Job]:
        """The Jobs of rows `claim` returned, in `fetch`'s order."""
        return list(rows)

    @abstractmethod
    async def ack(self, acks: Sequence[Ack], now: datetime | None = None) -> int:
        """Record outcomes in one statement; return how many jobs were still executing them."""

    @abstractmethod
    async def stage(self, limit: int, now: datetime | None = None) -> list[str]:
        """Make due scheduled and retryable jobs available; return the queues that gained jobs."""

    # ----- notifications --------------------------------------------------------------------
    @abstractmethod
    async def notify(self, channel: str, payload: dict[str, Any]) -> None:
        """Deliver `payload` to every node listening on `channel`."""

    @abstractmethod
    def notify_sync(self, channel: str, payload: dict[str, Any]) -> None:
        """Sync twin of `notify`."""

    @abstractmethod
    async def listen(
        self,
        handler: NotificationHandler,
        on_state: Callable[[bool], Awaitable[None] | None] | None = None,
    ) -> None:
        """Deliver notifications to `handler` until cancelled, reconnecting on failure.

        `on_state(True/False)` is called when delivery starts working or stops working, so
        producers can fall back to polling while it is down.
        """

    # ----- cluster --------------------------------------------------------------------------

    @abstractmethod
    async def heartbeat(
        self,
        node: NodeInfo,
        live_within: float,
        now: datetime | None = None,
        *,
        takeover: bool = True,
    ) -> NodeInfo:
        """Register or refresh `node` (its queues, heartbeat_at) and return the stored row.

        A new incarnation (`meta["incarnation"]` differs from the stored one) restarts the row:
        started_at is now and per-node control is cleared. On first registration,
        `meta["cluster_started_at"]` is inherited from the nodes whose heartbeat is younger
        than `live_within` seconds, or is now when there is none; registrations are serialised
        so two nodes starting together agree on it. Later heartbeats keep it and `control`.

        `takeover=False` (every heartbeat after a node's first): a row that another incarnation
        registered under the name meanwhile is left as it is and returned, so the caller sees
        that it lost its name. A missing row is registered again either way.
        """

    @abstractmethod
    async def remove_node(self, name: str) -> None:
        """Delete the node's row (a clean stop)."""

    @abstractmethod
    async def forget_nodes(self, older_than: float, now: datetime | None = None) -> int:
        """Delete rows of nodes silent for more than `older_than` seconds; return how many."""

    @abstractmethod
    def list_nodes_sync(self) -> list[NodeInfo]:
        """Every registered node, by name, with `leader` set on the lease holder's row."""

    @abstractmethod
    async def list_nodes(self) -> list[NodeInfo]: ...

    @abstractmethod
    async def acquire_leadership(
        self, node: str, lease: float, now: datetime | None = None
    ) -> datetime | None:
        """Take or renew the leadership lease for `lease` seconds; return its expiry or None.

        Succeeds when no lease exists, the lease is `node`'s own, or it has expired; atomic,
        so at most one node holds an unexpired lease.
        """

    @abstractmethod
    async def resign_leadership(self, node: str) -> bool:
        """Give up the lease if `node` holds it; True if it did."""

    @abstractmethod
    async def rescue_jobs(
        self,
        rescue_after: float,
        limit: int,
        now: datetime | None = None,
        *,
        by: str | None = None,
    ) -> list[Job]:
        """Return orphaned executing jobs to `available` (or `discarded` when out of attempts).

        An executing job is orphaned when its node (`attempted_by[0]`) has no heartbeat younger
        than `rescue_after` seconds, or its node's current incarnation started after the job
        was attempted. Each rescue appends an error entry of type `koban.Rescued` and counts
        `meta["rescued"]`. At most `limit` jobs per call; returns them as updated.

        `by`: the rescuing node. When its registered heartbeat is older than `rescue_after / 2`
        as the statement runs, nothing is rescued: a node that lost the database judges others
        only once its own heartbeat has caught up, even when the statement was decided on
        before the outage and ran after it.
        """

    @abstractmethod
    async def prune_jobs(
        self, max_age: Mapping[str, float], limit: int, now: datetime | None = None
    ) -> int:
        """Delete at most `limit` jobs finished longer ago than `max_age[state]` seconds.

        Only the finished states named in `max_age` are pruned. Returns how many were deleted.
        """

    async def reindex(self) -> list[str]:
        """Rebuild the job table's indexes without blocking writes; return the ones rebuilt.

        Engines without a need (or a way) to do this return an empty list.
        """
        return []

    @abstractmethod
    async def insert_cron_jobs(
        self, name: str, signature: str, plan: CronPlan, now: datetime | None = None
    ) -> list[Job]:
        """Insert one cron entry's due jobs exactly once, whoever else tries at the same time.

        In one transaction: create the entry's record if missing (reset it if `signature`
        changed), lock it, call `plan(record)`, insert the jobs it returns and record its new
        last tick. Returns the jobs as stored (conflicts marked as for `insert`).
        """

    @abstractmethod
    def list_cron_sync(self) -> list[CronRecord]:
        """Every stored cron entry, by name."""

    @abstractmethod
    async def list_cron(self) -> list[CronRecord]: ...

    @abstractmethod
    def control_queue_sync(
        self,
        queue: str,
        changes: Mapping[str, Any],
        node: str | None = None,
        now: datetime | None = None,
    ) -> bool:
        """Persist runtime settings of `queue`: `changes` holds "paused" (bool) and/or "limit".

        Without `node`, for the whole cluster (in `koban_queues`; "limit": None means each
        node's configured slots) and any per-node setting of the same keys is cleared. With
        `node`, for that node only (in its row's `meta["control"]`; None removes the setting);
        returns False if no such node is registered.
        """

    @abstractmethod
    async def control_queue(
        self,
        queue: str,
        changes: Mapping[str, Any],
        node: str | None = None,
        now: datetime | None = None,
    ) -> bool: ...

    @abstractmethod
    def queue_settings_sync(self) -> dict[str, QueueState]:
        """The cluster-wide settings of every queue that has any (counts left empty)."""

    @abstractmethod
    async def queue_settings(self) -> dict[str, QueueState]: ...

    @abstractmethod
    def count_by_queue_and_state_sync(self) -> dict[str, dict[str, int]]:
        """Sync twin of `count_by_queue_and_state`."""

    #: Seconds between polls when notifications cannot be relied on.
    poll_interval: float = 1.0


def prepare_all(jobs: Sequence[Job], prepare: Callable[[Job], None] | None) -> None:
    """Prepare every job up front (see `Engine.insert_sync`)."""
    if prepare is not None:
        for job in jobs:
            prepare(job)


def create_engine(url: str | None) -> Engine:
    """The engine for a database URL: `postgresql://...` or `sqlite:///path` (None: SQLite)."""
    from koban.errors import ConfigurationError

    if url is None:
        url = "sqlite:///koban.db"
    if not isinstance(url, str) or "://" not in url:
        raise ConfigurationError(
            f"database URL {redact(str(url))!r} is not a URL; use postgresql://user@host/db "
            "or sqlite:///path/to/file.db"
        )
    scheme = url.split("://", 1)[0].lower()
    if scheme in ("postgresql", "postgres", "postgresql+psycopg"):
        from koban.engines.postgres import PostgresEngine

        return PostgresEngine(url)
    if scheme == "sqlite":
        from koban.engines.sqlite import SQLiteEngine

        return SQLiteEngine(url)
    raise ConfigurationError(
        f"database URL scheme {scheme!r} is not supported; use postgresql:// or sqlite:///"
    )


def redact(url: str) -> str:
    """The URL with any password replaced, safe for messages and logs."""
    if "://" not in url or "@" not in url:
        return url
    scheme, rest = url.split("://", 1)
    creds, host = rest.rsplit("@", 1)
    if ":" in creds:
        creds = creds.split(":", 1)[0] + ":***"
    return f"{scheme}://{creds}@{host}"
