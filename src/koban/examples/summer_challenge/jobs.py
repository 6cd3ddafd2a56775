"""The Summer Challenge jobs and the koban app that runs them.

Run a node with the settings from the environment (see `Settings.from_env`)::

    SUMMER_CHALLENGE_DATABASE_URL=postgresql://localhost/summer \\
    STRAVA_CLIENT_ID=... STRAVA_CLIENT_SECRET=... \\
    koban start --app koban.examples.summer_challenge.jobs:app

Every night at 00:00 Europe/Warsaw the cron entry inserts one `SyncAllWorker` job, which fans
out one `SyncAthleteWorker` job per athlete.
"""

from __future__ import annotations

from typing import Any

import koban
from koban.backoff import exponential
from koban.errors import ConfigurationError
from koban.examples.summer_challenge.settings import Settings
from koban.examples.summer_challenge.store import Store
from koban.examples.summer_challenge.strava import RateLimited, RefreshRejected, StravaClient
from koban.examples.summer_challenge.sync import sync_athlete

#: Completed jobs are kept this long (as the original configuration did), then pruned.
PRUNE_AFTER = 60 * 86400
NIGHTLY = "0 0 * * *"
TIMEZONE = "Europe/Warsaw"

# Workers are module-level classes (their stored name is their import path); the settings
# they read belong to the app built last in this process, as does their `app`.
_settings: Settings | None = None


def current_settings() -> Settings:
    """The settings of the app `create_app` built; raises if there is none yet."""
    if _settings is None:
        raise ConfigurationError(
            "the Summer Challenge workers have no settings: build the app with "
            "koban.examples.summer_challenge.create_app(...) before running its jobs"
        )
    return _settings


def _app(worker: type[koban.Worker]) -> koban.Koban:
    if worker.app is None:
        raise ConfigurationError(f"{worker.__name__} is not registered: call create_app() first")
    return worker.app


class SyncAllWorker(koban.Worker):
    """The nightly sync: one `SyncAthleteWorker` job per connected athlete.

    Unique for an hour, so a second trigger (a retried cron insert, an impatient operator)
    inside the hour returns the job that already exists.
    """

    queue = "default"
    max_attempts = 3
    unique = koban.Unique(period=3600)
    tags = ("strava", "nightly")

    def perform(self, job: koban.Job) -> None:
        store = Store(current_settings().database_url)
        app = _app(SyncAllWorker)
        athlete_ids = store.athlete_ids()
        # One round trip; per-athlete uniqueness makes a retried fan-out insert nothing new.
        app.enqueue_many([SyncAthleteWorker.new({"athlete_id": a}) for a in athlete_ids])


class SyncAthleteWorker(koban.Worker):
    """Sync one athlete's new activities from Strava.

    Outcomes: Strava down or erroring → the attempt fails and is retried with backoff (3
    attempts); rate limit used up → snoozed until the window resets (no attempt used); access
    token expired → refreshed on the way; refresh token refused → discarded with a reason
    (the athlete must reconnect); athlete gone → cancelled.
    """

    queue = "default"
    max_attempts = 3
    unique = koban.Unique(period=3600, keys=("athlete_id",))
    tags = ("strava",)
    timeout = 600.0

    def perform(self, job: koban.Job) -> Any:
        settings = current_settings()
        clock = _app(SyncAthleteWorker).clock
        athlete_id = int(job.args["athlete_id"])
        store = Store(settings.database_url)
        athlete = store.get_athlete(athlete_id)
        if athlete is None:
            return koban.Cancel(f"athlete {athlete_id} is no longer in the challenge")
        with StravaClient(
            settings.strava_url,
            client_id=settings.client_id,
            client_secret=settings.client_secret,
            clock=clock,
        ) as strava:
            try:
                sync_athlete(
                    store,
                    strava,
                    athlete,
                    per_page=settings.per_page,
                    now=clock.now,
                    should_stop=lambda: job.cancelled,
                )
            except RateLimited as exc:
                # Not the job's fault: wait for the window to reset without using an attempt.
                return koban.Snooze(max(1.0, (exc.resets_at - clock.now()).total_seconds()))
            except RefreshRejected as exc:
                return koban.Discard(
                    f"athlete {athlete_id}: Strava refused the refresh token ({exc}); "
                    "the athlete has to connect Strava again"
                )
        return None

    def backoff(self, job: koban.Job) -> float:
        return exponential(job.attempt, base=current_settings().retry_base)


def create_app(
    settings: Settings | None = None,
    *,
    clock: koban.Clock | None = None,
    node: str | None = None,
    **options: Any,
) -> koban.Koban:
    """The koban app for the Summer Challenge: queue `default` with 10 slots, both workers,
    the nightly cron entry and 60-day pruning of completed jobs.

    Settings default to `Settings.from_env()`; extra keyword arguments go to `koban.Koban`.
    """
    global _settings
    settings = settings or Settings.from_env()
    _settings = settings
    app = koban.Koban(
        settings.database_url,
        queues={"default": 10},
        clock=clock,
        node=node,
        # The nightly sync. If every node is down at midnight, the first node to start inserts
        # the missed run (catch_up="latest": one run for the missed period).
        cron=[koban.Cron(NIGHTLY, SyncAllWorker, timezone=TIMEZONE, catch_up="latest")],
        plugins=[
            koban.Pruner(max_age=PRUNE_AFTER),
            koban.Lifeline(rescue_after=settings.rescue_after),
            *options.pop("plugins", ()),
        ],
        **options,
    )
    app.worker(SyncAllWorker)
    app.worker(SyncAthleteWorker)
    return app


def setup(app: koban.Koban) -> Store:
    """Create koban's tables and the app's own (both safe to run again); return the store."""
    app.migrate()
    store = Store(current_settings().database_url)
    store.create_tables()
    return store


_default_app: koban.Koban | None = None


def __getattr__(name: str) -> Any:
    # `app` is built on first use, from the environment, so importing the workers (as a node
    # does) never needs settings it does not use.
    global _default_app
    if name == "app":
        if _default_app is None:
            _default_app = create_app()
        return _default_app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
