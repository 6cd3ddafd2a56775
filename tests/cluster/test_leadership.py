"""Leadership: one lease holder at a time, renewal, expiry, resignation, and a leader that loses
the database stepping down before anyone could take over."""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime, timedelta

import pytest

import koban
from helpers import AppFactory, await_until, sql_rows
from koban import Leadership
from koban.engines.sqlite.rows import from_us
from koban.errors import ConfigurationError

from .conftest import idle_node


def lease_row(url: str) -> tuple[str, datetime] | None:
    rows = sql_rows(url, "SELECT node, expires_at FROM koban_leader")
    if not rows:
        return None
    node, expires = rows[0]
    if isinstance(expires, int):  # SQLite stores microseconds since the epoch
        expires = from_us(expires)
    return node, expires.astimezone(UTC)


async def test_one_leader_renews_and_others_wait_for_expiry(
    apps: AppFactory, clock: koban.FrozenClock, db_url: str
) -> None:
    app = apps(clock=clock)
    await app.open()
    la, lb = Leadership(lease=10), Leadership(lease=10)
    a, b = idle_node(app, "a", [la]), idle_node(app, "b", [lb])
    await la.start(a)
    await lb.start(b)

    assert await la.tick(a) is True
    assert await lb.tick(b) is False
    assert a.is_leader and not b.is_leader
    assert lease_row(db_url) == ("a", clock.now() + timedelta(seconds=10))

    clock.advance(5)  # renewal extends the lease
    assert await la.tick(a) is True
    assert await lb.tick(b) is False
    assert lease_row(db_url) == ("a", clock.now() + timedelta(seconds=10))

    clock.advance(11)  # a stopped renewing: its lease expired
    assert not a.is_leader
    assert await lb.tick(b) is True
    assert b.is_leader
    assert await la.tick(a) is False
    assert not a.is_leader and b.is_leader


async def test_leader_steps_down_before_its_lease_can_be_taken(
    apps: AppFactory, clock: koban.FrozenClock
) -> None:
    app = apps(clock=clock)
    await app.open()
    la, lb = Leadership(lease=10, margin=2), Leadership(lease=10)
    a, b = idle_node(app, "a", [la]), idle_node(app, "b", [lb])
    await la.start(a)
    await lb.start(b)
    assert await la.tick(a)

    clock.advance(8.5)  # past a's own deadline (lease - margin), before the lease expires
    assert not a.is_leader
    assert await lb.tick(b) is False  # and nobody else leads yet: never two leaders
    clock.advance(2)
    assert await lb.tick(b) is True


async def test_a_stopping_leader_resigns_at_once(
    apps: AppFactory, clock: koban.FrozenClock, db_url: str
) -> None:
    app = apps(clock=clock)
    await app.open()
    la, lb = Leadership(lease=10), Leadership(lease=10)
    a, b = idle_node(app, "a", [la]), idle_node(app, "b", [lb])
    await la.start(a)
    await lb.start(b)
    assert await la.tick(a)

    await la.stopping(a)
    assert not a.is_leader
    assert lease_row(db_url) is None
    assert await lb.tick(b) is True  # no waiting for expiry: the clock has not moved
    assert await la.tick(a) is False  # a stopping node never takes the lease back


async def test_leader_that_loses_the_database_stops_while_its_lease_still_holds(
    apps: AppFactory, db_url: str
) -> None:
    """Real time: once the node cannot renew, is_leader turns false before the lease ends."""
    app = apps()
    await app.open()
    lead = Leadership(lease=2.0, margin=0.5)
    node = idle_node(app, "cut-off", [lead])
    await lead.start(node)
    assert await lead.tick(node)
    await app.engine.close()  # every later call fails, as when the database is unreachable
    with pytest.raises(Exception):  # noqa: B017 - whatever the engine raises when closed
        await lead.tick(node)
    await await_until(lambda: not node.is_leader, timeout=10, interval=0.01)
    stepped_down_at = datetime.now(UTC)
    row = lease_row(db_url)
    assert row is not None and row[0] == "cut-off"
    assert row[1] > stepped_down_at, "the node acted as leader after its lease had ended"


async def test_a_renewal_answered_late_is_renewed_again_at_once(
    apps: AppFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """Real time: a renewal that waited out an outage comes back with a deadline counted from
    when it was sent, nearly spent. The next renewal is at once, not an interval later, so the
    leader does not lapse (and log it) just after the database is back."""
    app = apps()
    await app.open()
    # A renewal period of 1 s, far longer than a renewal takes even on a loaded machine.
    lead = Leadership(lease=3.0, renew_every=1.0, margin=0.5)
    node = idle_node(app, "slow", [lead])
    await lead.start(node)
    assert await lead.tick(node) is True
    assert lead.next_delay(True) == 1.0
    acquire = app.engine.acquire_leadership

    async def late(*args: object, **kwargs: object) -> datetime | None:
        await asyncio.sleep(1.3)  # longer than a renewal period
        return await acquire(*args, **kwargs)  # type: ignore[arg-type]

    app.engine.acquire_leadership = late  # type: ignore[method-assign]
    assert await lead.tick(node) is True
    assert lead.next_delay(True) == 0.0
    app.engine.acquire_leadership = acquire  # type: ignore[method-assign]
    assert await lead.tick(node) is True
    assert lead.next_delay(True) == 1.0
    assert node.is_leader
    assert "stops acting as leader" not in caplog.text

    # Answered after its whole lease (less the margin) had gone by: not acted on at all.
    delay = 2.8

    async def later(*args: object, **kwargs: object) -> datetime | None:
        await asyncio.sleep(delay)
        return await acquire(*args, **kwargs)  # type: ignore[arg-type]

    app.engine.acquire_leadership = later  # type: ignore[method-assign]
    caplog.clear()
    caplog.set_level(logging.INFO, logger="koban.leadership")
    assert await lead.tick(node) is False
    assert lead.next_delay(False) == 0.0
    assert not node.is_leader
    app.engine.acquire_leadership = acquire  # type: ignore[method-assign]
    assert await lead.tick(node) is True
    assert [r.getMessage().split(": ")[0] for r in caplog.records] == [
        "node slow stops acting as leader",
        "node slow is now the cluster's leader",
    ]


async def test_nodes_elect_a_leader_and_hand_over_on_stop(apps: AppFactory, db_url: str) -> None:
    # A long lease: "two" can only lead soon after "one" stops if "one" resigned.
    one = apps(node="one", plugins=[Leadership(lease=30)])
    two = apps(node="two", plugins=[Leadership(lease=30)])
    n1 = await one.start()
    await await_until(lambda: n1.is_leader, what="the only node to lead")
    n2 = await two.start()
    assert not n2.is_leader
    assert [n.name for n in await two.alist_nodes() if n.leader] == ["one"]
    await one.stop()
    assert lease_row(db_url) is None or lease_row(db_url)[0] == "two"  # type: ignore[index]
    await await_until(lambda: n2.is_leader, timeout=15, what="node two to take over")
    assert lease_row(db_url)[0] == "two"  # type: ignore[index]


def test_invalid_settings_are_refused() -> None:
    with pytest.raises(ConfigurationError, match=r"lease must be a positive number"):
        Leadership(lease=0)
    with pytest.raises(ConfigurationError, match=r"renew_every < lease - margin"):
        Leadership(lease=10, renew_every=9)
