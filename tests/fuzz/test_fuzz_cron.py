"""Cron entries, fuzzed: an expression, time zone or job option koban cannot use is refused when
the entry is made or the node starts, with an error naming the entry, and nothing is written.
An entry it accepts always has a next tick and a previous one, computed promptly.
"""

from __future__ import annotations

import os
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import koban
from helpers import sql_rows

from .strategies import any_char, any_queue, json_object, numbers_and_junk, plain_text

EXAMPLES = int(os.environ.get("KOBAN_FUZZ_EXAMPLES", "60"))
FUZZ = settings(
    max_examples=EXAMPLES * 3,
    deadline=timedelta(seconds=2),  # a tick search that hangs is a bug too
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

NAMES = ["jan", "FEB", "mar", "dec", "mon", "TUE", "sun", "sat", "fri"]
atom = st.one_of(
    st.integers(min_value=-2, max_value=70).map(str),
    st.sampled_from(["*", "L", "W", "?", "#", "", "-", "/", ",", *NAMES, "5L", "1#2", "1W"]),
)
part = st.one_of(
    atom,
    st.builds(lambda a, b: f"{a}-{b}", atom, atom),
    st.builds(lambda a, b: f"{a}/{b}", atom, atom),
    st.builds(lambda a, b, c: f"{a}-{b}/{c}", atom, atom, atom),
)
field = st.lists(part, min_size=1, max_size=3).map(",".join)
expressions = st.one_of(
    st.lists(field, min_size=5, max_size=5).map(" ".join),
    st.lists(field, min_size=0, max_size=7).map(" ".join),
    st.sampled_from(
        [
            "@hourly",
            "@daily",
            "@midnight",
            "@weekly",
            "@monthly",
            "@yearly",
            "@annually",
            "@reboot",
            "@REBOOT",
            "@every 5m",
            "@",
            "@ hourly",
            "0 0 30 2 *",
            "0 0 31 4 *",
        ]
    ),
    st.text(alphabet=any_char, max_size=30),
)
zones = st.one_of(
    st.sampled_from(
        [
            "UTC",
            "Europe/Warsaw",
            "America/New_York",
            "Australia/Lord_Howe",
            "Asia/Kathmandu",
            "Etc/GMT+12",
            "utc",
            "",
            " UTC",
            "../etc/passwd",
            "/etc/localtime",
            "Europe/Nowhere",
            "Europe/Warsaw\x00",
            "EST5EDT",
            "Factory",
        ]
    ),
    st.timezone_keys(),
    st.text(alphabet=any_char, max_size=20),
    st.integers(),
    st.none(),
)
moments = st.datetimes(
    min_value=datetime(1990, 1, 1), max_value=datetime(2090, 1, 1), timezones=st.just(UTC)
)


@FUZZ
@given(expression=expressions, zone=zones, at=moments)
def test_expressions_and_time_zones(expression: Any, zone: Any, at: datetime) -> None:
    try:
        entry = koban.Cron(expression, "app.jobs.nightly", timezone=zone)
    except koban.ConfigurationError as exc:
        assert "cron entry" in str(exc), f"the error does not name the entry: {exc}"
        return
    if entry.is_reboot:
        assert entry.next_after(at) is None
        return
    following = entry.next_after(at)
    previous = entry.latest_at_or_before(at)
    assert following is not None and previous is not None
    assert previous <= at < following
    assert following.tzinfo is not None and following.utcoffset() == timedelta(0)
    # Walking forward from the previous tick reaches the next one without skipping `at`.
    assert entry.next_after(previous) is not None
    assert entry.next_after(previous) <= following  # type: ignore[operator]


def noop(job: koban.Job) -> None:
    """The worker cron entries point at."""


NOOP = f"{noop.__module__}.{noop.__qualname__}"


def table_rows(url: str) -> list[tuple[Any, ...]]:
    return [
        *sql_rows(url, "SELECT 'job', id, state FROM koban_jobs ORDER BY id"),
        *sql_rows(url, "SELECT 'cron', name, last_tick FROM koban_cron ORDER BY name"),
        *sql_rows(url, "SELECT 'node', name, NULL FROM koban_nodes ORDER BY name"),
    ]


@settings(FUZZ, max_examples=EXAMPLES, deadline=None)
@given(
    options=st.fixed_dictionaries(
        {},
        optional={
            "args": st.one_of(json_object, numbers_and_junk),
            "queue": any_queue,
            "priority": numbers_and_junk,
            "max_attempts": numbers_and_junk,
            "tags": st.one_of(
                st.lists(st.one_of(plain_text, st.integers()), max_size=3),
                plain_text,
                st.none(),
                numbers_and_junk,
            ),
            "meta": st.one_of(json_object, numbers_and_junk),
            "catch_up": st.one_of(
                st.sampled_from(["latest", "all", "none", "LATEST", ""]), numbers_and_junk
            ),
            "lookback": st.one_of(
                st.floats(min_value=-1e9, max_value=1e16), st.timedeltas(), st.text(), st.none()
            ),
            "catch_up_limit": numbers_and_junk,
            "name": st.one_of(st.text(alphabet=any_char, max_size=10), numbers_and_junk),
        },
    ),
    worker=st.sampled_from([NOOP, "app.jobs.missing", noop]),
)
async def test_job_options_are_checked_before_the_node_starts(
    db_url: str, options: dict[str, Any], worker: Any
) -> None:
    before = table_rows(db_url)
    try:
        entry = koban.Cron("* * * * *", worker, **options)
        app = koban.Koban(db_url, queues={"default": 1}, cron=[entry])
    except koban.ConfigurationError as exc:
        assert "cron entry" in str(exc)
        return
    app.worker(noop)
    try:
        await app.start()
    except koban.KobanError as exc:
        assert repr(entry.name)[:30] in str(exc) or "cron entry" in str(exc), exc
        assert table_rows(db_url) == before, f"a refused start wrote to the database: {exc}"
        return
    finally:
        await app.close()
    # Accepted: the entry's jobs are valid (the node started, so check_job passed).
    assert worker != "app.jobs.missing"


@pytest.mark.parametrize(
    ("expression", "zone", "message"),
    [
        ("0 0 * *", "UTC", "has 4 field(s)"),
        ("61 * * * *", "UTC", "invalid cron expression"),
        ("0 0 30 2 *", "UTC", "invalid cron expression"),
        ("@every 5m", "UTC", "unknown alias"),
        ("0 0 * * *", "Europe/Nowhere", "unknown time zone"),
        ("0 0 * * *", "../../etc/passwd", "unknown time zone"),
    ],
)
def test_refusals_name_the_entry_and_the_problem(expression: str, zone: str, message: str) -> None:
    with pytest.raises(koban.ConfigurationError, match="cron entry 'nightly'") as caught:
        koban.Cron(expression, NOOP, timezone=zone, name="nightly")
    assert message in str(caught.value)


def test_tags_that_are_not_a_list_are_refused_clearly() -> None:
    with pytest.raises(koban.ConfigurationError, match="cron entry"):
        koban.Cron("* * * * *", NOOP, tags=7)  # type: ignore[arg-type]


def test_a_lookback_beyond_any_date_is_refused_clearly() -> None:
    with pytest.raises(koban.ConfigurationError, match="cron entry"):
        koban.Cron("* * * * *", NOOP, lookback=1e14)
