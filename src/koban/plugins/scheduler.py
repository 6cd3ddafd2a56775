"""Scheduler: inserts the jobs of cron entries, each tick exactly once cluster-wide (leader only).

For each entry whose next tick has come, one transaction locks the entry's row in `koban_cron`,
reads its last inserted tick, inserts the jobs of the ticks due since then (by the entry's
catch-up policy) and records the newest tick. A second scheduler, say an old leader that has
not yet noticed it lost its lease, blocks on the same row lock and then finds nothing left to
insert. Each job also carries a unique key made of the entry's name and its tick, held in every
state, so the database refuses a second insert of the same tick whatever happens to the row.

A tick older than `grace` seconds when it is inserted was missed (every node was down, or no
node was leader); the entry's `catch_up` decides whether it still runs. `grace` is larger than
a leadership hand-over, so ticks falling in one are never counted as missed.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from koban.cron import Cron
from koban.engines.base import CronRecord
from koban.errors import ConfigurationError, KobanError
from koban.job import Job, validate
from koban.plugins.base import Plugin
from koban.unique import ALL_STATES, Unique
from koban.worker import RegisteredWorker, build_job

if TYPE_CHECKING:
    from koban.runtime.node import Node

log = logging.getLogger("koban.scheduler")

#: Cron jobs are unique by their entry and tick, in every state, for as long as they exist.
CRON_UNIQUE = Unique(period=None, states=ALL_STATES)
DEFAULT_GRACE = 60.0


def cron_job(entry: Cron, worker: RegisteredWorker, tick: datetime) -> Job:
    """The job `entry` inserts for `tick`: the worker's defaults under the entry's overrides."""
    job = build_job(
        worker.name,
        worker.options,
        dict(entry.args),
        queue=entry.queue,
        priority=entry.priority,
        max_attempts=entry.max_attempts,
        tags=entry.tags,
        meta={**entry.meta, "cron": entry.name, "cron_tick": tick.isoformat()},
        unique=False,
    )
    job.unique = CRON_UNIQUE
    job.unique_key = entry.unique_key(tick)
    return job


def check_job(entry: Cron, worker: RegisteredWorker, max_args_bytes: int | None) -> None:
    """Build a sample job for `entry` and raise, naming the entry, if it could not be inserted."""
    try:
        validate(
            cron_job(entry, worker, datetime(2000, 1, 1).astimezone()),
            max_args_bytes=max_args_bytes,
        )
    except KobanError as exc:
        raise ConfigurationError(f"cron entry {entry.name!r}: {exc}") from None


class Scheduler(Plugin):
    """Inserts due cron jobs. The app gives it its entries, resolved against its workers."""

    name = "scheduler"
    leader_only = True

    def __init__(self, *, grace: float = DEFAULT_GRACE, interval: float = 1.0) -> None:
        if isinstance(grace, bool) or not isinstance(grace, int | float) or grace < 0:
            raise ConfigurationError(f"Scheduler grace must be a number of seconds, got {grace!r}")
        self.grace = timedelta(seconds=grace)
        self.interval = float(interval)
        self.entries: list[tuple[Cron, RegisteredWorker]] = []
        # Per entry, the first time worth asking the database again: no tick of the entry
        # falls before it. Only a cache; the database decides what is due.
        self._next: dict[str, datetime] = {}
        self._rebooted: set[str] = set()

    def __repr__(self) -> str:
        return f"<Scheduler {len(self.entries)} entries>"

    def use(self, entries: Sequence[tuple[Cron, RegisteredWorker]]) -> None:
        self.entries = list(entries)
        self._next.clear()
        self._rebooted.clear()

    async def start(self, node: Node) -> None:
        self._next.clear()
        self._rebooted.clear()

    async def tick(self, node: Node) -> list[Job]:
        """Insert every due tick of every entry; return the jobs inserted."""
        now = node.clock.now()
        inserted: list[Job] = []
        for entry, worker in self.entries:
            if not node.is_leader:
                break
            if entry.is_reboot:
                if entry.name in self._rebooted or node.cluster_started_at is None:
                    continue
            elif entry.name in self._next and now < self._next[entry.name]:
                continue
            jobs = await node.engine.insert_cron_jobs(
                entry.name,
                entry.signature,
                self._planner(entry, worker, now, node),
                now=node.db_now(),
            )
            if entry.is_reboot:
                self._rebooted.add(entry.name)
            else:
                following = entry.next_after(now)
                if following is not None:
                    self._next[entry.name] = following
            fresh = [j for j in jobs if not j.conflict]
            if fresh:
                inserted += fresh
                node.telemetry.emit("plugin:scheduler", entry=entry.name, jobs=fresh)
        return inserted

    def _planner(self, entry: Cron, worker: RegisteredWorker, now: datetime, node: Node) -> Any:
        def plan(record: CronRecord) -> tuple[list[Job], datetime | None]:
            ticks, newest = entry.due(
                last_tick=record.last_tick,
                since=record.updated_at,
                now=now,
                grace=self.grace,
                cluster_started_at=node.cluster_started_at,
            )
            missed = [t for t in ticks if t < now - self.grace]
            if missed and not entry.is_reboot:
                log.info(
                    "cron entry %r: inserting %d missed tick(s) (catch_up=%s), oldest %s",
                    entry.name, len(missed), entry.catch_up, missed[0].isoformat(),
                )  # fmt: skip
            return [cron_job(entry, worker, tick) for tick in ticks], newest

        return plan
