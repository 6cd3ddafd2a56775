"""The `koban` command line.

Exit codes: 0 success; 1 a job-level failure reported by a command; 2 bad usage or bad input
(unknown worker, queue, malformed URL...); 3 the database is unreachable or not migrated.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
from typing import Any, NoReturn

import click

from koban.app import Koban, parse_queues
from koban.engines.base import create_engine, redact
from koban.errors import ConfigurationError, DatabaseError, KobanError

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
@click.option("--log-level", default="INFO", show_default=True)
def start(app_path: str, queues: str | None, node: str | None, log_level: str) -> None:
    """Run a node: fetch and run jobs until SIGTERM or SIGINT."""
    logging.basicConfig(
        level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    app = load_app(app_path)
    queue_map = run_guarded(parse_queues, queues) if queues else None
    from koban.telemetry import JobLogger

    JobLogger().attach(app.telemetry)
    run_guarded(app.run, queues=queue_map, node=node)


if __name__ == "__main__":  # pragma: no cover
    main()
