"""A small Strava API client on httpx: list activities, refresh tokens, read rate limits.

>>> with StravaClient("https://www.strava.com", client_id="123", client_secret="...") as strava:
...     tokens = strava.refresh(refresh_token)
...     page = strava.list_activities(tokens.access_token, after=1719784800, page=1, per_page=100)

Errors are typed by what the caller should do: `StravaUnavailable` (try again later),
`RateLimited` (wait until `resets_at`), `Unauthorized` (refresh the access token),
`RefreshRejected` (the athlete must reconnect Strava).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx

from koban.clock import Clock

#: Strava counts requests in 15-minute windows starting at :00, :15, :30 and :45 (UTC),
#: and per day from midnight UTC.
SHORT_WINDOW = 900


@dataclass(frozen=True, slots=True)
class Tokens:
    """An athlete's OAuth tokens; `expires_at` is a Unix time, as Strava sends it."""

    access_token: str
    refresh_token: str
    expires_at: int

    def expired(self, now: datetime, leeway: float = 60.0) -> bool:
        """True if the access token is expired or will be within `leeway` seconds."""
        return self.expires_at <= now.timestamp() + leeway


@dataclass(frozen=True, slots=True)
class RateLimit:
    """Strava's limits and usage, from `X-RateLimit-Limit` / `X-RateLimit-Usage`."""

    short_limit: int
    daily_limit: int
    short_usage: int
    daily_usage: int

    @classmethod
    def from_headers(cls, headers: httpx.Headers) -> RateLimit | None:
        """Parse the headers ("15-minute,daily" pairs); None if absent or malformed."""
        try:
            short_limit, daily_limit = (int(x) for x in headers["X-RateLimit-Limit"].split(","))
            short_usage, daily_usage = (int(x) for x in headers["X-RateLimit-Usage"].split(","))
        except (KeyError, ValueError):
            return None
        return cls(short_limit, daily_limit, short_usage, daily_usage)

    @property
    def daily_exhausted(self) -> bool:
        return self.daily_usage >= self.daily_limit

    def resets_at(self, now: datetime) -> datetime:
        """When requests are allowed again: the next quarter hour, or midnight UTC if the
        daily limit is used up."""
        now = now.astimezone(UTC)
        if self.daily_exhausted:
            return datetime(now.year, now.month, now.day, tzinfo=UTC) + timedelta(days=1)
        start = int(now.timestamp()) // SHORT_WINDOW * SHORT_WINDOW
        return datetime.fromtimestamp(start + SHORT_WINDOW, UTC)


class StravaError(Exception):
    """Strava answered with an error (or could not be reached).

    `resources` names what Strava's error body blames ("Athlete", "Application",
    "RefreshToken"...).
    """

    def __init__(
        self, message: str, status: int | None = None, resources: frozenset[str] = frozenset()
    ) -> None:
        super().__init__(message)
        self.status = status
        self.resources = resources


class StravaUnavailable(StravaError):
    """Strava is down, erroring or unreachable: try again later."""


class Unauthorized(StravaError):
    """The access token was refused (expired or revoked): refresh it and try again."""


class RefreshRejected(StravaError):
    """The refresh token was refused: the athlete has to connect Strava again."""


class RateLimited(StravaError):
    """Strava's rate limit is used up; requests are allowed again at `resets_at`."""

    def __init__(self, message: str, rate_limit: RateLimit | None, resets_at: datetime) -> None:
        super().__init__(message, 429)
        self.rate_limit = rate_limit
        self.resets_at = resets_at


class StravaClient:
    """Calls the Strava API at `base_url` (https://www.strava.com in production)."""

    def __init__(
        self,
        base_url: str,
        *,
        client_id: str,
        client_secret: str,
        timeout: float = 15.0,
        clock: Clock | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.client_id = client_id
        self.client_secret = client_secret
        self.clock = clock or Clock()
        self.last_rate_limit: RateLimit | None = None
        self._http = httpx.Client(
            base_url=self.base_url,
            timeout=timeout,
            headers={"Accept": "application/json", "User-Agent": "koban-summer-challenge"},
        )

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> StravaClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def list_activities(
        self,
        access_token: str,
        *,
        after: int | None = None,
        before: int | None = None,
        page: int = 1,
        per_page: int = 100,
    ) -> list[dict[str, Any]]:
        """One page of the athlete's activities (`GET /api/v3/athlete/activities`).

        With only `after`, Strava returns them oldest first.
        """
        params: dict[str, int] = {"page": page, "per_page": per_page}
        if after is not None:
            params["after"] = after
        if before is not None:
            params["before"] = before
        body = self._call("GET", "/api/v3/athlete/activities", params=params, token=access_token)
        if not isinstance(body, list):
            raise StravaUnavailable(
                f"Strava sent {type(body).__name__} where a list of activities was expected"
            )
        return body

    def refresh(self, refresh_token: str) -> Tokens:
        """New tokens for a refresh token (`POST /oauth/token`, grant_type=refresh_token)."""
        try:
            body = self._call(
                "POST",
                "/oauth/token",
                data={
                    "client_id": self.client_id,
                    "client_secret": self.client_secret,
                    "grant_type": "refresh_token",
                    "refresh_token": refresh_token,
                },
            )
        except Unauthorized as exc:
            if "Application" in exc.resources:
                # The app's own credentials, not the athlete's: an operator must fix them.
                raise StravaError(
                    f"Strava refused the app's client credentials ({exc}); check "
                    "STRAVA_CLIENT_ID and STRAVA_CLIENT_SECRET",
                    exc.status,
                ) from None
            raise RefreshRejected(str(exc), exc.status) from None
        try:
            return Tokens(body["access_token"], body["refresh_token"], int(body["expires_at"]))
        except (KeyError, TypeError, ValueError):
            raise StravaUnavailable(
                "Strava's token response lacks access_token, refresh_token or expires_at"
            ) from None

    def _call(
        self,
        method: str,
        path: str,
        *,
        token: str | None = None,
        params: dict[str, int] | None = None,
        data: dict[str, str] | None = None,
    ) -> Any:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        try:
            response = self._http.request(method, path, params=params, data=data, headers=headers)
        except httpx.TransportError as exc:
            raise StravaUnavailable(
                f"{method} {self.base_url}{path}: {type(exc).__name__}: {exc}"
            ) from exc
        rate_limit = RateLimit.from_headers(response.headers)
        if rate_limit is not None:
            self.last_rate_limit = rate_limit
        status = response.status_code
        if status == 429:
            resets_at = (rate_limit or RateLimit(0, 1, 0, 0)).resets_at(self.clock.now())
            raise RateLimited(
                f"{method} {path}: Strava rate limit exceeded "
                f"(usage {_usage(rate_limit)}); allowed again at {resets_at.isoformat()}",
                rate_limit,
                resets_at,
            )
        if status == 401 or (status == 400 and path == "/oauth/token"):
            raise Unauthorized(
                f"{method} {path}: {status} {_message(response)}", status, _resources(response)
            )
        if status >= 500:
            raise StravaUnavailable(
                f"{method} {path}: Strava answered {status} {_message(response)}", status
            )
        if status >= 400:
            raise StravaError(f"{method} {path}: {status} {_message(response)}", status)
        try:
            return response.json()
        except ValueError:
            raise StravaUnavailable(
                f"{method} {path}: Strava sent a body that is not JSON"
            ) from None


def _message(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text[:200]
    if isinstance(body, dict):
        detail = "; ".join(
            f"{e.get('resource')}.{e.get('field')} {e.get('code')}"
            for e in body.get("errors") or []
            if isinstance(e, dict)
        )
        return f"{body.get('message', '')}" + (f" ({detail})" if detail else "")
    return str(body)[:200]


def _resources(response: httpx.Response) -> frozenset[str]:
    try:
        body = response.json()
    except ValueError:
        return frozenset()
    errors = body.get("errors") if isinstance(body, dict) else None
    return frozenset(
        str(e["resource"]) for e in errors or [] if isinstance(e, dict) and e.get("resource")
    )


def _usage(rate_limit: RateLimit | None) -> str:
    if rate_limit is None:
        return "unknown"
    return (
        f"{rate_limit.short_usage}/{rate_limit.short_limit} per 15 min, "
        f"{rate_limit.daily_usage}/{rate_limit.daily_limit} per day"
    )
