"""`koban cron list`: every entry, its next run in its own zone and in UTC, its last tick."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import UTC, datetime

import koban
from helpers import TESTS_DIR, subprocess_env


def koban_cli(url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "koban.cli", *args],
        env=subprocess_env(url),
        cwd=str(TESTS_DIR),
        capture_output=True,
        text=True,
        timeout=60,
    )


async def test_cron_list(db_url: str) -> None:
    listed = koban_cli(db_url, "cron", "list", "--app", "cluster.cronapp:app")
    assert listed.returncode == 0, listed.stderr
    header, nightly, reboot = listed.stdout.splitlines()
    assert header.split()[:3] == ["ENTRY", "SCHEDULE", "ZONE"]
    assert "nightly sync" in nightly and "Europe/Warsaw" in nightly and "never" in nightly
    assert "CET" in nightly or "CEST" in nightly
    assert "at cluster start" in reboot

    # Once a tick has been handled, it is listed as the last one.
    entry = koban.Cron("0 0 * * *", "x.y", timezone="Europe/Warsaw", name="nightly sync")
    tick = datetime(2030, 1, 1, 23, 0, tzinfo=UTC)
    app = koban.Koban(db_url)
    await app.open()
    try:
        await app.engine.insert_cron_jobs(entry.name, entry.signature, lambda rec: ([], tick))
    finally:
        await app.close()
    listed = koban_cli(db_url, "cron", "list", "--app", "cluster.cronapp:app", "--json")
    assert listed.returncode == 0, listed.stderr
    by_name = {e["name"]: e for e in json.loads(listed.stdout)}
    assert by_name["nightly sync"]["last_tick"].startswith("2030-01-01 23:00:00")
    assert by_name["nightly sync"]["next_run"].endswith(("00:00:00+01:00", "00:00:00+02:00"))
    assert by_name["warm up"]["next_run"] is None and by_name["warm up"]["last_tick"] is None


def test_cron_list_needs_an_app(db_url: str) -> None:
    listed = koban_cli(db_url, "cron", "list")
    assert listed.returncode == 2
    assert "--app" in listed.stderr
