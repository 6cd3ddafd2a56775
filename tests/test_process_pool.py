"""executor="process": jobs in worker processes of koban's own (src/koban/runtime/processes.py).

The workers live in tests/procworkers.py, which worker processes import by path; they report
back through files in the test's tmp_path.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

import koban
import procworkers
from helpers import (
    AppFactory,
    await_until,
    node_process,
    wait_for_state,
    wait_until,
)
from koban import Job, JobState
from koban.cli import main as cli
from koban.plugins.stager import Stager
from koban.runtime.processes import ProcessPool
from koban.testing import KobanTesting


def gone(pid: int) -> bool:
    """True once `pid` is no process, or only a zombie nobody has reaped yet."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return True
    return "\nState:\tZ" in status


def pool(app: koban.Koban) -> ProcessPool:
    assert app.node is not None
    return app.node._processes


def load(path: Path) -> Any:
    return json.loads(path.read_text())


async def read_json(path: Path) -> Any:
    """The JSON a worker wrote to `path`, once it is there."""
    await await_until(path.exists, what=f"{path.name} to be written")
    return load(path)


# ----- outcomes ---------------------------------------------------------------
async def test_jobs_run_in_a_reused_worker_process(apps: AppFactory, tmp_path: Path) -> None:
    app = apps(processes=1)
    fn = app.worker(procworkers.record_pid, executor="process")
    cls = app.worker(procworkers.RecordPid, executor="process")
    out = tmp_path / "pids"

    async with app:
        jobs = [await fn.aenqueue({"out": str(out)}) for _ in range(2)]
        jobs.append(await cls.aenqueue({"out": str(out)}))
        for job in jobs:
            done = await wait_for_state(app, job.id or 0, JobState.COMPLETED)
            assert done.errors == []
        children = pool(app).pids

    pids = {int(line) for line in out.read_text().split()}
    assert len(pids) == 1 and os.getpid() not in pids  # one child, reused for every job
    assert pids == set(children)
    assert all(gone(pid) for pid in pids)  # stopping the node ended its processes


async def test_an_exception_in_the_child_is_recorded_and_retried(
    apps: AppFactory, tmp_path: Path
) -> None:
    app = apps(processes=1, plugins=[Stager(interval=0.05)])
    worker = app.worker(
        procworkers.fail_twice, executor="process", max_attempts=3, backoff=lambda job: 0.0
    )
    events: list[tuple[str, dict[str, Any]]] = []
    app.telemetry.subscribe_many(
        ["job:start", "job:stop", "job:exception"], lambda event, data: events.append((event, data))
    )

    async with app:
        job = await worker.aenqueue({"out": str(tmp_path / "pids")})
        done = await wait_for_state(app, job.id or 0, JobState.COMPLETED)

    # Telemetry comes from the node's process, as for any job.
    assert [e for e, _ in events] == ["job:start", "job:exception"] * 2 + ["job:start", "job:stop"]
    assert events[1][1]["error"] == "ValueError: boom on attempt 1"
    assert events[1][1]["traceback"] == done.errors[0]["traceback"]
    assert done.attempt == 3
    first, second = done.errors
    assert (first["attempt"], first["type"], first["message"]) == (
        1,
        "ValueError",
        "boom on attempt 1",
    )
    assert first["traceback"].startswith("Traceback (most recent call last):")
    assert "in fail_twice" in first["traceback"]
    assert first["traceback"].endswith("ValueError: boom on attempt 1\n")
    # NeedsTwo cannot be unpickled: it is recreated with the same type name and message.
    assert (second["type"], second["message"]) == ("procworkers.NeedsTwo", "a needs b")
    assert "in fail_twice" in second["traceback"]


async def test_snooze_cancel_and_discard_come_back_from_the_child(apps: AppFactory) -> None:
    app = apps(processes=1)
    worker = app.worker(procworkers.returns, executor="process")

    async with app:
        snoozed = await worker.aenqueue({"kind": "snooze"})
        cancelled = await worker.aenqueue({"kind": "cancel"})
        discarded = await worker.aenqueue({"kind": "discard"})
        completed = await worker.aenqueue({"kind": "none"})
        s = await wait_for_state(app, snoozed.id or 0, JobState.SCHEDULED)
        c = await wait_for_state(app, cancelled.id or 0, JobState.CANCELLED)
        d = await wait_for_state(app, discarded.id or 0, JobState.DISCARDED)
        await wait_for_state(app, completed.id or 0, JobState.COMPLETED)

    assert s.attempt == 0 and s.errors == []  # a snooze gives the attempt back
    assert [(e["type"], e["message"]) for e in c.errors] == [("koban.Cancel", "not wanted")]
    assert [(e["type"], e["message"]) for e in d.errors] == [("koban.Discard", "of no use")]


# ----- stopping processes ----------------------------------------------------------------------
async def test_a_timeout_kills_the_process_and_the_job_is_retryable(
    apps: AppFactory, tmp_path: Path
) -> None:
    app = apps(processes=1)
    worker = app.worker(procworkers.hang, executor="process", timeout=0.5, max_attempts=2)
    record = app.worker(procworkers.record_pid, executor="process")

    async with app:
        [pid] = pool(app).pids  # started with the node
        job = await worker.aenqueue({"out": str(tmp_path / "hang")})
        failed = await wait_for_state(app, job.id or 0, JobState.RETRYABLE)
        # Killed and reaped before the attempt was recorded.
        assert gone(pid)
        # A replacement takes the next job.
        after = await record.aenqueue({"out": str(tmp_path / "pids")})
        await wait_for_state(app, after.id or 0, JobState.COMPLETED)

    assert int((tmp_path / "pids").read_text()) != pid

    [error] = failed.errors
    assert error["type"] == "koban.errors.JobTimeoutError"
    assert f"job {job.id} of worker 'procworkers.hang'" in error["message"]
    assert "timeout of 0.5 s" in error["message"] and f"(pid {pid}) was killed" in error["message"]
    assert error["traceback"] is None


async def test_a_process_that_dies_fails_the_attempt_and_the_pool_goes_on(
    apps: AppFactory, tmp_path: Path
) -> None:
    app = apps(processes=1)
    dies = app.worker(procworkers.exit_hard, executor="process", max_attempts=2)
    record = app.worker(procworkers.record_pid, executor="process")

    async with app:
        job = await dies.aenqueue({"out": str(tmp_path / "dead")})
        failed = await wait_for_state(app, job.id or 0, JobState.RETRYABLE)
        after = await record.aenqueue({"out": str(tmp_path / "pids")})
        await wait_for_state(app, after.id or 0, JobState.COMPLETED)

    dead_pid = (await read_json(tmp_path / "dead"))["pid"]
    [error] = failed.errors
    assert error["type"] == "koban.errors.WorkerProcessDied"
    assert error["message"].startswith(
        f"job {job.id} of worker 'procworkers.exit_hard': its worker process (pid {dead_pid}) "
        "exited with code 3 while running it"
    ), error["message"]
    assert "retried with backoff" in error["message"]
    assert failed.scheduled_at is not None and failed.attempted_at is not None
    assert failed.scheduled_at > failed.attempted_at  # the normal backoff
    assert int((tmp_path / "pids").read_text()) != dead_pid


async def test_sys_exit_in_a_job_fails_that_job_and_keeps_its_process(
    apps: AppFactory, tmp_path: Path
) -> None:
    app = apps(processes=1)
    exits = app.worker(procworkers.calls_sys_exit, executor="process", max_attempts=2)
    record = app.worker(procworkers.record_pid, executor="process")

    async with app:
        job = await exits.aenqueue({"out": str(tmp_path / "exited")})
        failed = await wait_for_state(app, job.id or 0, JobState.RETRYABLE)
        after = await record.aenqueue({"out": str(tmp_path / "pids")})
        await wait_for_state(app, after.id or 0, JobState.COMPLETED)

    [error] = failed.errors
    assert (error["type"], error["message"]) == ("SystemExit", "5")
    assert "sys.exit(5)" in error["traceback"]
    # The same process took the next job: a job's SystemExit does not end its process.
    assert int((tmp_path / "pids").read_text()) == (await read_json(tmp_path / "exited"))["pid"]


async def test_cancelling_a_running_process_job_kills_its_process(
    apps: AppFactory, tmp_path: Path
) -> None:
    app = apps(processes=1)
    worker = app.worker(procworkers.hang, executor="process")
    out = tmp_path / "hang"

    async with app:
        job = await worker.aenqueue({"out": str(out)})
        seen = await read_json(out)
        assert seen["cancelled"] is False  # job.cancelled works in the child
        await app.acancel_job(job.id or 0)
        done = await wait_for_state(app, job.id or 0, JobState.CANCELLED)
        await await_until(lambda: gone(seen["pid"]), what="the job's process to be killed")

    assert done.attempt == 1


async def test_two_cpu_bound_jobs_run_at_once_in_two_processes(
    apps: AppFactory, tmp_path: Path
) -> None:
    app = apps(processes=2, queues={"default": 2})
    worker = app.worker(procworkers.spin_until_peer, executor="process")

    async with app:
        a = await worker.aenqueue({"dir": str(tmp_path), "name": "a", "peer": "b"})
        b = await worker.aenqueue({"dir": str(tmp_path), "name": "b", "peer": "a"})
        for job in (a, b):
            await wait_for_state(app, job.id or 0, JobState.COMPLETED)

    ra, rb = load(tmp_path / "a.json"), load(tmp_path / "b.json")
    assert ra["saw_peer"] and rb["saw_peer"]
    assert ra["pid"] != rb["pid"] and os.getpid() not in (ra["pid"], rb["pid"])
    assert ra["start"] < rb["end"] and rb["start"] < ra["end"]  # the windows overlap


async def test_stopping_the_node_ends_every_process_even_a_busy_one(
    apps: AppFactory, tmp_path: Path
) -> None:
    app = apps(processes=2)
    worker = app.worker(procworkers.hang, executor="process")

    async with app:
        job = await worker.aenqueue({"out": str(tmp_path / "hang")})
        busy = (await read_json(tmp_path / "hang"))["pid"]
        children = pool(app).pids
        assert busy in children and len(children) == 2
        node = app.node
        assert node is not None
        await app.stop(grace=0.2)

    assert node.abandoned == [job.id]  # left executing, for rescue
    assert all(gone(pid) for pid in children)  # the idle one asked to exit, the busy one killed


def test_a_worker_process_exits_when_its_node_process_dies(db_url: str, tmp_path: Path) -> None:
    out = tmp_path / "hang"
    with node_process("apps.procapp:app", db_url, tmp_path / "node.log") as node:
        node.wait_started()
        client = koban.Koban(db_url)
        try:
            client.enqueue(Job(worker="procworkers.hang", args={"out": str(out)}))
        finally:
            client.engine.close_sync()
        wait_until(out.exists, what="the process job to start")
        pid = json.loads(out.read_text())["pid"]
        node.signal(signal.SIGKILL)
        node.wait()
        wait_until(lambda: gone(pid), what="the orphaned worker process to exit")


# ----- configuration ---------------------------------------------------------------------------
def lambda_worker() -> Any:
    return lambda job: None


async def test_registration_refuses_what_a_worker_process_cannot_run(
    apps: AppFactory,
) -> None:
    app = apps()

    def nested(job: Job) -> None: ...

    class Nested(koban.Worker):
        def perform(self, job: Job) -> None: ...

    async def async_fn(job: Job) -> None: ...

    class AsyncWorker(koban.Worker):
        async def perform(self, job: Job) -> None: ...

    for target in (lambda_worker(), nested, Nested):
        with pytest.raises(koban.ConfigurationError, match=r"(?i)define it at module level"):
            app.worker(target, executor="process")
    for target in (async_fn, AsyncWorker):
        with pytest.raises(koban.ConfigurationError, match="this one is async"):
            app.worker(target, executor="process")
    assert not any(name.endswith(("nested", "Nested", "async_fn")) for name in app.workers)

    for bad in (0, -1, True, 2.0, "2"):
        with pytest.raises(koban.ConfigurationError, match=r"^processes \(the number"):
            koban.Koban(app.engine.url, processes=bad)  # type: ignore[arg-type]
    assert koban.Koban(app.engine.url).processes == (os.cpu_count() or 1)

    result = CliRunner().invoke(cli, ["start", "--app", "apps.procapp:app", "--processes", "0"])
    assert result.exit_code == 2 and "--processes" in result.output


async def test_koban_testing_runs_process_workers_in_the_test_process(
    apps: AppFactory, tmp_path: Path
) -> None:
    app = apps()
    worker = app.worker(procworkers.record_pid, executor="process")
    with KobanTesting(app) as testing:
        outcome = await testing.aperform_job(worker, {"out": str(tmp_path / "pids")})
    assert outcome.state == "completed"
    assert int((tmp_path / "pids").read_text()) == os.getpid()
