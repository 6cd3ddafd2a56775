"""The `koban` command line.

Exit codes: 0 success; 1 a job-level failure reported by a command; 2 bad usage or bad input
(unknown worker, queue, malformed URL...); 3 the database is unreachable or not migrated.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import sys
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, NoReturn

import click

from koban.app import Koban, parse_queues
from koban.engines.base import JobFilter, create_engine, redact
from koban.errors import ConfigurationError, DatabaseError, KobanError
from koban.job import Job, JobState
from koban.worker import WorkerOptions, build_job

EXIT_USAGE = 2
EXIT_DATABASE = 3

DATABASE_HELP = (
    "Database URL: postgresql://... or sqlite:///path.db "
    "(env KOBAN_DATABASE_URL; default sqlite:///koban.db)."
)


def fail(message: str, code: int = EXIT_USAGE) -> NoReturn:
    click.echo(f"koban: error: {message}", err=True)
    sys.exit(code)


def load_app(path: str) -> Koban:
    """Import `module:attribute` and return the Koban app it names."""
    module_name, sep, attr = path.partition(":")
    if not sep or not module_name or not attr:
        fail(f"--app {path!r} must look like 'package.module:app'")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        fail(f"--app {path!r}: cannot import {module_name!r}: {exc}")
    app: Any = module
    for part in attr.split("."):
        app = getattr(app, part, None)
        if app is None:
            fail(f"--app {path!r}: module {module_name!r} has no attribute {attr!r}")
    if not isinstance(app, Koban):
        fail(f"--app {path!r} is a {type(app).__name__}, not a koban.Koban application")
    return app


def resolve_url(database: str | None, app_path: str | None) -> str:
    if database:
        return database
    if app_path:
        return load_app(app_path).engine.url
    return os.environ.get("KOBAN_DATABASE_URL") or "sqlite:///koban.db"


def run_guarded(fn: Any, *args: Any, **kwargs: Any) -> Any:
    """Call `fn`, turning koban errors into one clear line and an exit code."""
    try:
        return fn(*args, **kwargs)
    except DatabaseError as exc:
        fail(str(exc), EXIT_DATABASE)
    except (ConfigurationError, KobanError) as exc:
        fail(str(exc))


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="koban")
def main() -> None:
    """koban: reliable background jobs stored in PostgreSQL or SQLite."""


@main.command()
@click.option("--database", "-d", help=DATABASE_HELP)
@click.option("--app", "app_path", help="Take the database from this app (module:attribute).")
@click.option("--status", is_flag=True, help="Print the schema version instead of migrating.")
@click.option(
    "--sql", "print_sql", is_flag=True, help="Print the migration SQL for your own migration tool."
)
def migrate(database: str | None, app_path: str | None, status: bool, print_sql: bool) -> None:
    """Create or upgrade koban's tables (safe to run again)."""
    url = resolve_url(database, app_path)
    engine = run_guarded(create_engine, url)
    if print_sql:
        click.echo(type(engine).migration_sql(), nl=False)
        return
    if status:
        st = run_guarded(engine.migration_status)
        current = st.current if st.current is not None else "none"
        state = "up to date" if st.up_to_date else "needs `koban migrate`"
        click.echo(f"{redact(url)}: schema version {current} (latest {st.latest}): {state}")
        return
    applied = run_guarded(engine.migrate)
    if applied:
        click.echo(f"{redact(url)}: applied migration(s) {', '.join(map(str, applied))}")
    else:
        click.echo(f"{redact(url)}: already up to date")


@main.command()
@click.option("--app", "app_path", required=True, help="The app to run, as module:attribute.")
@click.option("--queues", "-q", help="Override queues, e.g. default=10,mailers=2.")
@click.option("--node", "-n", help="Node name (default host.pid).")
@click.option(
    "--processes",
    type=click.IntRange(min=1),
    help="Worker processes for executor='process' jobs (default: the app's, one per CPU).",
)
@click.option("--log-level", default="INFO", show_default=True)
@click.option(
    "--metrics-port",
    type=click.IntRange(1, 65535),
    help="Serve Prometheus metrics on this port (needs the prometheus extra).",
)
@click.option("--metrics-addr", default="0.0.0.0", show_default=True, help="Address for metrics.")
@click.option(
    "--metrics-interval",
    type=click.FloatRange(min=0.1),
    default=15.0,
    show_default=True,
    help="Seconds between reads of job counts and nodes for the metrics.",
)
def start(
    app_path: str,
    queues: str | None,
    node: str | None,
    processes: int | None,
    log_level: str,
    metrics_port: int | None,
    metrics_addr: str,
    metrics_interval: float,
) -> None:
    """Run a node: fetch and run jobs until SIGTERM or SIGINT."""
    logging.basicConfig(
        level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    app = load_app(app_path)
    queue_map = run_guarded(parse_queues, queues) if queues else None
    if processes is not None:
        app.processes = processes
    from koban.telemetry import JobLogger

    JobLogger().attach(app.telemetry)
    if metrics_port is not None:
        _serve_metrics(app, metrics_port, metrics_addr, metrics_interval)
    run_guarded(app.run, queues=queue_map, node=node)


def _serve_metrics(app: Koban, port: int, addr: str, interval: float) -> None:
    try:
        from koban.contrib.prometheus import PrometheusMetrics
    except ImportError:
        fail("--metrics-port needs the prometheus extra: pip install 'koban[prometheus]'")
    metrics = PrometheusMetrics()
    metrics.attach(app.telemetry)
    app.extra_plugins.append(metrics.plugin(app, interval))
    try:
        metrics.serve(port, addr)
    except OSError as exc:
        fail(f"--metrics-port {port}: cannot listen on {addr}:{port} ({exc.strerror or exc})")


@main.command()
@click.option(
    "--database",
    "-d",
    help="Run on this database instead of a fresh SQLite file in a new temporary directory.",
)
@click.option("--athletes", default=12, show_default=True, type=click.IntRange(2, 200))
def demo(database: str | None, athletes: int) -> None:
    """Run the Summer Challenge nightly Strava sync end to end, against a local stand-in."""
    try:
        from koban.examples.summer_challenge.demo import run_demo
    except ImportError as exc:
        fail(f"the demo needs koban's demo extra ({exc}); run: pip install 'koban[demo]'")
    dashboard_url = None
    dashboard = main.commands.get("dashboard")
    if dashboard is not None:
        defaults = {p.name: p.default for p in dashboard.params}
        if isinstance(defaults.get("port"), int):
            dashboard_url = f"http://{defaults.get('host') or '127.0.0.1'}:{defaults['port']}/"
    code = run_guarded(
        run_demo,
        database,
        athletes=athletes,
        commands=sorted(main.commands),
        dashboard_url=dashboard_url,
    )
    sys.exit(code)


# ----- operating a cluster: jobs, queues, nodes, stats, dashboard ------------------------------
# Every command takes --database or --app, prints a table for people or JSON with --json, and
# exits with the codes listed at the top of this module.

EXIT_JOB = 1


def _database_options(fn: Any) -> Any:
    fn = click.option(
        "--app", "app_path", help="Take the database and workers from this app (module:attribute)."
    )(fn)
    return click.option("--database", "-d", help=DATABASE_HELP)(fn)


def _json_option(fn: Any) -> Any:
    return click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")(fn)


def _ops_app(database: str | None, app_path: str | None) -> tuple[Koban, bool]:
    """The app to operate on, and whether its worker registry and queues are known."""
    if app_path:
        loaded = load_app(app_path)
        if not database:
            return loaded, True
        app = run_guarded(Koban, database, queues=loaded.queues)
        app.workers = loaded.workers
        return app, True
    return run_guarded(Koban, resolve_url(database, None)), False


def _run_async(app: Koban, fn: Any) -> Any:
    """Run `fn()` (a coroutine function) with the app opened for async use, then close it."""
    import asyncio

    async def body() -> Any:
        try:
            await app.open()
            return await fn()
        finally:
            await app.close()

    return run_guarded(asyncio.run, body())


def _print_json(value: Any) -> None:
    click.echo(json.dumps(value, indent=2, default=str, ensure_ascii=False))


def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain aligned text table."""
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [len(h) for h in headers]
    for row in cells:
        widths = [max(w, len(c)) for w, c in zip(widths, row, strict=True)]
    lines = ["  ".join(h.upper().ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()]
    for row in cells:
        lines.append("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, datetime):
        return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")
    if isinstance(value, bool):
        return "yes" if value else "no"
    text = str(value).replace("\n", " ")
    return text if len(text) <= 60 else text[:57] + "..."


def _parse_time(value: str | None, option: str) -> datetime | None:
    """An ISO 8601 time (UTC if no offset) or an age such as 30s, 15m, 2h or 7d."""
    if value is None:
        return None
    text = value.strip()
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    if text[-1:].lower() in units and text[:-1].replace(".", "", 1).isdecimal():
        try:
            age = timedelta(seconds=float(text[:-1]) * units[text[-1].lower()])
            return datetime.now(UTC) - age
        except OverflowError:
            fail(f"{option} {value!r} is further back than any date; use a smaller age")
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        fail(
            f"{option} {value!r} is not a time; "
            "use ISO 8601 (2026-07-01T12:00) or an age (15m, 2h, 7d)"
        )
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def _queue_known(app: Koban, queue: str) -> bool:
    """True if the app, a node, a runtime setting or a job of the cluster mentions `queue`."""
    if queue in app.queues:
        return True
    try:
        if queue in app.engine.queue_settings_sync():
            return True
        if any(queue in n.queues for n in app.engine.list_nodes_sync()):
            return True
    except NotImplementedError:
        pass
    return bool(app.list_jobs(JobFilter(queues=[queue], limit=1)))


def _check_queues(app: Koban, queues: Sequence[str]) -> None:
    for queue in queues:
        if not _queue_known(app, queue):
            known = ", ".join(sorted(app.queues)) if app.queues else "none"
            fail(
                f"unknown queue {queue!r}: no node runs it, no setting names it and no job is in "
                f"it (configured queues: {known}); check the spelling"
            )


def _check_workers(app: Koban, workers: Sequence[str], has_registry: bool) -> None:
    for worker in workers:
        if worker in app.workers or app.list_jobs(JobFilter(workers=[worker], limit=1)):
            continue
        if has_registry:
            known = ", ".join(sorted(app.workers)) or "none registered"
            fail(f"unknown worker {worker!r}: the app registers {known}")
        fail(
            f"unknown worker {worker!r}: no job of that worker is in the database; pass "
            "--app module:app so koban can check its registry"
        )


def _filter_options(fn: Any) -> Any:
    options = [
        click.option(
            "--state",
            "states",
            multiple=True,
            type=click.Choice([str(s) for s in JobState]),
            help="Only jobs in this state (repeatable).",
        ),
        click.option(
            "--queue", "-q", "queues", multiple=True, help="Only jobs of this queue (repeatable)."
        ),
        click.option(
            "--worker",
            "-w",
            "workers",
            multiple=True,
            help="Only jobs of this worker (repeatable).",
        ),
        click.option(
            "--tag",
            "tags",
            multiple=True,
            help="Only jobs carrying this tag (repeatable: all of them).",
        ),
        click.option("--args-text", help="Only jobs whose JSON args contain this text."),
        click.option(
            "--inserted-before",
            help="Only jobs inserted before this time or age (ISO 8601, or 15m, 2h, 7d).",
        ),
        click.option("--inserted-after", help="Only jobs inserted after this time or age."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def _build_filter(app: Koban, has_registry: bool, ids: Sequence[int] = (), **f: Any) -> JobFilter:
    _check_queues(app, f["queues"])
    _check_workers(app, f["workers"], has_registry)
    return JobFilter(
        ids=list(ids) or None,
        states=list(f["states"]) or None,
        queues=list(f["queues"]) or None,
        workers=list(f["workers"]) or None,
        tags=list(f["tags"]) or None,
        args_text=f["args_text"] or None,
        inserted_before=_parse_time(f["inserted_before"], "--inserted-before"),
        inserted_after=_parse_time(f["inserted_after"], "--inserted-after"),
    )


def _job_rows(jobs: Sequence[Job]) -> str:
    return _table(
        ["id", "state", "queue", "worker", "attempt", "inserted", "scheduled", "args"],
        [
            (
                j.id, j.state, j.queue, j.worker, f"{j.attempt}/{j.max_attempts}",
                j.inserted_at, j.scheduled_at, json.dumps(j.args, ensure_ascii=False),
            )
            for j in jobs
        ],
    )  # fmt: skip


@main.group()
def jobs() -> None:
    """Insert, list, inspect, retry, cancel and delete jobs."""


@jobs.command("insert")
@click.argument("worker")
@click.option(
    "--args", "args_json", default="{}", show_default=True, help="The job's args as a JSON object."
)
@click.option("--queue", "-q", help="Queue (default: the worker's).")
@click.option("--priority", "-p", type=int, help="0 (runs first) to 9.")
@click.option("--schedule-in", type=float, help="Seconds from now before the job may run.")
@click.option("--max-attempts", type=int, help="Attempts before the job is discarded.")
@click.option("--tag", "tags", multiple=True, help="Tag the job (repeatable).")
@_database_options
@_json_option
def jobs_insert(
    worker: str,
    args_json: str,
    queue: str | None,
    priority: int | None,
    schedule_in: float | None,
    max_attempts: int | None,
    tags: tuple[str, ...],
    database: str | None,
    app_path: str | None,
    as_json: bool,
) -> None:
    """Insert a job for WORKER now, as an operator would from a console."""
    try:
        args = json.loads(args_json)
    except json.JSONDecodeError as exc:
        fail(f"--args is not valid JSON ({exc}); pass an object such as '{{\"user_id\": 7}}'")
    app, has_registry = _ops_app(database, app_path)
    try:
        if has_registry:
            entry = run_guarded(app.resolve_worker, worker)
            new = entry.target.new
        else:
            _check_workers(app, [worker], has_registry=False)

            def new(args: Any, **options: Any) -> Job:
                return build_job(worker, WorkerOptions(), args, **options)

        if queue is not None:
            _check_queues(app, [queue])
        options: dict[str, Any] = {
            "queue": queue,
            "priority": priority,
            "max_attempts": max_attempts,
        }
        if tags:
            options["tags"] = list(tags)
        job = run_guarded(app.enqueue, run_guarded(new, args, schedule_in=schedule_in, **options))
    finally:
        app.engine.close_sync()
    if as_json:
        _print_json(job.to_dict())
    elif job.conflict:
        click.echo(f"job {job.id} already exists for {worker} (unique); nothing inserted")
    else:
        click.echo(f"inserted job {job.id} ({job.worker}) into queue {job.queue!r}: {job.state}")


@jobs.command("list")
@_filter_options
@click.option("--before-id", type=int, help="Only jobs older than this id (the next page).")
@click.option("--limit", "-n", type=click.IntRange(1, 10_000), default=50, show_default=True)
@_database_options
@_json_option
def jobs_list(
    before_id: int | None,
    limit: int,
    database: str | None,
    app_path: str | None,
    as_json: bool,
    **f: Any,
) -> None:
    """List jobs, newest first."""
    app, has_registry = _ops_app(database, app_path)
    try:
        flt = run_guarded(_build_filter, app, has_registry, **f)
        flt.before_id = before_id
        flt.limit = limit
        found = run_guarded(app.list_jobs, flt)
    finally:
        app.engine.close_sync()
    if as_json:
        _print_json([j.to_dict() for j in found])
        return
    if not found:
        click.echo("no jobs match")
        return
    click.echo(_job_rows(found))
    if len(found) == limit:
        click.echo(f"(more: --before-id {found[-1].id})")


@jobs.command("show")
@click.argument("job_id", type=int)
@_database_options
@_json_option
def jobs_show(job_id: int, database: str | None, app_path: str | None, as_json: bool) -> None:
    """Everything about one job: args, meta, each attempt's error and traceback."""
    app, _ = _ops_app(database, app_path)
    try:
        job = run_guarded(app.get_job, job_id)
    finally:
        app.engine.close_sync()
    if job is None:
        fail(f"job {job_id} not found (it may have been pruned or deleted)", EXIT_JOB)
    if as_json:
        _print_json(job.to_dict())
        return
    fields = [
        ("id", job.id), ("state", job.state), ("worker", job.worker), ("queue", job.queue),
        ("priority", job.priority), ("attempt", f"{job.attempt} of {job.max_attempts}"),
        ("tags", ", ".join(job.tags) or None), ("inserted", job.inserted_at),
        ("scheduled", job.scheduled_at), ("attempted", job.attempted_at),
        ("attempted by", " ".join(job.attempted_by or []) or None),
        ("completed", job.completed_at), ("cancelled", job.cancelled_at),
        ("discarded", job.discarded_at), ("unique key", job.unique_key),
    ]  # fmt: skip
    for name, value in fields:
        click.echo(f"{name + ':':<14}{_cell(value) if not isinstance(value, str) else value}")
    click.echo("args:\n" + _indent(json.dumps(job.args, indent=2, ensure_ascii=False)))
    click.echo("meta:\n" + _indent(json.dumps(job.meta, indent=2, ensure_ascii=False)))
    for error in job.errors:
        click.echo(
            f"error (attempt {error.get('attempt')}, {error.get('at')}): "
            f"{error.get('type')}: {error.get('message')}"
        )
        if error.get("traceback"):
            click.echo(_indent(str(error["traceback"]).rstrip()))


def _indent(text: str) -> str:
    return "\n".join("  " + line for line in text.splitlines())


def _bulk_command(action: str, doc: str) -> None:
    """Register `koban jobs retry|cancel|delete`: by ids, or by filters with confirmation."""

    @jobs.command(action, help=doc)
    @click.argument("job_ids", type=int, nargs=-1)
    @_filter_options
    @click.option(
        "--yes", "-y", is_flag=True, help="Do not ask before acting on every job a filter matches."
    )
    @_database_options
    @_json_option
    def command(
        job_ids: tuple[int, ...],
        yes: bool,
        database: str | None,
        app_path: str | None,
        as_json: bool,
        **f: Any,
    ) -> None:
        has_filter = any(f.values())
        if not job_ids and not has_filter:
            fail(f"give job ids or at least one filter; `koban jobs {action} --help` lists them")
        app, has_registry = _ops_app(database, app_path)
        try:
            flt = run_guarded(_build_filter, app, has_registry, job_ids, **f)
            if not job_ids and not yes:
                # Count only the jobs the action applies to, so the question is the truth.
                eligible = _ACTION_STATES[action]
                states = [JobState(s) for s in flt.states] if flt.states else list(JobState)
                states = [s for s in states if s in eligible]
                count = 0
                if states:
                    counted = JobFilter(**{**_fields(flt), "states": states, "limit": 10_001})
                    count = len(run_guarded(app.list_jobs, counted))
                if count == 0:
                    click.echo(f"no job matches: nothing to {action}", err=True)
                    if as_json:
                        _print_json({"action": action, "job_ids": []})
                    return
                shown = "more than 10000" if count > 10_000 else str(count)
                click.confirm(f"{action} {shown} matching job(s)?", abort=True, err=True)
            method = getattr(app, f"{action}_jobs")
            done = run_guarded(method, flt)
        finally:
            app.engine.close_sync()
        done_ids = sorted(done if action == "delete" else [j.id for j in done])
        if as_json:
            _print_json({"action": action, "job_ids": done_ids})
        else:
            past = {"retry": "retried", "cancel": "cancelled", "delete": "deleted"}[action]
            click.echo(
                f"{past} {len(done_ids)} job(s)"
                + (f": {', '.join(map(str, done_ids))}" if done_ids else "")
            )
        missed = sorted(set(job_ids) - set(done_ids))
        if missed:
            why = {
                "retry": "missing, executing or already available",
                "cancel": "missing or already finished",
                "delete": "missing or executing (cancel it first)",
            }[action]
            fail(f"not {action}: job(s) {', '.join(map(str, missed))} ({why})", EXIT_JOB)


#: The states each bulk action changes (see the engines' cancel/retry/delete statements).
_ACTION_STATES = {
    "cancel": {JobState.AVAILABLE, JobState.SCHEDULED, JobState.EXECUTING, JobState.RETRYABLE},
    "retry": {
        JobState.SCHEDULED,
        JobState.RETRYABLE,
        JobState.COMPLETED,
        JobState.DISCARDED,
        JobState.CANCELLED,
    },
    "delete": set(JobState) - {JobState.EXECUTING},
}


def _fields(flt: JobFilter) -> dict[str, Any]:
    return {name: getattr(flt, name) for name in JobFilter.__slots__}


_bulk_command("retry", "Run jobs again now (one more attempt if they used all theirs).")
_bulk_command("cancel", "Cancel jobs that have not finished; running ones are stopped.")
_bulk_command("delete", "Delete jobs that are not executing.")


@main.command()
@_database_options
@_json_option
def stats(database: str | None, app_path: str | None, as_json: bool) -> None:
    """Jobs per queue and state, and what finished in the last hour."""
    from koban.web.stats import STATES, job_counts, throughput

    app, _ = _ops_app(database, app_path)

    async def gather() -> Any:
        return await job_counts(app), await throughput(app, 60)

    counts, minutes = _run_async(app, gather)
    hour = {
        "completed": sum(m.completed for m in minutes),
        "failed": sum(m.failed for m in minutes),
    }
    if as_json:
        _print_json({"queues": counts.by_queue, "exact": counts.exact, "last_hour": hour})
        return
    rows = [[queue, *(c[s] for s in STATES)] for queue, c in counts.by_queue.items()]
    rows.append(["(all)", *(counts.total(s) for s in STATES)])
    click.echo(_table(["queue", *STATES], rows))
    if not counts.exact:
        click.echo("(estimated: the jobs table is large)")
    click.echo(f"last hour: {hour['completed']} completed, {hour['failed']} failed attempts")


def _age(then: datetime | None) -> str:
    if then is None:
        return "-"
    seconds = (datetime.now(UTC) - then).total_seconds()
    if seconds < 120:
        return f"{seconds:.0f}s ago"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m ago"
    return f"{seconds / 3600:.1f}h ago"


async def _queue_report(app: Koban) -> list[dict[str, Any]]:
    """Each queue's cluster-wide settings, its job counts and what live nodes run of it."""
    from koban.web.stats import job_counts

    try:
        settings = await app.engine.queue_settings()
        nodes = await app.engine.list_nodes()
    except NotImplementedError:
        settings, nodes = {}, []
    counts = await job_counts(app, list(settings))
    names = sorted(set(counts.by_queue) | set(settings) | {q for n in nodes for q in n.queues})
    report = []
    for name in names:
        setting = settings.get(name)
        on_nodes = [n.queues[name] for n in nodes if name in n.queues]
        report.append({
            "queue": name,
            "paused": bool(setting and setting.paused),
            "limit": setting.limit if setting else None,
            "nodes": len(on_nodes),
            "paused_nodes": sum(1 for q in on_nodes if isinstance(q, dict) and q.get("paused")),
            "running": sum(int(q.get("running") or 0) for q in on_nodes if isinstance(q, dict)),
            "counts": counts.by_queue.get(name, {}),
            "exact": counts.exact,
        })  # fmt: skip
    return report


@main.group(invoke_without_command=True)
@_database_options
@_json_option
@click.pass_context
def queues(ctx: click.Context, database: str | None, app_path: str | None, as_json: bool) -> None:
    """Show queues (the default), or pause, resume or scale one."""
    ctx.obj = {"database": database, "app_path": app_path}
    if ctx.invoked_subcommand is None:
        ctx.invoke(queues_status, database=database, app_path=app_path, as_json=as_json)


def _inherit(ctx: click.Context, database: str | None, app_path: str | None) -> tuple[Any, Any]:
    parent = ctx.obj or {}
    return database or parent.get("database"), app_path or parent.get("app_path")


@queues.command("status")
@_database_options
@_json_option
@click.pass_context
def queues_status(
    ctx: click.Context, database: str | None, app_path: str | None, as_json: bool
) -> None:
    """Every queue: paused or running, slot limit, nodes, running jobs and jobs by state."""
    app, _ = _ops_app(*_inherit(ctx, database, app_path))
    report = _run_async(app, lambda: _queue_report(app))
    if as_json:
        _print_json(report)
        return
    if not report:
        click.echo("no queues yet")
        return
    states = [
        "available",
        "scheduled",
        "executing",
        "retryable",
        "completed",
        "discarded",
        "cancelled",
    ]
    rows = []
    for q in report:
        status = "paused" if q["paused"] else (
            f"paused on {q['paused_nodes']} node(s)" if q["paused_nodes"] else "running"
        )  # fmt: skip
        limit = q["limit"] if q["limit"] is not None else "per node"
        rows.append(
            [
                q["queue"],
                status,
                limit,
                q["nodes"],
                q["running"],
                *(q["counts"].get(s, 0) for s in states),
            ]
        )
    click.echo(_table(["queue", "status", "limit", "nodes", "running", *states], rows))
    if report and not report[0]["exact"]:
        click.echo("(job counts are estimates: the jobs table is large)")


def _control_command(action: str, doc: str) -> None:
    """Register `koban queues pause|resume|scale`."""

    @queues.command(action, help=doc)
    @click.argument("queue")
    @click.argument("limit", required=action == "scale", default=None)
    @click.option("--node", "-n", help="Only on this node (default: every node).")
    @_database_options
    @_json_option
    @click.pass_context
    def command(
        ctx: click.Context,
        queue: str,
        limit: str | None,
        node: str | None,
        database: str | None,
        app_path: str | None,
        as_json: bool,
    ) -> None:
        if action != "scale" and limit is not None:
            fail(f"`koban queues {action}` takes one queue name, got an extra {limit!r}")
        slots: int | None = None
        if action == "scale":
            assert limit is not None
            if limit == "default":
                slots = None
            elif limit.isdecimal():
                slots = int(limit)
            else:
                fail(
                    f"scale {queue!r}: LIMIT must be a whole number of slots or 'default', "
                    f"got {limit!r}"
                )
        app, _ = _ops_app(*_inherit(ctx, database, app_path))
        try:
            _check_queues(app, [queue])
            method = getattr(app, f"{action}_queue")
            if action == "scale":
                run_guarded(method, queue, slots, node=node)
            else:
                run_guarded(method, queue, node=node)
        finally:
            app.engine.close_sync()
        where = f"on node {node}" if node else "on every node"
        if as_json:
            _print_json({"queue": queue, "action": action, "node": node, "limit": slots})
        elif action == "scale":
            shown = slots if slots is not None else "each node's configured slots"
            click.echo(f"scaled queue {queue!r} to {shown} {where}")
        else:
            click.echo(f"{action}d queue {queue!r} {where}")


_control_command("pause", "Stop fetching jobs of QUEUE; running jobs finish. Kept until resume.")
_control_command("resume", "Fetch jobs of QUEUE again.")
_control_command("scale", "Run up to LIMIT jobs of QUEUE at once per node ('default' resets).")


@main.command()
@_database_options
@_json_option
def nodes(database: str | None, app_path: str | None, as_json: bool) -> None:
    """Every registered node: its queues, heartbeat age and which one leads."""
    app, _ = _ops_app(database, app_path)
    found = _run_async(app, app.alist_nodes)
    if as_json:
        _print_json([
            {
                "name": n.name, "leader": n.leader, "started_at": n.started_at,
                "heartbeat_at": n.heartbeat_at, "queues": n.queues,
            }
            for n in found
        ])  # fmt: skip
        return
    if not found:
        click.echo("no nodes are registered")
        return
    rows = []
    for n in found:
        queues_text = " ".join(
            f"{q}={info.get('limit')}{' (paused)' if info.get('paused') else ''}"
            f"[{info.get('running', 0)} running]"
            if isinstance(info, dict) else str(q)
            for q, info in sorted(n.queues.items())
        )  # fmt: skip
        rows.append(
            [
                n.name,
                "leader" if n.leader else "",
                _age(n.started_at),
                _age(n.heartbeat_at),
                queues_text,
            ]
        )
    click.echo(_table(["node", "role", "started", "heartbeat", "queues"], rows))


@main.group()
def cron() -> None:
    """Cron entries: jobs the cluster's leader inserts on a schedule."""


@cron.command("list")
@click.option("--app", "app_path", required=True, help="The app whose cron entries to list.")
@click.option("--database", "-d", help="Read their state from this database instead.")
@_json_option
def cron_list(app_path: str, database: str | None, as_json: bool) -> None:
    """Every entry: its schedule, next run in its own time zone and in UTC, last inserted tick."""
    app, _ = _ops_app(database, app_path)
    entries = run_guarded(app.cron_entries)
    app.engine.close_sync()
    if as_json:
        _print_json([
            {
                "name": e.name, "expression": e.expression, "timezone": e.timezone,
                "worker": e.worker, "queue": e.queue, "catch_up": e.catch_up,
                "next_run": e.next_run, "next_run_utc": e.next_run_utc, "last_tick": e.last_tick,
            }
            for e in entries
        ])  # fmt: skip
        return
    if not entries:
        click.echo(f"{app_path} has no cron entries")
        return
    rows = [
        [
            e.name,
            e.expression,
            e.timezone,
            e.next_run.strftime("%Y-%m-%d %H:%M %Z") if e.next_run else "at cluster start",
            e.next_run_utc.strftime("%Y-%m-%d %H:%M UTC") if e.next_run_utc else "-",
            e.last_tick.strftime("%Y-%m-%d %H:%M UTC") if e.last_tick else "never",
            e.catch_up,
        ]
        for e in entries
    ]
    click.echo(
        _table(
            ["entry", "schedule", "zone", "next run", "next run (utc)", "last tick", "catch-up"],
            rows,
        )
    )


@main.command("dashboard")
@_database_options
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", "-p", default=8080, show_default=True, type=click.IntRange(1, 65535))
@click.option(
    "--token",
    envvar="KOBAN_DASHBOARD_TOKEN",
    help="Admin access token (env KOBAN_DASHBOARD_TOKEN).",
)
@click.option(
    "--read-only-token",
    envvar="KOBAN_DASHBOARD_READ_ONLY_TOKEN",
    help="Token for look-only access (env KOBAN_DASHBOARD_READ_ONLY_TOKEN).",
)
@click.option(
    "--user",
    "users",
    multiple=True,
    envvar="KOBAN_DASHBOARD_USERS",
    help="NAME:PASSWORD of an admin (repeatable; env KOBAN_DASHBOARD_USERS, space-separated).",
)
@click.option(
    "--read-only-user", "read_only_users", multiple=True, help="NAME:PASSWORD of a viewer."
)
@click.option("--read-only", is_flag=True, help="Nobody can change anything.")
@click.option(
    "--secret-key",
    envvar="KOBAN_DASHBOARD_SECRET",
    help="Signs sign-ins; set it when several processes serve the dashboard "
    "(env KOBAN_DASHBOARD_SECRET).",
)
@click.option("--root-path", default="", help="URL prefix when served behind a proxy, e.g. /koban.")
@click.option("--log-level", default="info", show_default=True)
def dashboard_command(
    database: str | None,
    app_path: str | None,
    host: str,
    port: int,
    token: str | None,
    read_only_token: str | None,
    users: tuple[str, ...],
    read_only_users: tuple[str, ...],
    read_only: bool,
    secret_key: str | None,
    root_path: str,
    log_level: str,
) -> None:
    """Serve the web dashboard (needs the web extra)."""
    try:
        import uvicorn

        from koban.web import PasswordAuth, TokenAuth, dashboard
    except ImportError:
        fail("the dashboard needs the web extra: pip install 'koban[web]'")
    auth: Any
    try:
        if users or read_only_users:
            if token:
                fail("give either --token or --user, not both")
            auth = PasswordAuth(
                _pairs(users, "--user"), read_only=_pairs(read_only_users, "--read-only-user")
            )
        else:
            if not token:
                import secrets

                token = secrets.token_urlsafe(24)
                click.echo(
                    f"koban dashboard: no --token given; sign in with this one: {token}", err=True
                )
            auth = TokenAuth(token, read_only_token=read_only_token)
    except ValueError as exc:
        fail(str(exc))
    logging.basicConfig(
        level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if app_path and not database:
        target: Any = load_app(app_path)
    else:
        target = run_guarded(Koban, resolve_url(database, app_path))
    web = run_guarded(dashboard, target, auth=auth, read_only=read_only, secret_key=secret_key)
    click.echo(
        f"koban dashboard on http://{host}:{port}{root_path}/ ({target.engine.kind})", err=True
    )
    uvicorn.run(web, host=host, port=port, root_path=root_path, log_level=log_level.lower())


def _pairs(values: Sequence[str], option: str) -> dict[str, str]:
    out = {}
    for value in (v for item in values for v in item.split()):
        name, sep, password = value.partition(":")
        if not sep or not name or not password:
            fail(f"{option} {name or value!r}: give NAME:PASSWORD")
        out[name] = password
    return out


if __name__ == "__main__":  # pragma: no cover
    main()
