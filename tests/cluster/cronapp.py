"""An app with cron entries, for `koban cron list --app cluster.cronapp:app` in tests."""

from __future__ import annotations

import os

import koban

app = koban.Koban(os.environ["KOBAN_DATABASE_URL"])


@app.worker
async def sync_all(job: koban.Job) -> None:
    return None


app.cron = [
    koban.Cron("0 0 * * *", sync_all, timezone="Europe/Warsaw", name="nightly sync"),
    koban.Cron("@reboot", "cluster.cronapp.sync_all", name="warm up", catch_up="none"),
]
