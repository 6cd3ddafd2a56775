"""The app the operations tests drive: a worker that succeeds and one that fails on demand.

`build(url)` makes a fresh app with both workers for one test's database; `app` is one built
from KOBAN_DATABASE_URL (else the PostgreSQL test database) for `--app web.opsapp:app`.
"""

from __future__ import annotations

import os
from typing import Any

import koban

GREET = "web.opsapp.greet"
FLAKY = "web.opsapp.flaky"


def greet(job: koban.Job) -> None:
    """Succeed at once."""


def flaky(job: koban.Job) -> None:
    """Fail the first `fail_attempts` attempts (default 1) when `args["fail"]` is true."""
    if job.args.get("fail") and job.attempt <= int(job.args.get("fail_attempts", 1)):
        raise RuntimeError(f"mail server said no to {job.args.get('to')!r}")


def build(url: str, **options: Any) -> koban.Koban:
    options.setdefault("queues", {"default": 5, "mailers": 2})
    options.setdefault("shutdown_grace", 5.0)
    app = koban.Koban(url, **options)
    app.worker(max_attempts=3)(greet)
    app.worker(queue="mailers", max_attempts=1)(flaky)
    return app


def enqueue(app: koban.Koban, worker: str, args: dict[str, Any], **options: Any) -> koban.Job:
    """Insert a job for one of this module's workers by name."""
    return app.enqueue(app.resolve_worker(worker).target.new(args, **options))


app = build(
    os.environ.get("KOBAN_DATABASE_URL")
    or os.environ.get("KOBAN_TEST_DATABASE_URL", "postgresql://root@127.0.0.1:5432/koban_test")
)
