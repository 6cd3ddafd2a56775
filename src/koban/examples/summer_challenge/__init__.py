"""Summer Challenge: a nightly Strava sync, the scenario koban was built for.

Athletes connect Strava; every night at midnight (Europe/Warsaw) `SyncAllWorker` fans out one
`SyncAthleteWorker` job per athlete, which pages through the athlete's new activities and
upserts them into the app's database. See README.md in this folder.

>>> from koban.examples.summer_challenge import Settings, create_app
>>> app = create_app(Settings(database_url="sqlite:///summer.db", strava_url="http://127.0.0.1:8080"))
>>> app.migrate()
"""

from koban.examples.summer_challenge.jobs import create_app
from koban.examples.summer_challenge.settings import Settings

__all__ = ["Settings", "create_app"]
