"""Hypothesis strategies for input a careless or hostile caller might pass to koban."""

from __future__ import annotations

import datetime as dt
import decimal
import math
from typing import Any

from hypothesis import strategies as st

#: Every code point, including NUL and lone surrogates, which databases refuse.
any_char = st.characters(codec=None, categories=None)
any_text = st.text(alphabet=any_char, max_size=40)
#: Text that is plausibly fine: printable, no NUL, no surrogates.
plain_text = st.text(
    alphabet=st.characters(codec="utf-8", exclude_characters="\x00"), min_size=1, max_size=30
)

_junk_objects = st.sampled_from(
    [
        object(),
        b"bytes",
        bytearray(b"x"),
        {1, 2},
        frozenset({"a"}),
        dt.datetime(2024, 1, 1),
        dt.date(2024, 1, 1),
        decimal.Decimal("1.5"),
        complex(1, 2),
        math.nan,
        math.inf,
        -math.inf,
        print,
        ...,
        type,
    ]
)

json_leaf = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    any_text,
)

#: JSON-ish values with non-JSON pieces mixed in: odd keys, junk leaves, tuples.
messy_value = st.recursive(
    st.one_of(json_leaf, _junk_objects),
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.tuples(children, children),
        st.dictionaries(
            st.one_of(any_text, st.integers(), st.none(), st.booleans(), st.tuples(st.integers())),
            children,
            max_size=4,
        ),
    ),
    max_leaves=12,
)

#: Clean JSON objects: string keys, JSON leaves (text may still hold NUL or surrogates).
json_object = st.dictionaries(
    any_text,
    st.recursive(
        json_leaf,
        lambda children: st.one_of(
            st.lists(children, max_size=4), st.dictionaries(any_text, children, max_size=4)
        ),
        max_leaves=12,
    ),
    max_size=5,
)

#: Anything as an args or meta value: dicts most often, then everything else.
any_args = st.one_of(
    json_object,
    st.dictionaries(any_text, messy_value, max_size=4),
    messy_value,
    st.lists(json_leaf, max_size=3),
)

numbers_and_junk = st.one_of(
    st.integers(min_value=-(2**65), max_value=2**65),
    st.integers(min_value=-3, max_value=12),
    st.floats(),
    st.booleans(),
    st.none(),
    any_text,
    st.decimals(allow_nan=True),
    _junk_objects,
)

any_queue = st.one_of(
    st.text(alphabet=any_char, max_size=200),
    st.sampled_from(["", " ", "\t", "default", "q" * 128, "q" * 129, "a\x00b"]),
    st.integers(),
    st.none(),
    st.lists(plain_text, max_size=2),
    _junk_objects,
)

any_tags = st.one_of(
    st.lists(st.one_of(any_text, st.integers(), st.none()), max_size=4),
    st.lists(plain_text, max_size=4),
    st.tuples(plain_text),
    st.sets(plain_text, max_size=3),
    plain_text,
    st.integers(),
    st.none(),
    st.dictionaries(plain_text, plain_text, max_size=2),
    _junk_objects,
)

_offsets = st.builds(
    dt.timezone,
    st.timedeltas(min_value=dt.timedelta(hours=-23, minutes=-59), max_value=dt.timedelta(hours=23)),
)

any_scheduled_at = st.one_of(
    st.datetimes(timezones=st.one_of(st.none(), _offsets, st.timezones())),
    st.datetimes(
        min_value=dt.datetime(1, 1, 1), max_value=dt.datetime(1, 1, 3), timezones=_offsets
    ),
    st.datetimes(
        min_value=dt.datetime(9999, 12, 30), max_value=dt.datetime(9999, 12, 31), timezones=_offsets
    ),
    st.dates(),
    any_text,
    st.integers(),
    st.floats(),
    st.none(),
)

any_schedule_in = st.one_of(
    st.floats(),
    st.floats(min_value=-1e13, max_value=1e13),
    st.integers(min_value=-(10**13), max_value=10**13),
    st.integers(min_value=-100, max_value=100),
    st.booleans(),
    st.none(),
    any_text,
    st.timedeltas(),
    _junk_objects,
)


def normalise(value: Any) -> Any:
    """`value` as it should read back from a JSON column: tuples as lists, numbers as floats.

    PostgreSQL's jsonb keeps numbers as decimals, so 1e16 written by Python reads back as the
    int 10000000000000000: the value is kept, the Python type may not be.
    """
    if isinstance(value, dict):
        return {k: normalise(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [normalise(v) for v in value]
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, int | float):
        return float(value)
    return value
