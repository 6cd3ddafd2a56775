"""`koban demo`: the Summer Challenge nightly sync, end to end, on this machine, in seconds.

It starts the local Strava stand-in, creates a fresh SQLite database (in a new temporary
directory, kept afterwards so you can inspect it), connects the stand-in's athletes, starts a
koban node in this process, triggers the nightly sync (twice: the second trigger hits the
unique rule), lets one athlete's sync fail once and recover on retry, shows progress, and
prints a summary. Nothing touches the internet.
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

import koban
from koban.engines.base import JobFilter, redact
from koban.examples.summer_challenge.jobs import (
    SyncAllWorker,
    SyncAthleteWorker,
    create_app,
    setup,
)
from koban.examples.summer_challenge.settings import Settings
from koban.examples.summer_challenge.standin import CLIENT_ID, CLIENT_SECRET, StravaStandIn
from koban.examples.summer_challenge.store import Athlete, Store
from koban.job import FINISHED_STATES, JobState
from koban.worker import worker_name

#: The demo gives up after this many seconds (it normally needs well under ten).
DEADLINE = 50.0
WORKERS = [worker_name(SyncAllWorker), worker_name(SyncAthleteWorker)]
APP_PATH = "koban.examples.summer_challenge.jobs:app"


@dataclass
class DemoResult:
    ok: bool
    database_url: str
    jobs_by_state: dict[str, int] = field(default_factory=dict)
    activities: int = 0
    expected_activities: int = 0
    failed_attempts: int = 0
    refreshed_tokens: int = 0
    elapsed: float = 0.0
    problem: str = ""


def default_database() -> str:
    """A fresh SQLite file in a new temporary directory."""
    folder = Path(tempfile.mkdtemp(prefix="koban-demo-"))
    return f"sqlite:///{folder / 'koban-demo.db'}"


def run_demo(
    database: str | None = None,
    *,
    athletes: int = 12,
    console: Console | None = None,
    commands: Sequence[str] = (),
    dashboard_url: str | None = None,
) -> int:
    """Run the demo and print its summary; returns the process exit code (0: all synced).

    `commands` are the koban CLI commands installed, so the summary suggests only real ones.
    """
    console = console or Console()
    if not console.is_terminal:
        # Piped or captured output: wide enough that progress and commands are not cut.
        console.width = max(console.width, 120)
    url = database or default_database()
    result = asyncio.run(_demo(url, athletes, console))
    _summary(console, result, set(commands), dashboard_url)
    return 0 if result.ok else 1


async def _demo(url: str, athletes: int, console: Console) -> DemoResult:
    started = time.monotonic()
    console.rule("[bold]koban demo[/]: the Summer Challenge nightly Strava sync")
    with StravaStandIn(athletes=athletes, activities=(20, 60), expired=3) as strava:
        settings = Settings(
            database_url=url,
            strava_url=strava.url,
            client_id=CLIENT_ID,
            client_secret=CLIENT_SECRET,
            per_page=25,
            # Demo-sized backoff: the retry comes after ~3 s instead of koban's ~17 s.
            retry_base=1.0,
        )
        app = create_app(settings, shutdown_grace=5.0)
        store = await asyncio.to_thread(_prepare, app, strava)
        console.print(f"[green]✓[/] database      {redact(url)}")
        console.print(
            f"[green]✓[/] Strava stand-in {strava.url}: {athletes} athletes, "
            f"{strava.total_activities} activities (3 with expired access tokens)"
        )
        flaky = strava.athletes[athletes // 2]
        strava.fail("error", times=1, athlete_id=flaky.id)
        console.print(
            f"[yellow]![/] Strava will answer HTTP 500 to {flaky.name}'s first request: "
            "that sync fails once and is retried"
        )
        result = DemoResult(ok=False, database_url=url, expected_activities=strava.total_activities)
        _watch(app, console)
        await app.start()
        try:
            nightly = await SyncAllWorker.aenqueue({})
            again = await SyncAllWorker.aenqueue({})
            console.print(
                f"[green]✓[/] node started; nightly sync triggered as job #{nightly.id} "
                f"(what the 00:00 Europe/Warsaw cron entry inserts)"
            )
            if again.conflict:
                console.print(
                    f"[green]✓[/] a second trigger returned the same job #{again.id}: "
                    "unique for an hour"
                )
            result.problem = await _progress(app, store, athletes, strava.total_activities, console)
        finally:
            await app.close()
        jobs = await asyncio.to_thread(app.list_jobs, JobFilter(workers=WORKERS))
        result.jobs_by_state = dict(Counter(str(j.state) for j in jobs))
        # Cancel and Discard reasons are recorded as errors too; only count real failures.
        result.failed_attempts = sum(
            1
            for j in jobs
            for e in j.errors
            if e.get("type") not in ("koban.Cancel", "koban.Discard")
        )
        result.activities = await asyncio.to_thread(store.count_activities)
        result.refreshed_tokens = sum(strava.refreshes.values())
        result.elapsed = time.monotonic() - started
        done = result.jobs_by_state.get("completed", 0)
        if not result.problem and done != athletes + 1:
            result.problem = f"{done} of {athletes + 1} jobs completed"
        if not result.problem and result.activities != result.expected_activities:
            result.problem = (
                f"{result.activities} activities stored, {result.expected_activities} expected"
            )
        result.ok = not result.problem
        app.engine.close_sync()
        return result


def _prepare(app: koban.Koban, strava: StravaStandIn) -> Store:
    """Migrate, empty the demo's tables and jobs, and connect every stand-in athlete."""
    store = setup(app)
    store.clear()
    app.delete_jobs(JobFilter(workers=WORKERS))
    for a in strava.athletes:
        store.upsert_athlete(Athlete(a.id, a.name, a.access_token, a.refresh_token, a.expires_at))
    return store


def _watch(app: koban.Koban, console: Console) -> None:
    """Print a line for each failed attempt, as a log subscriber would."""

    def failed(event: str, data: dict[str, Any]) -> None:
        job = data["job"]
        if data.get("state") == "retryable":
            kind, _, message = str(data.get("error", "")).partition(": ")
            console.print(
                f"[red]✗[/] job #{job.id} {job.worker.rsplit('.', 1)[-1]} {job.args}: "
                f"attempt {job.attempt} of {job.max_attempts} failed with "
                f"{kind.rsplit('.', 1)[-1]} ({message[:80]}); retried after a backoff"
            )

    app.telemetry.subscribe("job:exception", failed)


async def _progress(
    app: koban.Koban, store: Store, athletes: int, expected: int, console: Console
) -> str:
    """Show progress until every sync job finished; return a problem, or "" if none."""
    columns = (
        TextColumn("[bold blue]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[detail]}"),
        TimeElapsedColumn(),
    )
    deadline = time.monotonic() + DEADLINE
    with Progress(*columns, console=console) as progress:
        syncs = progress.add_task("athletes synced", total=athletes, detail="")
        stored = progress.add_task("activities", total=expected, detail="")
        while True:
            jobs = await app.alist_jobs(JobFilter(workers=WORKERS))
            states = Counter(j.state for j in jobs if j.worker == WORKERS[1])
            retries = sum(len(j.errors) for j in jobs)
            activities = await asyncio.to_thread(store.count_activities)
            progress.update(
                syncs,
                completed=states[JobState.COMPLETED],
                detail=f"running {states[JobState.EXECUTING]}, waiting to retry "
                f"{states[JobState.RETRYABLE]}, failed attempts {retries}",
            )
            progress.update(stored, completed=activities)
            finished = [j for j in jobs if j.state in FINISHED_STATES]
            if len(jobs) == athletes + 1 and len(finished) == len(jobs):
                return ""
            if time.monotonic() > deadline:
                return f"not finished after {DEADLINE:.0f} s"
            await asyncio.sleep(0.2)


def _summary(
    console: Console, result: DemoResult, commands: set[str], dashboard_url: str | None
) -> None:
    table = Table(title="Summary", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    states = ", ".join(f"{state} {n}" for state, n in sorted(result.jobs_by_state.items()))
    table.add_row("jobs by state", states or "none")
    table.add_row("activities synced", f"{result.activities} of {result.expected_activities}")
    table.add_row("failed attempts retried", str(result.failed_attempts))
    table.add_row("tokens refreshed", str(result.refreshed_tokens))
    table.add_row("elapsed", f"{result.elapsed:.1f} s")
    console.print(table)
    if result.ok:
        console.print(
            "[bold green]Demo finished: every athlete synced, nothing lost, nothing doubled.[/]"
        )
    else:
        console.print(f"[bold red]Demo failed: {result.problem}[/]")
    db = result.database_url
    console.print("\n[bold]Where to look next[/]")
    lines = []
    if "jobs" in commands:
        lines.append(f"koban jobs list --database {db}")
    if "stats" in commands:
        lines.append(f"koban stats --database {db}")
    if "dashboard" in commands:
        lines.append(
            f"koban dashboard --database {db}"
            + (f"    (then open {dashboard_url})" if dashboard_url else "")
        )
    app_env = f"SUMMER_CHALLENGE_DATABASE_URL={db}"
    if "cron" in commands:
        lines.append(f"{app_env} koban cron list --app {APP_PATH}")
    lines.append(f"{app_env} koban start --app {APP_PATH}")
    for line in lines:
        console.print(f"  {line}", soft_wrap=True, highlight=False, markup=False)
    console.print(f"  The example's code and README: {Path(__file__).parent}", soft_wrap=True)
