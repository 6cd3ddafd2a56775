"""Settings of the Summer Challenge app, from arguments or the environment."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from koban.errors import ConfigurationError


@dataclass(frozen=True, slots=True)
class Settings:
    """Where the app keeps its data and how it reaches Strava.

    The app's tables and koban's jobs live in the same database (`database_url`), so a job and
    the data it writes can be committed together.
    """

    #: The app's database: sqlite:///path.db (default) or postgresql://...
    database_url: str = "sqlite:///summer_challenge.db"
    #: Strava's base URL; tests and the demo point it at the local stand-in.
    strava_url: str = "https://www.strava.com"
    client_id: str = ""
    client_secret: str = ""
    #: Activities per page when paging through an athlete's activities (Strava's max: 200).
    per_page: int = 100
    #: Seconds of backoff before the second attempt; each later attempt doubles the extra part
    #: (koban's default curve: retry_base + 2**attempt, ±10%).
    retry_base: float = 15.0
    #: Seconds after which a dead node's jobs are rescued (its heartbeat expired); at least
    #: twice the heartbeat interval (5 s).
    rescue_after: float = 30.0

    def with_changes(self, **changes: Any) -> Settings:
        return replace(self, **changes)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Settings from SUMMER_CHALLENGE_* and STRAVA_* variables, defaults elsewhere."""
        env = os.environ if environ is None else environ
        defaults = cls()
        try:
            return cls(
                database_url=env.get("SUMMER_CHALLENGE_DATABASE_URL")
                or env.get("KOBAN_DATABASE_URL")
                or defaults.database_url,
                strava_url=env.get("STRAVA_BASE_URL") or defaults.strava_url,
                client_id=env.get("STRAVA_CLIENT_ID", defaults.client_id),
                client_secret=env.get("STRAVA_CLIENT_SECRET", defaults.client_secret),
                per_page=int(env.get("SUMMER_CHALLENGE_PER_PAGE") or defaults.per_page),
                retry_base=float(env.get("SUMMER_CHALLENGE_RETRY_BASE") or defaults.retry_base),
                rescue_after=float(
                    env.get("SUMMER_CHALLENGE_RESCUE_AFTER") or defaults.rescue_after
                ),
            )
        except ValueError as exc:
            raise ConfigurationError(
                f"Summer Challenge settings: a SUMMER_CHALLENGE_* variable is not a number ({exc})"
            ) from None
