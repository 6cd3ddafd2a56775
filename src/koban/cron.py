"""Cron entries: jobs inserted on a schedule, once per tick across the whole cluster.

>>> app = koban.Koban(url, cron=[
...     koban.Cron("0 0 * * *", SyncAllWorker, timezone="Europe/Warsaw", args={"full": True}),
...     koban.Cron("@hourly", "myapp.jobs.refresh_tokens", catch_up="none"),
... ])

Expressions use the standard 5 fields (minute hour day-of-month month day-of-week) with ranges,
steps, lists, month and weekday names, and the aliases @hourly, @daily, @midnight, @weekly,
@monthly, @yearly, @annually and @reboot. Ticks are computed in the entry's IANA time zone by
`cronsim`, which follows Debian cron across daylight-saving changes: an entry at a fixed time
that falls in the hour skipped in spring runs once, right after the jump; an entry at a fixed
time in the hour repeated in autumn runs once, the first time; entries with a wildcard minute
or hour (`*/15 * * * *`, `*/30 2 * * *`) run at every real moment that matches.

Everything here is pure: the scheduler plugin (`koban.plugins.scheduler`) does the inserting.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from cronsim import CronSim, CronSimError

from koban.errors import ConfigurationError

CatchUp = Literal["latest", "all", "none"]
CATCH_UP_POLICIES: tuple[str, ...] = ("latest", "all", "none")

REBOOT = "@reboot"
#: Aliases and the 5-field expressions they stand for.
ALIASES: dict[str, str] = {
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
    "@monthly": "0 0 1 * *",
    "@weekly": "0 0 * * 0",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@hourly": "0 * * * *",
}

#: How far back a cluster that was down looks for missed ticks, unless an entry says otherwise.
DEFAULT_LOOKBACK = timedelta(days=7)
#: The most ticks `catch_up="all"` inserts at once (the most recent ones are kept).
DEFAULT_CATCH_UP_LIMIT = 100

_US = timedelta(microseconds=1)
# A tick computed in local time can land before the instant it was asked to follow only inside
# a repeated autumn hour, a handful of steps at most; this bound only guards against a bug.
_MAX_STEPS = 64


def _seconds(value: float | timedelta, what: str) -> float:
    seconds = value.total_seconds() if isinstance(value, timedelta) else value
    if isinstance(seconds, bool) or not isinstance(seconds, int | float) or seconds <= 0:
        raise ConfigurationError(f"{what} must be a positive number of seconds or a timedelta")
    return float(seconds)


def _worker_ref_name(worker: Any) -> str:
    if isinstance(worker, str):
        return worker
    name = getattr(worker, "name", None)
    if isinstance(name, str) and name:
        return name
    module, qualname = getattr(worker, "__module__", None), getattr(worker, "__qualname__", None)
    if module and qualname:
        return f"{module}.{qualname}"
    raise ConfigurationError(
        f"cron worker {worker!r} is neither a worker nor a worker name; pass the function or "
        "Worker class registered with @app.worker, or its 'module.name'"
    )


class Cron:
    """One cron entry: `worker` runs at every tick of `expression` in `timezone`.

    - `args`, `queue`, `priority`, `max_attempts`, `tags`, `meta` override the worker's defaults
      for the jobs this entry inserts. Each job's meta also carries `cron` (the entry's name) and
      `cron_tick` (the tick, ISO 8601 UTC).
    - `catch_up` says what happens to ticks missed while every node was down: `"latest"` (one
      run for the missed period), `"all"` (every missed tick, at most `catch_up_limit`, the most
      recent ones) or `"none"`. Only ticks within `lookback` of now are considered.
    - `name` identifies the entry in the database (its last inserted tick is kept under it); by
      default the worker's name and the expression. Renaming an entry starts it afresh.
    """

    __slots__ = (
        "_spec",
        "args",
        "catch_up",
        "catch_up_limit",
        "expression",
        "lookback",
        "max_attempts",
        "meta",
        "name",
        "priority",
        "queue",
        "tags",
        "timezone",
        "worker",
        "worker_name",
        "zone",
    )  # fmt: skip

    def __init__(
        self,
        expression: str,
        worker: Any,
        *,
        timezone: str = "UTC",
        args: Mapping[str, Any] | None = None,
        queue: str | None = None,
        priority: int | None = None,
        max_attempts: int | None = None,
        tags: Sequence[str] | None = None,
        meta: Mapping[str, Any] | None = None,
        catch_up: CatchUp = "latest",
        lookback: float | timedelta = DEFAULT_LOOKBACK,
        catch_up_limit: int = DEFAULT_CATCH_UP_LIMIT,
        name: str | None = None,
    ) -> None:
        self.worker = worker
        self.worker_name = _worker_ref_name(worker)
        if not isinstance(expression, str) or not expression.strip():
            raise ConfigurationError(
                f"cron entry for worker {self.worker_name!r}: the expression must be a "
                "non-empty string such as '0 0 * * *' or '@daily'"
            )
        self.expression = " ".join(expression.split())
        self.name = name if name is not None else f"{self.worker_name} {self.expression}"
        if not isinstance(self.name, str) or not self.name.strip():
            raise ConfigurationError(
                f"cron entry {self.expression!r}: name must be a non-empty string"
            )
        where = f"cron entry {self.name!r}"
        self._spec = _parse(self.expression, where)
        if not isinstance(timezone, str):
            raise ConfigurationError(
                f"{where}: timezone must be an IANA name such as 'Europe/Warsaw'"
            )
        try:
            self.zone = ZoneInfo(timezone)
        except (ZoneInfoNotFoundError, ValueError):
            raise ConfigurationError(
                f"{where}: unknown time zone {timezone!r}; use an IANA name such as "
                "'Europe/Warsaw' or 'UTC'"
            ) from None
        self.timezone = timezone
        if catch_up not in CATCH_UP_POLICIES:
            raise ConfigurationError(
                f"{where}: catch_up must be one of {', '.join(CATCH_UP_POLICIES)}, got {catch_up!r}"
            )
        self.catch_up: CatchUp = catch_up
        try:
            self.lookback = timedelta(seconds=_seconds(lookback, f"{where}: lookback"))
        except OverflowError:
            raise ConfigurationError(
                f"{where}: lookback {lookback!r} is beyond any date; give at most a few years"
            ) from None
        if (
            isinstance(catch_up_limit, bool)
            or not isinstance(catch_up_limit, int)
            or catch_up_limit < 1
        ):
            raise ConfigurationError(
                f"{where}: catch_up_limit must be a whole number of at least 1"
            )
        self.catch_up_limit = catch_up_limit
        if args is not None and not isinstance(args, Mapping):
            raise ConfigurationError(f"{where}: args must be a dict")
        self.args = dict(args or {})
        if meta is not None and not isinstance(meta, Mapping):
            raise ConfigurationError(f"{where}: meta must be a dict")
        self.meta = dict(meta or {})
        if tags is not None and (
            isinstance(tags, str)
            or not isinstance(tags, list | tuple)
            or not all(isinstance(t, str) for t in tags)
        ):
            raise ConfigurationError(f"{where}: tags must be a list of strings")
        self.tags = list(tags) if tags is not None else None
        self.queue = queue
        self.priority = priority
        self.max_attempts = max_attempts

    def __repr__(self) -> str:
        return f"<Cron {self.name!r} {self.expression!r} {self.timezone}>"

    @property
    def is_reboot(self) -> bool:
        """True for @reboot: one run per cluster start, no clock schedule."""
        return self._spec == REBOOT

    @property
    def signature(self) -> str:
        """The schedule as stored with the entry's state; a new signature starts it afresh."""
        return f"{self.expression} {self.timezone}"

    # ----- ticks ----------------------------------------------------------------------------
    def next_after(self, at: datetime) -> datetime | None:
        """The first tick strictly after `at`, in UTC (None for @reboot)."""
        if self.is_reboot:
            return None
        at = at.astimezone(UTC)
        sim = CronSim(self._spec, at.astimezone(self.zone))
        for _ in range(_MAX_STEPS):
            tick = next(sim).astimezone(UTC)
            if tick > at:
                return tick
        raise RuntimeError(
            f"cron entry {self.name!r}: no tick after {at.isoformat()}"
        )  # pragma: no cover

    def latest_at_or_before(self, at: datetime) -> datetime | None:
        """The last tick at or before `at`, in UTC (None for @reboot)."""
        if self.is_reboot:
            return None
        at = at.astimezone(UTC)
        # cronsim walks backwards on local wall time, which is ambiguous inside a repeated
        # autumn hour: take its answer as a starting point and walk forward to the true one.
        sim = CronSim(self._spec, (at + _US).astimezone(self.zone), reverse=True)
        candidate = None
        for _ in range(_MAX_STEPS):
            tick = next(sim).astimezone(UTC)
            if tick <= at:
                candidate = tick
                break
        if candidate is None:  # pragma: no cover - see _MAX_STEPS
            raise RuntimeError(f"cron entry {self.name!r}: no tick before {at.isoformat()}")
        while (following := self.next_after(candidate)) is not None and following <= at:
            candidate = following
        return candidate

    def ticks_between(self, after: datetime, until: datetime, limit: int) -> list[datetime]:
        """Up to `limit` most recent ticks in (`after`, `until`], oldest first."""
        out: list[datetime] = []
        tick = self.latest_at_or_before(until)
        while tick is not None and tick > after and len(out) < limit:
            out.append(tick)
            tick = self.latest_at_or_before(tick - _US)
        out.reverse()
        return out

    def due(
        self,
        *,
        last_tick: datetime | None,
        since: datetime,
        now: datetime,
        grace: timedelta,
        cluster_started_at: datetime | None = None,
    ) -> tuple[list[datetime], datetime | None]:
        """Which ticks to insert now, and the new last tick to record (None: unchanged).

        `last_tick` is the newest tick already inserted; `since` is when the entry started to
        count (its creation or schedule change) when no tick was inserted yet. A tick older
        than `grace` was missed; `catch_up` decides what to do with missed ticks.
        """
        if self.is_reboot:
            if cluster_started_at is None:
                return [], None
            if last_tick is None or last_tick < cluster_started_at:
                return [cluster_started_at], cluster_started_at
            return [], None
        start = max(last_tick if last_tick is not None else since, now - self.lookback)
        newest = self.latest_at_or_before(now)
        if newest is None or newest <= start:
            return [], None
        if self.catch_up == "all":
            ticks = self.ticks_between(start, now, self.catch_up_limit)
        elif self.catch_up == "latest":
            ticks = [newest]
        else:
            ticks = [
                t for t in self.ticks_between(start, now, self.catch_up_limit) if t >= now - grace
            ]
        return ticks, newest

    def info(self, now: datetime, record: Any = None) -> CronEntryInfo:
        """This entry's report at `now`, given its stored record (a `CronRecord` or None)."""
        following = self.next_after(now)
        last = getattr(record, "last_tick", None)
        return CronEntryInfo(
            name=self.name,
            expression=self.expression,
            timezone=self.timezone,
            worker=self.worker_name,
            queue=self.queue,
            args=dict(self.args),
            catch_up=self.catch_up,
            next_run=following.astimezone(self.zone) if following else None,
            next_run_utc=following,
            last_tick=last.astimezone(UTC) if isinstance(last, datetime) else None,
        )

    def unique_key(self, tick: datetime) -> str:
        """The key that makes a second insert of the same tick impossible."""
        text = f"koban.cron\x00{self.name}\x00{tick.astimezone(UTC).isoformat()}"
        return hashlib.sha256(text.encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class CronEntryInfo:
    """A cron entry as `app.cron_entries()` and `koban cron list` report it."""

    name: str
    expression: str
    timezone: str
    worker: str
    queue: str | None
    args: dict[str, Any]
    catch_up: str
    #: The next tick in the entry's own time zone, and in UTC (None for @reboot).
    next_run: datetime | None
    next_run_utc: datetime | None
    #: The newest tick inserted so far (UTC), or None.
    last_tick: datetime | None


def _parse(expression: str, where: str) -> str:
    """The 5-field form of `expression` (or REBOOT); raise naming the entry when invalid."""
    lowered = expression.lower()
    if lowered == REBOOT:
        return REBOOT
    if lowered.startswith("@"):
        if lowered not in ALIASES:
            raise ConfigurationError(
                f"{where}: unknown alias {expression!r}; use one of "
                f"{', '.join([*ALIASES, REBOOT])} or 5 fields"
            )
        return ALIASES[lowered]
    fields = expression.split()
    if len(fields) != 5:
        raise ConfigurationError(
            f"{where}: expression {expression!r} has {len(fields)} field(s); cron needs 5: "
            "minute hour day-of-month month day-of-week, for example '30 2 * * mon-fri'"
        )
    try:
        next(CronSim(expression, datetime(2000, 1, 1, tzinfo=UTC)))
    except (CronSimError, StopIteration) as exc:
        detail = str(exc) or "it never matches"
        raise ConfigurationError(
            f"{where}: invalid cron expression {expression!r}: {detail}"
        ) from None
    return expression


def check_entries(entries: Sequence[Cron]) -> list[Cron]:
    """The entries as a list; raise if one is not a Cron or two share a name."""
    seen: dict[str, Cron] = {}
    for entry in entries:
        if not isinstance(entry, Cron):
            raise ConfigurationError(
                f"cron= takes koban.Cron entries, got {type(entry).__name__}: {entry!r}"
            )
        if entry.name in seen:
            raise ConfigurationError(
                f"two cron entries are named {entry.name!r}; give each a distinct name= "
                "(the name keys its last inserted tick in the database)"
            )
        seen[entry.name] = entry
    return list(seen.values())
