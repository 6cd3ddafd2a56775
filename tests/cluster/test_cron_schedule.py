"""Cron entries as pure functions: parsing, next and previous ticks, daylight saving, catch-up."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from koban import ConfigurationError, Cron

WARSAW = ZoneInfo("Europe/Warsaw")
GRACE = timedelta(seconds=60)

EXPRESSIONS = [
    "* * * * *",
    "*/15 * * * *",
    "30 2 * * *",
    "0 0 * * *",
    "15 1-3 * * *",
    "0 9-17/2 * * mon-fri",
    "0 0 1 * *",
    "0 12 * jan,jul sun",
    "45 23 31 * *",
    "0 0 29 2 *",
    "@hourly",
    "@daily",
    "@weekly",
    "@monthly",
    "@yearly",
]
ZONES = ["UTC", "Europe/Warsaw", "America/New_York", "Australia/Lord_Howe", "Asia/Kolkata"]

instants = st.datetimes(
    min_value=datetime(2001, 1, 1), max_value=datetime(2037, 12, 31), timezones=st.just(UTC)
)


def entry(expression: str, timezone: str = "UTC", **options: object) -> Cron:
    return Cron(expression, "app.jobs.sync_all", timezone=timezone, **options)  # type: ignore[arg-type]


# ----- validation ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("expression", "message"),
    [
        ("61 * * * *", "invalid cron expression '61 * * * *'"),
        ("* * *", "has 3 field(s)"),
        ("* * * * * *", "has 6 field(s)"),
        ("0 0 31 2 *", "invalid cron expression"),
        ("0 0 * * funday", "invalid cron expression"),
        ("@fortnightly", "unknown alias '@fortnightly'"),
        ("", "non-empty string"),
    ],
)
def test_invalid_expression_names_the_entry(expression: str, message: str) -> None:
    with pytest.raises(ConfigurationError) as err:
        Cron(expression, "app.jobs.sync_all", name="nightly sync")
    assert message in str(err.value)
    if expression:
        assert "'nightly sync'" in str(err.value)


def test_invalid_timezone_names_the_entry() -> None:
    with pytest.raises(ConfigurationError, match=r"cron entry 'nightly'.*'Europe/Warsow'"):
        Cron("0 0 * * *", "app.jobs.sync_all", timezone="Europe/Warsow", name="nightly")


def test_invalid_options_are_refused() -> None:
    with pytest.raises(ConfigurationError, match=r"catch_up must be one of"):
        entry("0 0 * * *", catch_up="sometimes")
    with pytest.raises(ConfigurationError, match=r"lookback"):
        entry("0 0 * * *", lookback=0)
    with pytest.raises(ConfigurationError, match=r"catch_up_limit"):
        entry("0 0 * * *", catch_up_limit=0)


def test_names_and_aliases() -> None:
    assert entry("0 0 * * *").name == "app.jobs.sync_all 0 0 * * *"
    assert entry("  0   0 * * * ").expression == "0 0 * * *"
    at = datetime(2026, 3, 4, 10, 20, tzinfo=UTC)  # a Wednesday
    assert entry("@hourly").next_after(at) == datetime(2026, 3, 4, 11, 0, tzinfo=UTC)
    assert entry("@daily").next_after(at) == entry("@midnight").next_after(at)
    assert entry("@daily").next_after(at) == datetime(2026, 3, 5, tzinfo=UTC)
    assert entry("@weekly").next_after(at) == datetime(2026, 3, 8, tzinfo=UTC)  # Sunday
    assert entry("@monthly").next_after(at) == datetime(2026, 4, 1, tzinfo=UTC)
    assert entry("@yearly").next_after(at) == entry("@annually").next_after(at)
    assert entry("@yearly").next_after(at) == datetime(2027, 1, 1, tzinfo=UTC)
    names = entry("0 6 * JAN-MAR mon-fri")
    assert names.next_after(at) == datetime(2026, 3, 5, 6, 0, tzinfo=UTC)
    assert names.next_after(datetime(2026, 3, 31, 7, tzinfo=UTC)) == datetime(
        2027, 1, 1, 6, tzinfo=UTC
    )
    reboot = entry("@reboot")
    assert reboot.is_reboot and reboot.next_after(at) is None


# ----- properties of ticks -----------------------------------------------------------------
@settings(max_examples=300, deadline=None)
@given(expression=st.sampled_from(EXPRESSIONS), zone=st.sampled_from(ZONES), at=instants)
def test_next_and_latest_agree(expression: str, zone: str, at: datetime) -> None:
    """next_after is strictly later, nothing lies in between, and latest_at_or_before finds it."""
    cron = entry(expression, zone)
    following = cron.next_after(at)
    assert following is not None and following > at
    assert following.tzinfo is not None and following.utcoffset() == timedelta(0)
    assert cron.latest_at_or_before(following) == following
    # No tick in (at, following): the latest one before `following` is at or before `at`.
    before = cron.latest_at_or_before(following - timedelta(microseconds=1))
    assert before is not None and before <= at
    assert cron.next_after(before) == following


@settings(max_examples=60, deadline=None)
@given(expression=st.sampled_from(EXPRESSIONS), zone=st.sampled_from(ZONES), at=instants)
def test_ticks_between_are_increasing_and_bounded(expression: str, zone: str, at: datetime) -> None:
    cron = entry(expression, zone)
    until = at + timedelta(hours=6)
    ticks = cron.ticks_between(at, until, limit=1000)
    assert ticks == sorted(set(ticks))
    assert all(at < t <= until for t in ticks)
    walked = []
    tick = cron.next_after(at)
    while tick is not None and tick <= until:
        walked.append(tick)
        tick = cron.next_after(tick)
    assert ticks == walked
    assert cron.ticks_between(at, until, limit=2) == walked[-2:]


@settings(max_examples=40, deadline=None)
@given(zone=st.sampled_from(ZONES), year=st.integers(2001, 2036))
def test_a_fixed_time_runs_once_every_local_day(zone: str, year: int) -> None:
    """02:30 every day: once per local calendar day, across both daylight-saving changes."""
    cron = entry("30 2 * * *", zone)
    start = datetime(year, 1, 1, tzinfo=ZoneInfo(zone)).astimezone(UTC)
    end = datetime(year + 1, 1, 1, tzinfo=ZoneInfo(zone)).astimezone(UTC)
    days = [t.astimezone(ZoneInfo(zone)).date() for t in cron.ticks_between(start, end, 400)]
    expected = (date(year + 1, 1, 1) - date(year, 1, 1)).days
    assert len(days) == expected
    assert len(set(days)) == expected


def test_spring_forward_runs_the_skipped_time_once_after_the_jump() -> None:
    cron = entry("30 2 * * *", "Europe/Warsaw")
    # 2024-03-31: at 02:00 local the clock jumps to 03:00; 02:30 does not exist that day.
    ticks = cron.ticks_between(
        datetime(2024, 3, 30, 12, tzinfo=UTC), datetime(2024, 4, 1, 12, tzinfo=UTC), 10
    )
    local = [t.astimezone(WARSAW) for t in ticks]
    assert [(t.day, t.hour, t.minute) for t in local] == [(31, 3, 0), (1, 2, 30)]


def test_fall_back_runs_a_fixed_time_once_and_wildcard_hours_twice() -> None:
    # 2024-10-27: at 03:00 local the clock goes back to 02:00; 02:30 happens twice.
    day_start = datetime(2024, 10, 26, 22, tzinfo=UTC)  # local midnight
    day_end = datetime(2024, 10, 27, 23, tzinfo=UTC)
    fixed = entry("30 2 * * *", "Europe/Warsaw").ticks_between(day_start, day_end, 10)
    assert [t.isoformat() for t in fixed] == ["2024-10-27T00:30:00+00:00"]  # 02:30 CEST
    fixed_list = entry("0,30 2 * * *", "Europe/Warsaw").ticks_between(day_start, day_end, 10)
    assert len(fixed_list) == 2  # 02:00 and 02:30, once each despite the repeated hour
    # A wildcard minute is not a fixed time (as in Debian cron): it runs on every real minute
    # that matches, so in both 02:xx hours.
    stepped = entry("*/30 2 * * *", "Europe/Warsaw").ticks_between(day_start, day_end, 10)
    assert len(stepped) == 4
    every = entry("*/30 * * * *", "Europe/Warsaw").ticks_between(day_start, day_end, 100)
    assert len(every) == 50  # a 25-hour day
    # Asked from inside the repeated hour, the next run of 02:30 is tomorrow's, not a rerun.
    inside = datetime(2024, 10, 27, 1, 10, tzinfo=UTC)  # 02:10 CET, the second 02:10
    following = entry("30 2 * * *", "Europe/Warsaw").next_after(inside)
    assert following == datetime(2024, 10, 28, 1, 30, tzinfo=UTC)


# ----- what is due ---------------------------------------------------------------------------
T = datetime(2026, 5, 4, 0, 0, tzinfo=UTC)


def due(cron: Cron, last: datetime | None, now: datetime, since: datetime | None = None):  # type: ignore[no-untyped-def]
    return cron.due(last_tick=last, since=since or T, now=now, grace=GRACE)


def test_on_time_ticks_follow_the_last_one() -> None:
    cron = entry("0 * * * *")
    assert due(cron, T, T + timedelta(minutes=59)) == ([], None)
    one = T + timedelta(hours=1)
    assert due(cron, T, one + timedelta(seconds=1)) == ([one], one)
    assert due(cron, one, one + timedelta(seconds=5)) == ([], None)


def test_a_new_entry_starts_counting_when_first_seen() -> None:
    cron = entry("0 * * * *")
    seen = T + timedelta(minutes=30)
    assert due(cron, None, T + timedelta(minutes=40), since=seen) == ([], None)
    nxt = T + timedelta(hours=1)
    assert due(cron, None, nxt + timedelta(seconds=2), since=seen) == ([nxt], nxt)


@pytest.mark.parametrize(
    ("policy", "expected"),
    [("latest", [5]), ("all", [1, 2, 3, 4, 5]), ("none", [])],
)
def test_catch_up_after_the_cluster_was_down(policy: str, expected: list[int]) -> None:
    cron = entry("0 * * * *", catch_up=policy)
    now = T + timedelta(hours=5, minutes=2)  # down from just after T until now
    ticks, newest = due(cron, T, now)
    assert ticks == [T + timedelta(hours=h) for h in expected]
    assert newest == T + timedelta(hours=5)  # skipped ticks are settled too


def test_none_still_runs_a_tick_that_is_only_just_due() -> None:
    cron = entry("0 * * * *", catch_up="none")
    now = T + timedelta(hours=5, seconds=20)
    assert due(cron, T, now) == ([T + timedelta(hours=5)], T + timedelta(hours=5))


def test_catch_up_all_is_capped_to_the_most_recent_ticks() -> None:
    cron = entry("0 * * * *", catch_up="all", catch_up_limit=3)
    ticks, newest = due(cron, T, T + timedelta(hours=10, minutes=1))
    assert ticks == [T + timedelta(hours=h) for h in (8, 9, 10)]
    assert newest == T + timedelta(hours=10)


def test_lookback_limits_how_far_back_missed_ticks_count() -> None:
    cron = entry("0 0 * * *", catch_up="all", lookback=timedelta(days=2))
    ticks, _ = due(cron, T, T + timedelta(days=10, hours=1))
    assert ticks == [T + timedelta(days=9), T + timedelta(days=10)]


def test_reboot_runs_once_per_cluster_start() -> None:
    cron = entry("@reboot")
    started = T + timedelta(hours=1)
    assert cron.due(last_tick=None, since=T, now=T, grace=GRACE) == ([], None)
    assert cron.due(
        last_tick=None, since=T, now=started, grace=GRACE, cluster_started_at=started
    ) == ([started], started)
    assert cron.due(
        last_tick=started, since=T, now=started, grace=GRACE, cluster_started_at=started
    ) == ([], None)
    later = started + timedelta(days=1)
    assert cron.due(
        last_tick=started, since=T, now=later, grace=GRACE, cluster_started_at=later
    ) == ([later], later)


def test_unique_key_is_per_entry_and_tick() -> None:
    a, b = entry("0 * * * *", name="a"), entry("0 * * * *", name="b")
    assert a.unique_key(T) == a.unique_key(T.astimezone(WARSAW))
    assert a.unique_key(T) != a.unique_key(T + timedelta(hours=1))
    assert a.unique_key(T) != b.unique_key(T)
