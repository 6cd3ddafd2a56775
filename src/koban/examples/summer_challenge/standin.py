"""A local stand-in for the Strava API, so tests and the demo never touch the internet.

It serves the endpoints the sync uses, with Strava's shapes: `GET /api/v3/athlete`,
`GET /api/v3/athlete/activities` (`before`, `after`, `page`, `per_page`; ascending when only
`after` is given, newest first otherwise), `POST /oauth/token` (refresh), and the
`X-RateLimit-Limit` / `X-RateLimit-Usage` headers ("15-minute,daily") on every API response.

Athletes and their activities are generated from a seed. Tests switch it into failure modes:

>>> with StravaStandIn(athletes=3) as strava:
...     strava.fail("error", times=2)              # the next two API calls answer HTTP 500
...     strava.fail("rate_limit")                  # 429 with the 15-minute limit used up
...     strava.fail("slow", delay=0.5)             # every API call takes half a second longer
...     strava.fail("expired_token", athlete_id=strava.athletes[0].id, times=1)
...     strava.heal()                              # back to normal

Run it on its own with `python -m koban.examples.summer_challenge.standin --port 8080`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import secrets
import socket
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

FailureMode = Literal["error", "rate_limit", "slow", "expired_token"]
FAILURE_MODES: tuple[str, ...] = ("error", "rate_limit", "slow", "expired_token")

#: Strava's default application limits: requests per 15 minutes, per day.
DEFAULT_RATE_LIMIT = (100, 1000)
#: How long an access token issued by /oauth/token lives (Strava: six hours).
TOKEN_LIFETIME = 6 * 3600
#: Strava's `per_page` default and maximum.
DEFAULT_PER_PAGE = 30
MAX_PER_PAGE = 200

CLIENT_ID = "koban-demo"
CLIENT_SECRET = "koban-demo-secret"

_FIRST = ("Ania", "Bartek", "Celina", "Damian", "Ewa", "Filip", "Gosia", "Henryk", "Iga",
          "Jan", "Kasia", "Lech", "Marta", "Nikola", "Ola", "Piotr", "Róża", "Staś", "Tola",
          "Wojtek")  # fmt: skip
_LAST = ("Nowak", "Kowalska", "Wiśniewski", "Wójcik", "Kamińska", "Lewandowski", "Zielińska",
         "Szymański", "Woźniak", "Dąbrowska")  # fmt: skip
_SPORTS = (("Run", 3000, 21000, 5.0), ("Ride", 10000, 120000, 2.2), ("Swim", 500, 4000, 40.0),
           ("Walk", 2000, 12000, 11.0), ("Hike", 5000, 25000, 12.0))  # fmt: skip
_TIMES = {"Run": "Morning Run", "Ride": "Afternoon Ride", "Swim": "Lunch Swim",
          "Walk": "Evening Walk", "Hike": "Weekend Hike"}  # fmt: skip


@dataclass
class FakeAthlete:
    """An athlete as Strava knows them, with the tokens the app was given at connect time."""

    id: int
    firstname: str
    lastname: str
    access_token: str
    refresh_token: str
    expires_at: int
    activities: list[dict[str, Any]] = field(default_factory=list)

    @property
    def name(self) -> str:
        return f"{self.firstname} {self.lastname}"

    def summary(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "resource_state": 2,
            "firstname": self.firstname,
            "lastname": self.lastname,
            "city": "Warszawa",
            "country": "Poland",
        }


@dataclass
class Failure:
    """One switched-on failure mode; `remaining` None means until `heal()`."""

    mode: FailureMode
    remaining: int | None = None
    athlete_id: int | None = None
    delay: float = 1.0
    daily: bool = False


class StravaStandIn:
    """Generated athletes and activities behind Strava-shaped endpoints on 127.0.0.1.

    `start()` binds an ephemeral port and serves from a background thread; `url` is the base
    URL to give the Strava client. Thread-safe: tests switch failures while requests run.
    """

    def __init__(
        self,
        *,
        athletes: int = 10,
        activities: tuple[int, int] = (20, 60),
        seed: int = 2026,
        expired: int = 0,
        rate_limit: tuple[int, int] = DEFAULT_RATE_LIMIT,
        days: int = 60,
        port: int = 0,
    ) -> None:
        """Generate `athletes` athletes with `activities` (min, max) each, over the last `days`.

        The first `expired` athletes start with access tokens that have already expired.
        """
        self.rate_limit = rate_limit
        self.port = port
        self._lock = threading.Lock()
        self._rng = random.Random(seed)
        self._next_activity_id = 9_000_000_000 + seed * 1_000_000
        self._failures: list[Failure] = []
        self._tokens: dict[str, tuple[int, int]] = {}  # access token -> (athlete id, expires_at)
        self._usage: dict[tuple[str, int], int] = {}
        self.requests: Counter[str] = Counter()
        self.refreshes: Counter[int] = Counter()
        self.athletes: list[FakeAthlete] = []
        now = int(time.time())
        for i in range(athletes):
            athlete_id = 100_000 + seed % 1000 * 1000 + i
            expires_at = now - 3600 if i < expired else now + TOKEN_LIFETIME
            athlete = FakeAthlete(
                id=athlete_id,
                firstname=_FIRST[i % len(_FIRST)],
                lastname=_LAST[(i * 7 + seed) % len(_LAST)],
                access_token=secrets.token_hex(20),
                refresh_token=secrets.token_hex(20),
                expires_at=expires_at,
            )
            self._tokens[athlete.access_token] = (athlete.id, expires_at)
            count = self._rng.randint(*activities)
            starts = sorted(self._rng.sample(range(now - days * 86400, now - 3600), count))
            athlete.activities = [self._activity(athlete.id, start) for start in starts]
            self.athletes.append(athlete)
        self._by_id = {a.id: a for a in self.athletes}
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self.asgi = Starlette(
            routes=[
                Route("/api/v3/athlete", self._athlete, methods=["GET"]),
                Route("/api/v3/athlete/activities", self._activities, methods=["GET"]),
                Route("/oauth/token", self._token, methods=["POST"]),
                Route("/_standin/failures", self._control, methods=["POST", "DELETE"]),
            ]
        )

    # ----- data -----------------------------------------------------------------------------
    def _activity(self, athlete_id: int, start: int) -> dict[str, Any]:
        sport, low, high, pace = self._rng.choice(_SPORTS)
        distance = round(self._rng.uniform(low, high), 1)
        moving = int(distance / 1000 * pace * 60) if sport != "Ride" else int(distance / 8)
        self._next_activity_id += self._rng.randint(1, 50)
        started = datetime.fromtimestamp(start, UTC)
        return {
            "resource_state": 2,
            "athlete": {"id": athlete_id, "resource_state": 1},
            "name": _TIMES[sport],
            "distance": distance,
            "moving_time": moving,
            "elapsed_time": moving + self._rng.randint(0, 600),
            "total_elevation_gain": round(self._rng.uniform(0, distance / 100), 1),
            "type": sport,
            "sport_type": sport,
            "id": self._next_activity_id,
            "start_date": started.strftime("%Y-%m-%dT%H:%M:%SZ"),
            "start_date_local": (started + timedelta(hours=2)).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "timezone": "(GMT+01:00) Europe/Warsaw",
            "utc_offset": 7200.0,
            "kudos_count": self._rng.randint(0, 30),
        }

    def add_activities(self, athlete_id: int, count: int = 1) -> list[dict[str, Any]]:
        """New activities for an athlete, started in the last hour (what the next sync finds)."""
        with self._lock:
            athlete = self._by_id[athlete_id]
            now = int(time.time())
            last = athlete.activities[-1]["start_date"] if athlete.activities else None
            floor = _epoch(last) + 1 if last else now - 3600
            starts = sorted(self._rng.sample(range(max(floor, now - 3600), now), count))
            added = [self._activity(athlete_id, s) for s in starts]
            athlete.activities.extend(added)
            return added

    @property
    def total_activities(self) -> int:
        return sum(len(a.activities) for a in self.athletes)

    def activity_ids(self, athlete_id: int | None = None) -> set[int]:
        """Ids of every generated activity (of one athlete, or of all)."""
        athletes = [self._by_id[athlete_id]] if athlete_id is not None else self.athletes
        return {act["id"] for a in athletes for act in a.activities}

    # ----- failure modes --------------------------------------------------------------------
    def fail(
        self,
        mode: FailureMode,
        *,
        times: int | None = None,
        athlete_id: int | None = None,
        delay: float = 1.0,
        daily: bool = False,
    ) -> None:
        """Fail API calls: `times` of them (None: until `heal`), of one athlete or of all.

        error: HTTP 500. rate_limit: 429 with the 15-minute limit used up (`daily`: the daily one).
        slow: answer normally after `delay` seconds. expired_token: the athlete's access token
        expires on the spot and the call gets 401, as when a token runs out mid-sync.
        """
        if mode not in FAILURE_MODES:
            raise ValueError(
                f"unknown failure mode {mode!r}; choose one of {', '.join(FAILURE_MODES)}"
            )
        with self._lock:
            self._failures.append(Failure(mode, times, athlete_id, delay, daily))

    def heal(self) -> None:
        """Switch every failure mode off."""
        with self._lock:
            self._failures.clear()

    def _take_failure(self, athlete_id: int) -> Failure | None:
        with self._lock:
            for failure in self._failures:
                if failure.athlete_id not in (None, athlete_id):
                    continue
                if failure.remaining is not None:
                    failure.remaining -= 1
                    if failure.remaining <= 0:
                        self._failures.remove(failure)
                return failure
        return None

    # ----- rate limits ----------------------------------------------------------------------
    def _count_usage(self) -> tuple[int, int]:
        now = int(time.time())
        with self._lock:
            short = self._usage.get(("15m", now // 900), 0) + 1
            daily = self._usage.get(("day", now // 86400), 0) + 1
            self._usage = {("15m", now // 900): short, ("day", now // 86400): daily}
        return short, daily

    def _rate_headers(self, usage: tuple[int, int]) -> dict[str, str]:
        return {
            "X-RateLimit-Limit": f"{self.rate_limit[0]},{self.rate_limit[1]}",
            "X-RateLimit-Usage": f"{usage[0]},{usage[1]}",
        }

    # ----- endpoints ------------------------------------------------------------------------
    async def _authorize(self, request: Request) -> tuple[FakeAthlete | None, Response | None]:
        """The athlete whose token the request carries, or the response refusing it."""
        self.requests[request.url.path] += 1
        header = request.headers.get("authorization", "")
        token = header.removeprefix("Bearer ").strip() if header.startswith("Bearer ") else ""
        with self._lock:
            holder = self._tokens.get(token)
        if holder is None:
            return None, _error(401, "Authorization Error", "Athlete", "access_token", "invalid")
        athlete_id, expires_at = holder
        usage = self._count_usage()
        failure = self._take_failure(athlete_id)
        if failure is not None:
            if failure.mode == "slow":
                await asyncio.sleep(failure.delay)
            elif failure.mode == "error":
                return None, JSONResponse(
                    {"message": "Internal Server Error", "errors": []},
                    status_code=500,
                    headers=self._rate_headers(usage),
                )
            elif failure.mode == "rate_limit":
                used = (
                    (usage[0], self.rate_limit[1])
                    if failure.daily
                    else (self.rate_limit[0], usage[1])
                )
                response = _error(
                    429, "Rate Limit Exceeded", "Application", "rate limit", "exceeded"
                )
                response.headers.update(self._rate_headers(used))
                return None, response
            elif failure.mode == "expired_token":
                with self._lock:
                    self._tokens[token] = (athlete_id, int(time.time()) - 1)
                expires_at = 0
        if expires_at <= time.time():
            response = _error(401, "Authorization Error", "Athlete", "access_token", "invalid")
            response.headers.update(self._rate_headers(usage))
            return None, response
        request.state.rate_headers = self._rate_headers(usage)
        return self._by_id[athlete_id], None

    async def _athlete(self, request: Request) -> Response:
        athlete, refused = await self._authorize(request)
        if refused is not None or athlete is None:
            return refused or _error(
                401, "Authorization Error", "Athlete", "access_token", "invalid"
            )
        return JSONResponse(athlete.summary(), headers=request.state.rate_headers)

    async def _activities(self, request: Request) -> Response:
        athlete, refused = await self._authorize(request)
        if refused is not None or athlete is None:
            return refused or _error(
                401, "Authorization Error", "Athlete", "access_token", "invalid"
            )
        try:
            before = _int_param(request, "before")
            after = _int_param(request, "after")
            page = _int_param(request, "page") or 1
            per_page = _int_param(request, "per_page") or DEFAULT_PER_PAGE
        except ValueError as exc:
            return _error(400, "Bad Request", "Activity", str(exc), "invalid")
        if page < 1 or per_page < 1:
            return _error(400, "Bad Request", "Activity", "page", "invalid")
        per_page = min(per_page, MAX_PER_PAGE)
        with self._lock:
            chosen = [
                a
                for a in athlete.activities
                if (after is None or _epoch(a["start_date"]) > after)
                and (before is None or _epoch(a["start_date"]) < before)
            ]
        # Strava returns oldest first when only `after` is given, newest first otherwise.
        if not (after is not None and before is None):
            chosen.reverse()
        body = chosen[(page - 1) * per_page : page * per_page]
        return JSONResponse(body, headers=request.state.rate_headers)

    async def _token(self, request: Request) -> Response:
        self.requests[request.url.path] += 1
        params: dict[str, Any] = dict(request.query_params)
        if request.headers.get("content-type", "").startswith("application/json"):
            params.update(await request.json())
        else:
            params.update(dict(await request.form()))
        if params.get("client_id") != CLIENT_ID or params.get("client_secret") != CLIENT_SECRET:
            return _error(401, "Authorization Error", "Application", "client_secret", "invalid")
        if params.get("grant_type") != "refresh_token":
            return _error(400, "Bad Request", "RefreshToken", "grant_type", "invalid")
        with self._lock:
            athlete = next(
                (a for a in self.athletes if a.refresh_token == params.get("refresh_token")), None
            )
            if athlete is None:
                return _error(400, "Bad Request", "RefreshToken", "refresh_token", "invalid")
            self._tokens.pop(athlete.access_token, None)
            athlete.access_token = secrets.token_hex(20)
            athlete.expires_at = int(time.time()) + TOKEN_LIFETIME
            self._tokens[athlete.access_token] = (athlete.id, athlete.expires_at)
            self.refreshes[athlete.id] += 1
        return JSONResponse(
            {
                "token_type": "Bearer",
                "access_token": athlete.access_token,
                "expires_at": athlete.expires_at,
                "expires_in": TOKEN_LIFETIME,
                "refresh_token": athlete.refresh_token,
            }
        )

    async def _control(self, request: Request) -> Response:
        """Switch failure modes from another process: POST {"mode": ...}, DELETE to heal."""
        if request.method == "DELETE":
            self.heal()
            return JSONResponse({"failures": 0})
        body = await request.json()
        try:
            self.fail(
                body["mode"],
                times=body.get("times"),
                athlete_id=body.get("athlete_id"),
                delay=float(body.get("delay", 1.0)),
                daily=bool(body.get("daily", False)),
            )
        except (KeyError, ValueError) as exc:
            return JSONResponse({"message": str(exc)}, status_code=400)
        return JSONResponse({"failures": len(self._failures)})

    # ----- serving --------------------------------------------------------------------------
    @property
    def url(self) -> str:
        """Base URL of the running server, for example http://127.0.0.1:53211."""
        if self._server is None:
            raise RuntimeError("the Strava stand-in is not running; call start() first")
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 10.0) -> str:
        """Serve on 127.0.0.1 (an ephemeral port unless one was given); return the base URL."""
        if self._server is not None:
            return self.url
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", self.port))
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(self.asgi, log_level="warning", lifespan="off", access_log=False)
        server = uvicorn.Server(config)
        self._server = server
        self._thread = threading.Thread(
            target=server.run, kwargs={"sockets": [sock]}, name="strava-standin", daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the Strava stand-in did not start on port {self.port}")
            time.sleep(0.01)
        return self.url

    def stop(self) -> None:
        """Stop serving and wait for the server thread."""
        if self._server is None:
            return
        self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(10)
        self._server = None
        self._thread = None

    def __enter__(self) -> StravaStandIn:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _error(status: int, message: str, resource: str, field_: str, code: str) -> JSONResponse:
    return JSONResponse(
        {"message": message, "errors": [{"resource": resource, "field": field_, "code": code}]},
        status_code=status,
    )


def _int_param(request: Request, name: str) -> int | None:
    value = request.query_params.get(name)
    if value is None or value == "":
        return None
    try:
        return int(float(value))
    except ValueError:
        raise ValueError(name) from None


def _epoch(iso: str) -> int:
    return int(datetime.strptime(iso, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC).timestamp())


def main(argv: list[str] | None = None) -> None:
    """Serve the stand-in until interrupted, printing its URL and the athletes' tokens."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--athletes", type=int, default=10)
    parser.add_argument("--seed", type=int, default=2026)
    options = parser.parse_args(argv)
    strava = StravaStandIn(athletes=options.athletes, seed=options.seed, port=options.port)
    strava.start()
    print(f"Strava stand-in on {strava.url} (client_id={CLIENT_ID}, client_secret={CLIENT_SECRET})")
    print(json.dumps([
        {"id": a.id, "name": a.name, "access_token": a.access_token,
         "refresh_token": a.refresh_token, "expires_at": a.expires_at}
        for a in strava.athletes
    ], indent=2))  # fmt: skip
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        strava.stop()


if __name__ == "__main__":  # pragma: no cover
    main()
