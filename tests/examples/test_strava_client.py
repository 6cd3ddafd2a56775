"""The Strava client against the local stand-in: paging, tokens, rate limits, failures."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime

import httpx
import pytest

import koban
from koban.examples.summer_challenge.standin import CLIENT_ID, CLIENT_SECRET, StravaStandIn
from koban.examples.summer_challenge.strava import (
    RateLimit,
    RateLimited,
    RefreshRejected,
    StravaClient,
    StravaError,
    StravaUnavailable,
    Unauthorized,
)

NOW = datetime(2026, 7, 1, 12, 7, 30, tzinfo=UTC)


@pytest.fixture
def client(strava: StravaStandIn) -> Iterator[StravaClient]:
    with StravaClient(
        strava.url,
        client_id=CLIENT_ID,
        client_secret=CLIENT_SECRET,
        clock=koban.FrozenClock(NOW),
    ) as c:
        yield c


def _token(strava: StravaStandIn) -> str:
    return strava.athletes[1].access_token  # athletes[0] starts with an expired token


def test_pages_are_oldest_first_after_a_time_and_newest_first_otherwise(
    strava: StravaStandIn, client: StravaClient
) -> None:
    token = _token(strava)
    expected = strava.athletes[1].activities  # oldest first

    pages = []
    page = 1
    while batch := client.list_activities(token, after=0, page=page, per_page=5):
        pages.append(batch)
        page += 1
    newest = client.list_activities(token, page=1, per_page=5)
    cut = client.list_activities(token, after=_epoch(expected[-3]["start_date"]), per_page=50)

    assert [a["id"] for p in pages for a in p] == [a["id"] for a in expected]
    assert all(len(p) == 5 for p in pages[:-1])
    assert [a["id"] for a in newest] == [a["id"] for a in reversed(expected[-5:])]
    assert [a["id"] for a in cut] == [a["id"] for a in expected[-2:]]
    assert {"id", "name", "distance", "moving_time", "sport_type", "start_date"} <= set(newest[0])


def test_rate_limit_headers_are_read_on_every_call(
    strava: StravaStandIn, client: StravaClient
) -> None:
    client.list_activities(_token(strava), per_page=1)
    client.list_activities(_token(strava), per_page=1)

    assert client.last_rate_limit == RateLimit(100, 1000, 2, 2)


def test_429_raises_rate_limited_until_the_next_quarter_hour(
    strava: StravaStandIn, client: StravaClient
) -> None:
    strava.fail("rate_limit", times=1)

    with pytest.raises(RateLimited) as limited:
        client.list_activities(_token(strava))

    assert limited.value.resets_at == datetime(2026, 7, 1, 12, 15, tzinfo=UTC)
    assert limited.value.rate_limit is not None and limited.value.rate_limit.short_usage == 100
    assert client.list_activities(_token(strava), per_page=1)  # the failure was used up


def test_daily_limit_resets_at_midnight_utc(strava: StravaStandIn, client: StravaClient) -> None:
    strava.fail("rate_limit", times=1, daily=True)

    with pytest.raises(RateLimited) as limited:
        client.list_activities(_token(strava))

    assert limited.value.resets_at == datetime(2026, 7, 2, tzinfo=UTC)


def test_server_errors_and_an_unreachable_strava_are_unavailable(strava: StravaStandIn) -> None:
    strava.fail("error", times=1)
    with StravaClient(strava.url, client_id=CLIENT_ID, client_secret=CLIENT_SECRET) as client:
        with pytest.raises(StravaUnavailable) as down:
            client.list_activities(_token(strava))
        assert down.value.status == 500

        strava.stop()
        with pytest.raises(StravaUnavailable, match="ConnectError"):
            client.list_activities(_token(strava))


def test_an_expired_token_is_refused_and_a_refresh_gives_a_working_one(
    strava: StravaStandIn, client: StravaClient
) -> None:
    athlete = strava.athletes[0]

    with pytest.raises(Unauthorized):
        client.list_activities(athlete.access_token)
    tokens = client.refresh(athlete.refresh_token)

    assert tokens.access_token == athlete.access_token
    assert tokens.expires_at > datetime.now(UTC).timestamp()
    assert client.list_activities(tokens.access_token, per_page=1)


def test_a_revoked_refresh_token_and_bad_app_credentials_are_told_apart(
    strava: StravaStandIn, client: StravaClient
) -> None:
    with pytest.raises(RefreshRejected):
        client.refresh("not-a-refresh-token")

    with StravaClient(strava.url, client_id=CLIENT_ID, client_secret="wrong") as wrong:
        with pytest.raises(StravaError, match="STRAVA_CLIENT_SECRET") as refused:
            wrong.refresh(strava.athletes[1].refresh_token)
    assert not isinstance(refused.value, RefreshRejected)


def test_failures_can_be_switched_from_another_process(
    strava: StravaStandIn, client: StravaClient
) -> None:
    assert httpx.post(f"{strava.url}/_standin/failures", json={"mode": "error"}).status_code == 200
    with pytest.raises(StravaUnavailable):
        client.list_activities(_token(strava))

    assert httpx.delete(f"{strava.url}/_standin/failures").status_code == 200
    assert client.list_activities(_token(strava), per_page=1)
    bad = httpx.post(f"{strava.url}/_standin/failures", json={"mode": "flood"})
    assert bad.status_code == 400 and "unknown failure mode" in bad.json()["message"]


def _epoch(iso: str) -> int:
    return int(datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp())
