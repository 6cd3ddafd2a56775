"""Syncing one athlete: refresh the token if needed, page through new activities, upsert them.

Progress is committed page by page (activities and the athlete's cursor in one transaction),
so a sync that is interrupted anywhere resumes where it stopped and never stores an activity
twice.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

from koban.examples.summer_challenge.store import Athlete, Store
from koban.examples.summer_challenge.strava import StravaClient, Tokens, Unauthorized


@dataclass(slots=True)
class SyncResult:
    athlete_id: int
    activities: int = 0
    pages: int = 0
    refreshed: bool = False
    stopped: bool = False


def sync_athlete(
    store: Store,
    strava: StravaClient,
    athlete: Athlete,
    *,
    per_page: int,
    now: Callable[[], datetime],
    should_stop: Callable[[], bool] = lambda: False,
) -> SyncResult:
    """Fetch every activity newer than the athlete's cursor and store it.

    Raises the Strava client's errors for the caller to map to job outcomes. `should_stop` is
    checked between pages, so a cancelled job stops at a page boundary.
    """
    result = SyncResult(athlete.id)
    tokens = athlete.tokens
    if tokens.expired(now()):
        tokens = _refresh(store, strava, athlete.id, tokens)
        result.refreshed = True
    # One second of overlap: an activity starting in the cursor's own second is fetched
    # again rather than risked; the upsert makes the repeat harmless.
    after = max(athlete.synced_until - 1, 0)
    page = 1
    while True:
        try:
            activities = strava.list_activities(
                tokens.access_token, after=after, page=page, per_page=per_page
            )
        except Unauthorized:
            if result.refreshed:
                raise
            # The token was revoked or expired early (clock skew): refresh once and retry.
            tokens = _refresh(store, strava, athlete.id, tokens)
            result.refreshed = True
            continue
        result.activities += store.save_activities(athlete.id, activities, now())
        result.pages += 1
        if len(activities) < per_page:
            break
        if should_stop():
            result.stopped = True
            return result
        page += 1
    store.mark_synced(athlete.id, now())
    return result


def _refresh(store: Store, strava: StravaClient, athlete_id: int, tokens: Tokens) -> Tokens:
    fresh = strava.refresh(tokens.refresh_token)
    store.save_tokens(athlete_id, fresh)
    return fresh
