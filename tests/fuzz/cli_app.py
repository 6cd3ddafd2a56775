"""The app `koban --app fuzz.cli_app:app` loads in the CLI fuzz tests (database from
KOBAN_DATABASE_URL)."""

from __future__ import annotations

import os

import koban

app = koban.Koban(os.environ.get("KOBAN_DATABASE_URL"), queues={"default": 2, "mail": 1})


@app.worker(queue="mail")
def greet(job: koban.Job) -> None:
    """A worker the CLI can insert jobs for."""
