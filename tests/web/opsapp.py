"""The app the operations tests drive: workers that succeed, fail on demand, or wait.

Its database comes from KOBAN_DATABASE_URL (else the PostgreSQL test database); CLI tests
that pass `--database` only use its worker registry and queues.
"""

from __future__ import annotations

import os

import koban

app = koban.Koban(
    os.environ.get("KOBAN_DATABASE_URL")
    or os.environ.get("KOBAN_TEST_DATABASE_URL", "postgresql://root@127.0.0.1:5432/koban_test"),
    queues={"default": 5, "mailers": 2},
    shutdown_grace=5.0,
)


@app.worker(max_attempts=3)
def greet(job: koban.Job) -> None:
    """Succeed at once."""


@app.worker(queue="mailers", max_attempts=1)
def flaky(job: koban.Job) -> None:
    """Fail while `job.args["fail"]` is true and no later attempt flipped it off."""
    if job.args.get("fail") and job.attempt <= int(job.args.get("fail_attempts", 1)):
        raise RuntimeError(f"mail server said no to {job.args.get('to')!r}")
