"""Property tests of koban's pure logic: backoff, job validation and unique keys (no I/O)."""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from koban import Job, JobValidationError, Unique
from koban.backoff import exponential
from koban.job import validate
from koban.unique import unique_key

#: Applied per test, so other test modules keep their own hypothesis settings.
PROPERTY = settings(deadline=None, max_examples=100)
#: Examples built from generated JSON trees are costlier: fewer of them.
PROPERTY_JSON = settings(deadline=None, max_examples=40)

CAP = 86400.0 * 7


# ----- backoff ---------------------------------------------------------------------------------
def median(attempt: int) -> float:
    """The middle of the jitter band: the delay without jitter."""
    return exponential(attempt, jitter=0)


@PROPERTY
@given(st.integers(min_value=1, max_value=200))
def test_backoff_stays_within_its_jitter_band_and_cap(attempt: int) -> None:
    delay = exponential(attempt)
    middle = median(attempt)
    assert middle == min(15.0 + 2.0 ** min(attempt, 40), CAP)
    assert 0.9 * middle - 1e-9 <= delay <= 1.1 * middle + 1e-9
    assert 0 < delay <= CAP  # "at most cap", jitter included


@PROPERTY
@given(st.integers(min_value=1, max_value=200), st.integers(min_value=1, max_value=200))
def test_backoff_median_never_decreases(a: int, b: int) -> None:
    low, high = sorted((a, b))
    assert median(low) <= median(high)


@PROPERTY
@given(
    st.integers(min_value=1, max_value=60),
    st.floats(min_value=0, max_value=1000),
    st.floats(min_value=0, max_value=0.5),
    st.floats(min_value=1, max_value=1e7),
)
def test_backoff_with_custom_parameters(
    attempt: int, base: float, jitter: float, cap: float
) -> None:
    delay = exponential(attempt, base=base, jitter=jitter, cap=cap)
    assert math.isfinite(delay)
    assert 0 <= delay <= cap
    middle = min(base + 2.0 ** min(attempt, 40), cap)
    assert (1 - jitter) * middle - 1e-6 <= delay


def test_backoff_spreads_retries() -> None:
    """Jitter: a thundering herd of jobs failing together does not retry together."""
    delays = {exponential(5) for _ in range(50)}
    assert len(delays) > 40


# ----- job validation ----------------------------------------------------------------------------
TEXT = st.text(
    alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=20
)
JSON_LEAF = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | TEXT
)
JSON_VALUE = st.recursive(
    JSON_LEAF,
    lambda children: st.lists(children, max_size=5) | st.dictionaries(TEXT, children, max_size=5),
    max_leaves=12,
)
JSON_OBJECT = st.dictionaries(TEXT, JSON_VALUE, max_size=8)
NOT_JSON = st.sampled_from(
    [object(), {1, 2}, b"bytes", datetime(2030, 1, 1), float("nan"), float("inf"), 1 + 2j]
)


def job(**fields: Any) -> Job:
    fields.setdefault("worker", "app.jobs.sync_athlete")
    return Job(**fields)


@PROPERTY_JSON
@given(JSON_OBJECT, JSON_OBJECT)
def test_json_objects_round_trip_through_validation(
    args: dict[str, Any], meta: dict[str, Any]
) -> None:
    args_json, meta_json = validate(job(args=args, meta=meta))
    assert json.loads(args_json) == args
    assert json.loads(meta_json) == meta


@PROPERTY_JSON
@given(JSON_OBJECT, JSON_OBJECT)
def test_validation_keeps_the_json_it_checked_for_the_insert(
    args: dict[str, Any], meta: dict[str, Any]
) -> None:
    checked = job(args=args, meta=meta)
    texts = validate(checked)
    assert checked.encoded == texts
    compact = {"separators": (",", ":"), "ensure_ascii": False}
    assert texts == (json.dumps(args, **compact), json.dumps(meta, **compact))


@PROPERTY_JSON
@given(JSON_OBJECT, NOT_JSON, st.lists(TEXT, min_size=1, max_size=3))
def test_a_value_json_cannot_hold_is_refused_wherever_it_is(
    args: dict[str, Any], bad: Any, path: list[str]
) -> None:
    nested: Any = bad
    for key in reversed(path):
        nested = {key: [nested]}
    args = {**args, "payload": nested}
    with pytest.raises(JobValidationError, match="sync_athlete"):
        validate(job(args=args))
    with pytest.raises(JobValidationError, match="meta"):
        validate(job(meta=args))


@PROPERTY_JSON
@given(JSON_VALUE.filter(lambda v: not isinstance(v, dict)))
def test_args_must_be_an_object(args: Any) -> None:
    with pytest.raises(JobValidationError, match="must be a JSON object"):
        validate(job(args=args))


@PROPERTY
@given(st.integers())
def test_priority_must_be_0_to_9(priority: int) -> None:
    if 0 <= priority <= 9:
        validate(job(priority=priority))
    else:
        with pytest.raises(JobValidationError, match="priority"):
            validate(job(priority=priority))


@PROPERTY
@given(st.integers(max_value=2**31 - 1))
def test_max_attempts_must_be_at_least_1(max_attempts: int) -> None:
    if max_attempts >= 1:
        validate(job(max_attempts=max_attempts))
    else:
        with pytest.raises(JobValidationError, match="max_attempts"):
            validate(job(max_attempts=max_attempts))


@PROPERTY
@given(st.integers(min_value=10, max_value=5000), st.integers(min_value=0, max_value=6000))
def test_args_size_limit(limit: int, size: int) -> None:
    args = {"d": "x" * size}
    encoded = len(json.dumps(args, separators=(",", ":")))
    if encoded <= limit:
        validate(job(args=args), max_args_bytes=limit)
    else:
        with pytest.raises(JobValidationError, match=f"limit of {limit} bytes"):
            validate(job(args=args), max_args_bytes=limit)


# ----- unique keys -------------------------------------------------------------------------------
NOW = datetime(2030, 6, 1, 12, 0, tzinfo=UTC)
INSTANTS = st.datetimes(
    min_value=datetime(2000, 1, 1), max_value=datetime(2100, 1, 1), timezones=st.just(UTC)
)


def ujob(args: dict[str, Any], **fields: Any) -> Job:
    return job(args=args, **fields)


@PROPERTY_JSON
@given(JSON_OBJECT, INSTANTS)
def test_same_fields_give_the_same_key(args: dict[str, Any], now: datetime) -> None:
    unique = Unique(period=3600)
    # A copy with keys in another order is the same job.
    shuffled = dict(reversed(list(args.items())))
    assert unique_key(ujob(args), unique, now) == unique_key(ujob(shuffled), unique, now)


@PROPERTY_JSON
@given(JSON_OBJECT, JSON_OBJECT)
def test_different_args_give_different_keys(a: dict[str, Any], b: dict[str, Any]) -> None:
    assume(json.dumps(a, sort_keys=True) != json.dumps(b, sort_keys=True))
    unique = Unique(period=None)
    assert unique_key(ujob(a), unique, NOW) != unique_key(ujob(b), unique, NOW)


@PROPERTY_JSON
@given(JSON_OBJECT)
def test_worker_and_queue_are_part_of_the_key(args: dict[str, Any]) -> None:
    unique = Unique(period=None)
    base = unique_key(ujob(args), unique, NOW)
    assert unique_key(ujob(args, worker="app.jobs.other"), unique, NOW) != base
    assert unique_key(ujob(args, queue="mailers"), unique, NOW) != base
    # ...unless the chosen fields leave them out.
    args_only = Unique(period=None, fields=("args",))
    assert unique_key(ujob(args, queue="mailers"), args_only, NOW) == unique_key(
        ujob(args), args_only, NOW
    )


@PROPERTY_JSON
@given(
    st.dictionaries(st.sampled_from(["athlete_id", "kind"]), JSON_LEAF, min_size=2),
    st.dictionaries(st.sampled_from(["page", "trace"]), JSON_VALUE),
    st.dictionaries(st.sampled_from(["page", "trace"]), JSON_VALUE),
    JSON_LEAF,
)
def test_keys_compare_only_the_chosen_args(
    chosen: dict[str, Any], extra_a: dict[str, Any], extra_b: dict[str, Any], other: Any
) -> None:
    unique = Unique(period=None, keys=("athlete_id", "kind"))
    a = unique_key(ujob({**chosen, **extra_a}), unique, NOW)
    b = unique_key(ujob({**chosen, **extra_b}), unique, NOW)
    assert a == b  # differences outside the keys do not matter
    assume(json.dumps(other) != json.dumps(chosen["athlete_id"]))
    changed = unique_key(ujob({**chosen, **extra_a, "athlete_id": other}), unique, NOW)
    assert changed != a


@PROPERTY
@given(INSTANTS, st.integers(min_value=0, max_value=10**7), st.sampled_from([1, 60, 3600, 86400]))
def test_period_buckets_are_clock_aligned(start: datetime, offset: int, period: int) -> None:
    unique = Unique(period=period)
    later = start + timedelta(seconds=offset)
    same_bucket = start.timestamp() // period == later.timestamp() // period
    key_a = unique_key(ujob({"x": 1}), unique, start)
    key_b = unique_key(ujob({"x": 1}), unique, later)
    assert (key_a == key_b) == same_bucket


def test_period_none_never_expires() -> None:
    unique = Unique(period=None)
    far = NOW + timedelta(days=3650)
    assert unique_key(ujob({"x": 1}), unique, NOW) == unique_key(ujob({"x": 1}), unique, far)
