"""Reusable test helpers: waiting with a deadline, raw SQL for assertions, app factories and a
`koban start` subprocess runner.

Tests never sleep for a fixed time to let something happen: they poll a condition until a
deadline and fail with a message saying what never happened.
"""

from __future__ import annotations

import asyncio
import inspect
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg

import koban
from koban.job import Job, JobState

TESTS_DIR = Path(__file__).resolve().parent
REPO_DIR = TESTS_DIR.parent

#: Generous deadlines: they bound a broken test, they are not performance claims.
DEADLINE = 15.0


def is_postgres(url: str) -> bool:
    return url.split("://", 1)[0].lower().startswith("postgres")


def sqlite_path(url: str) -> str:
    return url.split("sqlite:///", 1)[1]


# ----- waiting ---------------------------------------------------------------------------------
def wait_until(
    predicate: Callable[[], Any], timeout: float = DEADLINE, interval: float = 0.02, what: str = ""
) -> Any:
    """Poll `predicate` until it returns something truthy; return it, or fail at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what or predicate}")
        time.sleep(interval)


async def await_until(
    predicate: Callable[[], Any | Awaitable[Any]],
    timeout: float = DEADLINE,
    interval: float = 0.02,
    what: str = "",
) -> Any:
    """Async `wait_until`: `predicate` may be sync or async."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what or predicate}")
        await asyncio.sleep(interval)


async def wait_for_state(
    app: koban.Koban,
    job_id: int,
    states: JobState | str | Sequence[JobState | str],
    timeout: float = DEADLINE,
) -> Job:
    """The job once it is in one of `states` (read through the app's async client)."""
    wanted = {JobState(states)} if isinstance(states, str) else {JobState(s) for s in states}
    seen: list[Job | None] = [None]

    async def reached() -> Job | None:
        job = await app.aget_job(job_id)
        seen[0] = job
        return job if job is not None and job.state in wanted else None

    try:
        return await await_until(reached, timeout, what=f"job {job_id} to reach {sorted(wanted)}")
    except AssertionError:
        last = seen[0]
        raise AssertionError(
            f"job {job_id} never reached {sorted(wanted)}; last seen: "
            f"{last.state if last else 'missing'} {last!r}"
        ) from None


async def wait_for_all(
    app: koban.Koban, ids: Sequence[int], state: JobState | str, timeout: float = DEADLINE
) -> list[Job]:
    """Every job in `ids` once all of them are in `state`."""
    want = set(ids)

    async def done() -> list[Job] | None:
        jobs = await app.alist_jobs(ids=list(want))
        return jobs if len(jobs) == len(want) and all(j.state == state for j in jobs) else None

    return await await_until(done, timeout, what=f"{len(want)} jobs to reach {state}")


# ----- raw database access for assertions ---------------------------------------------------
def _sqlite_sql(query: str) -> str:
    return query.replace("%s", "?")


def sql_rows(url: str, query: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
    """Run one statement outside koban and return its rows (`%s` placeholders on both engines)."""
    if is_postgres(url):
        with psycopg.connect(url, autocommit=True) as conn:
            cur = conn.execute(query.encode(), params)  # type: ignore[call-overload]
            return cur.fetchall() if cur.description else []
    conn = sqlite3.connect(sqlite_path(url), timeout=30)
    try:
        with conn:
            cur = conn.execute(_sqlite_sql(query), tuple(params))
            return cur.fetchall()
    finally:
        conn.close()


def count_jobs(url: str) -> int:
    return int(sql_rows(url, "SELECT count(*) FROM koban_jobs")[0][0])


# ----- apps ------------------------------------------------------------------------------------
#: A fixed, microsecond-free instant for tests that freeze time.
T0 = datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC)

#: Builds apps on the engine under test; see the `apps` fixture in tests/conftest.py.
AppFactory = Callable[..., koban.Koban]


def make_app(url: str, **options: Any) -> koban.Koban:
    """An app on `url` with small, test-friendly defaults (short grace, one queue)."""
    options.setdefault("queues", {"default": 10})
    options.setdefault("shutdown_grace", 5.0)
    return koban.Koban(url, **options)


# ----- `koban start` in a subprocess ---------------------------------------------------------
def subprocess_env(url: str, **extra: str) -> dict[str, str]:
    """The environment for a child koban process: tests/ and src/ importable, `url` as database."""
    env = dict(os.environ)
    paths = [str(TESTS_DIR), str(REPO_DIR / "src"), env.get("PYTHONPATH", "")]
    env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
    env["KOBAN_DATABASE_URL"] = url
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


class NodeProcess:
    """A `koban start` node in its own process, with its output kept in a file."""

    def __init__(
        self,
        app: str,
        url: str,
        log_path: Path,
        *,
        queues: str | None = None,
        node: str | None = None,
        env: Mapping[str, str] | None = None,
        prefix: Sequence[str] = (),
    ) -> None:
        """`prefix` goes before the command, e.g. ["ip", "netns", "exec", name]."""
        self.log_path = log_path
        cmd = [*prefix, sys.executable, "-m", "koban.cli", "start", "--app", app]
        if queues:
            cmd += ["--queues", queues]
        if node:
            cmd += ["--node", node]
        self._log = open(log_path, "wb")
        self.proc = subprocess.Popen(
            cmd,
            env=subprocess_env(url, **(env or {})),
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=str(TESTS_DIR),
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_started(self, timeout: float = DEADLINE) -> None:
        """Return once the node logged that it is fetching; fail if it died first."""

        def started() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"node exited with {self.proc.returncode} before starting:\n{self.output()}"
                )
            return " started: " in self.output()

        wait_until(started, timeout, what="the node to start")

    def signal(self, sig: int = signal.SIGTERM) -> None:
        self.proc.send_signal(sig)

    def wait(self, timeout: float = DEADLINE) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"node did not exit within {timeout} s; output:\n{self.output()}"
            ) from None
        finally:
            self._log.close()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._log.close()


@contextmanager
def node_process(*args: Any, **kwargs: Any) -> Iterator[NodeProcess]:
    """A NodeProcess that is killed on exit if the test did not stop it."""
    node = NodeProcess(*args, **kwargs)
    try:
        yield node
    finally:
        node.kill()
