"""The command line, fuzzed: every argument list gets either a result or one clear error line
and a documented exit code, never a traceback, and a refused command changes nothing.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from typing import Any

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import koban
from helpers import sql_rows
from koban.cli import main

from .strategies import json_object

EXAMPLES = int(os.environ.get("KOBAN_FUZZ_EXAMPLES", "60"))
FUZZ = settings(
    max_examples=EXAMPLES * 2,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
EXIT_CODES = {0, 1, 2, 3}
WORKER = "fuzz.cli_app.greet"

# Real argv never holds NUL and is decoded from bytes, so no lone surrogates either.
word = st.text(
    alphabet=st.characters(codec="utf-8", exclude_characters="\x00"), min_size=0, max_size=20
)
big = st.integers(min_value=-(2**70), max_value=2**70)
small = st.integers(min_value=-3, max_value=12)
number = st.one_of(big, small).map(str)
ids = st.one_of(number, word)
ages = st.one_of(
    st.sampled_from(["15m", "2h", "7d", "0s", "1.5h", "1e9d", "-5m", "2026-07-01", "99999999999d"]),
    st.sampled_from(["2026-07-01T12:00", "2026-07-01T12:00+05:00", "0001-01-01", "9999-12-31"]),
    st.builds(lambda n, u: f"{n}{u}", st.integers(0, 10**15), st.sampled_from("smhd")),
    word,
)
args_json = st.one_of(
    json_object.map(lambda v: json.dumps(v)),
    st.sampled_from(['{"a": "\\u0000"}', "[1]", "null", "7", '"x"', "{", "{}", '{"a": NaN}']),
    word,
)
floats = st.one_of(st.sampled_from(["nan", "inf", "-inf", "1e300", "-1e300", "0.5"]), number, word)
states = st.sampled_from(["available", "completed", "nonsense", ""])
queue = st.one_of(st.sampled_from(["default", "mail", "nope", ""]), word)
worker = st.one_of(st.just(WORKER), st.just("shop.nothing"), word)


def options(**choices: st.SearchStrategy[str]) -> st.SearchStrategy[list[str]]:
    """Any subset of `--name value` pairs, in any order."""
    pairs = [st.tuples(st.just(f"--{k.replace('_', '-')}"), v) for k, v in choices.items()]
    return st.lists(st.one_of(*pairs), max_size=4).map(lambda ps: [x for p in ps for x in p])


target = st.one_of(
    st.just(["--app", "fuzz.cli_app:app"]),
    st.just([]),  # the database alone (set through KOBAN_DATABASE_URL)
    st.sampled_from([["--app", "fuzz.cli_app"], ["--app", "nosuch.module:app"], ["-d", "nope"]]),
)
filters = options(
    state=states, queue=queue, worker=worker, tag=word, args_text=word,
    inserted_after=ages, inserted_before=ages,
)  # fmt: skip
commands = st.one_of(
    st.tuples(
        st.just(["jobs", "insert"]),
        worker.map(lambda w: [w]),
        options(
            args=args_json,
            queue=queue,
            priority=number,
            schedule_in=floats,
            max_attempts=number,
            tag=word,
        ),
    ),
    st.tuples(
        st.just(["jobs", "list"]), st.just([]), options(limit=number, before_id=ids) | filters
    ),
    st.tuples(st.just(["jobs", "show"]), ids.map(lambda i: [i]), st.just([])),
    st.tuples(
        st.sampled_from([["jobs", "retry"], ["jobs", "cancel"], ["jobs", "delete"]]),
        st.lists(ids, max_size=3),
        st.tuples(filters, st.sampled_from([["--yes"], []])).map(lambda f: [*f[0], *f[1]]),
    ),
    st.tuples(
        st.sampled_from([["queues", "pause"], ["queues", "resume"]]),
        queue.map(lambda q: [q]),
        st.just([]),
    ),
    st.tuples(st.just(["queues", "scale"]), st.tuples(queue, number).map(list), st.just([])),
    st.tuples(
        st.sampled_from([["queues"], ["nodes"], ["stats"], ["cron", "list"], ["migrate"]]),
        st.just([]),
        st.just([]),
    ),
).map(lambda parts: [*parts[0], *parts[1], *parts[2]])


def table(url: str) -> list[tuple[Any, ...]]:
    """What a refused command must leave as it was."""
    return [
        *sql_rows(
            url, "SELECT id, state, queue, attempt, scheduled_at FROM koban_jobs ORDER BY id"
        ),
        *sql_rows(url, 'SELECT name, paused, "limit" FROM koban_queues ORDER BY name'),
    ]


@pytest.fixture
def seeded(db_url: str) -> Iterator[str]:
    """A database with a few jobs in several states, so filters have something to match."""
    app = koban.Koban(db_url)
    try:
        stored = app.enqueue_many(
            [koban.Job(worker=WORKER, queue="mail", args={"n": i}) for i in range(4)]
        )
        app.cancel_job(stored[0].id or 0)
    finally:
        app.engine.close_sync()
    yield db_url


@FUZZ
@given(argv=commands, where=target, as_json=st.booleans())
def test_any_command_line(seeded: str, argv: list[str], where: list[str], as_json: bool) -> None:
    if "-d" not in where:  # --app alone would use the database the module saw on first import
        where = [*where, "-d", seeded]
    full = [*argv, *where, *(["--json"] if as_json else [])]
    before = table(seeded)
    result = CliRunner().invoke(main, full, env={"KOBAN_DATABASE_URL": seeded})
    shown = f"koban {' '.join(full)!r} -> exit {result.exit_code}:\n{result.output}"
    assert result.exception is None or isinstance(result.exception, SystemExit), (
        f"{shown}\n{type(result.exception).__name__}: {result.exception}"
    )
    assert "Traceback" not in result.output, shown
    assert result.exit_code in EXIT_CODES, shown
    if result.exit_code != 0:
        errors = [
            line
            for line in result.stderr.splitlines()
            if line.startswith(("koban: error:", "Error:")) or line.endswith("Aborted!")
        ]
        assert len(errors) == 1, f"expected one error line: {shown}"
    if result.exit_code in (2, 3):
        # Bad usage or an unusable database: refused before doing anything. (Exit 1 reports
        # jobs a command could not act on, after acting on the others.)
        assert table(seeded) == before, f"a refused command changed the database: {shown}"


@pytest.mark.parametrize(
    "argv",
    [
        ["jobs", "retry", str(2**70), "--yes"],
        ["jobs", "cancel", str(2**63), "--yes"],
        ["jobs", "delete", str(-(2**63) - 1), "--yes"],
        ["jobs", "list", "--before-id", str(2**70)],
        ["jobs", "show", str(2**70)],
        ["queues", "scale", "default", str(2**31)],
        ["queues", "scale", "default", str(2**70)],
        # An age beyond timedelta's range once raised OverflowError (a traceback).
        ["jobs", "list", "--inserted-after", "99999999999d"],
    ],
    ids=lambda argv: " ".join(argv),
)
def test_numbers_beyond_the_columns(seeded: str, argv: list[str]) -> None:
    """Ids and limits past 64- and 32-bit columns: an answer or one clear line, no traceback."""
    before = table(seeded)
    full = [*argv, "--app", "fuzz.cli_app:app", "-d", seeded]
    result = CliRunner().invoke(main, full, env={"KOBAN_DATABASE_URL": seeded})
    assert result.exception is None or isinstance(result.exception, SystemExit), (
        f"{type(result.exception).__name__}: {result.exception}\n{result.output}"
    )
    if result.exit_code != 0:
        errors = [ln for ln in result.stderr.splitlines() if ln.startswith(("koban:", "Error:"))]
        assert len(errors) == 1, result.output
        assert table(seeded) == before
