"""Nodes as separate `koban start` processes: sharing one database, and shutting down gracefully."""

from __future__ import annotations

import signal
from collections import Counter
from pathlib import Path

import pytest

from helpers import NodeProcess, make_app, node_process, sql_rows, wait_until
from koban import Job

APP = "apps.nodeapp:app"


def state_of(url: str, job_id: int) -> str | None:
    rows = sql_rows(url, "SELECT state FROM koban_jobs WHERE id = %s", [job_id])
    return rows[0][0] if rows else None


def wait_state(url: str, job_id: int, state: str, timeout: float = 20.0) -> None:
    wait_until(lambda: state_of(url, job_id) == state, timeout, what=f"job {job_id} {state}")


def enqueue(url: str, jobs: list[Job]) -> list[Job]:
    app = make_app(url)
    try:
        return app.enqueue_many(jobs)
    finally:
        app.engine.close_sync()


def test_two_node_processes_run_each_job_exactly_once(db_url: str, tmp_path: Path) -> None:
    ledger = tmp_path / "ledger.txt"
    ledger.touch()
    env = {"KOBAN_TEST_LEDGER": str(ledger)}
    n = 5000
    with (
        node_process(APP, db_url, tmp_path / "a.log", node="node-a", env=env) as a,
        node_process(APP, db_url, tmp_path / "b.log", node="node-b", env=env) as b,
    ):
        a.wait_started()
        b.wait_started()
        jobs = enqueue(db_url, [Job(worker="apps.nodeapp.record", args={"i": i}) for i in range(n)])

        def all_completed() -> bool:
            rows = sql_rows(db_url, "SELECT count(*) FROM koban_jobs WHERE state = 'completed'")
            for node in (a, b):
                assert node.proc.poll() is None, f"node died:\n{node.output()}"
            return rows[0][0] == n

        wait_until(all_completed, 120, interval=0.2, what=f"{n} jobs completed")
        for node in (a, b):
            node.signal(signal.SIGTERM)
        assert a.wait() == 0, a.output()
        assert b.wait() == 0, b.output()

    runs = [line.split() for line in ledger.read_text().splitlines()]
    ran = Counter(int(job_id) for job_id, _pid in runs)
    twice = [job_id for job_id, count in ran.items() if count > 1]
    assert twice == [], f"{len(twice)} jobs ran more than once, e.g. {twice[:10]}"
    assert sorted(ran) == sorted(j.id for j in jobs)  # and none was missed
    # Both processes took part, and the database agrees on who ran what.
    assert {pid for _job_id, pid in runs} == {str(a.pid), str(b.pid)}
    rows = sql_rows(db_url, "SELECT attempt, count(*) FROM koban_jobs GROUP BY attempt")
    assert [tuple(r) for r in rows] == [(1, n)]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_shutdown_lets_a_running_job_finish_within_grace(
    db_url: str, tmp_path: Path, sig: int
) -> None:
    env = {"KOBAN_TEST_GRACE": "20"}
    with node_process(APP, db_url, tmp_path / "node.log", env=env) as node:
        node.wait_started()
        [job] = enqueue(db_url, [Job(worker="apps.nodeapp.sleepy", args={"seconds": 1.0})])
        wait_state(db_url, job.id or 0, "executing")
        node.signal(sig)
        assert node.wait(30) == 0, node.output()

    assert state_of(db_url, job.id or 0) == "completed"
    rows = sql_rows(db_url, "SELECT count(*) FROM koban_jobs WHERE state = 'available'")
    assert rows == [(0,)]


@pytest.mark.parametrize("worker", ["sleepy", "sleepy_sync"])
def test_a_job_longer_than_grace_is_left_executing(
    db_url: str, tmp_path: Path, worker: str
) -> None:
    env = {"KOBAN_TEST_GRACE": "0.5"}
    with node_process(APP, db_url, tmp_path / "node.log", env=env) as node:
        node.wait_started()
        [job] = enqueue(db_url, [Job(worker=f"apps.nodeapp.{worker}", args={"seconds": 60})])
        wait_state(db_url, job.id or 0, "executing")
        node.signal(signal.SIGTERM)
        # The process exits once grace is over, without waiting for the job (60 s).
        assert node.wait(15) == 0, node.output()
        output = node.output()

    job_row = sql_rows(
        db_url, "SELECT state, completed_at, attempt FROM koban_jobs WHERE id = %s", [job.id]
    )
    assert job_row == [("executing", None, 1)]  # left for rescue, never completed
    assert f"{job.id}" in output and "rescued" in output


def test_shutdown_stops_fetching_new_jobs(db_url: str, tmp_path: Path) -> None:
    env = {"KOBAN_TEST_GRACE": "20"}
    with node_process(APP, db_url, tmp_path / "node.log", env=env) as node:
        node.wait_started()
        [running] = enqueue(db_url, [Job(worker="apps.nodeapp.sleepy", args={"seconds": 1.5})])
        wait_state(db_url, running.id or 0, "executing")
        node.signal(signal.SIGTERM)
        wait_until(lambda: "shutting down" in node.output(), what="the node to start stopping")
        [late] = enqueue(db_url, [Job(worker="apps.nodeapp.sleepy", args={"seconds": 0})])
        assert node.wait(30) == 0, node.output()

    assert state_of(db_url, running.id or 0) == "completed"
    assert state_of(db_url, late.id or 0) == "available"


def test_start_refuses_an_unmigrated_database(fresh_db_url: str, tmp_path: Path) -> None:
    node = NodeProcess(APP, fresh_db_url, tmp_path / "node.log")
    code = node.wait(30)
    output = node.output()
    assert code != 0
    assert "koban migrate" in output
    assert "Traceback" not in output
