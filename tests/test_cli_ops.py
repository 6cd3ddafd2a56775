"""`koban jobs|queues|nodes|stats`: tables for people, JSON for scripts, documented exit codes."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import httpx
import pytest
from click.testing import CliRunner, Result

from helpers import TESTS_DIR, subprocess_env, wait_until
from koban.cli import main
from web.conftest import NodeThread, free_port
from web.opsapp import FLAKY, build

APP = "web.opsapp:app"


@pytest.fixture
def run_node() -> Any:
    started: list[NodeThread] = []
    yield lambda app: started.append(NodeThread(app).start())
    for node in started:
        node.stop()


def run(*args: str, input: str | None = None) -> Result:
    return CliRunner().invoke(main, list(args), input=input, catch_exceptions=False)


def run_json(*args: str) -> Any:
    result = run(*args, "--json")
    assert result.exit_code == 0, result.output + result.stderr
    return json.loads(result.stdout)


def insert(url: str, worker: str = "web.opsapp.greet", **kw: str) -> dict[str, Any]:
    extra = [item for key, value in kw.items() for item in (f"--{key.replace('_', '-')}", value)]
    return run_json("jobs", "insert", worker, "--database", url, "--app", APP, *extra)


@pytest.fixture(params=["postgres", "sqlite"])
def url(request: pytest.FixtureRequest) -> str:
    return request.getfixturevalue("pg_url" if request.param == "postgres" else "sqlite_url")


def test_insert_list_show(url: str) -> None:
    job = insert(url, args='{"name": "Ada"}', queue="mailers", priority="3")
    assert (job["state"], job["queue"], job["priority"], job["args"]) == (
        "available", "mailers", 3, {"name": "Ada"},
    )  # fmt: skip
    later = insert(url, args="{}", schedule_in="3600")
    assert later["state"] == "scheduled"

    table = run("jobs", "list", "--database", url)
    assert table.exit_code == 0
    lines = table.stdout.splitlines()
    assert lines[0].split()[:4] == ["ID", "STATE", "QUEUE", "WORKER"]
    assert [line.split()[0] for line in lines[1:]] == [str(later["id"]), str(job["id"])]

    listed = run_json("jobs", "list", "--database", url, "--state", "scheduled")
    assert [j["id"] for j in listed] == [later["id"]]
    listed = run_json("jobs", "list", "--database", url, "--args-text", "Ada")
    assert [j["id"] for j in listed] == [job["id"]]
    page = run_json("jobs", "list", "--database", url, "--limit", "1")
    assert [j["id"] for j in page] == [later["id"]]
    page = run_json("jobs", "list", "--database", url, "--before-id", str(later["id"]))
    assert [j["id"] for j in page] == [job["id"]]
    assert run_json("jobs", "list", "--database", url, "--inserted-before", "1h") == []
    assert len(run_json("jobs", "list", "--database", url, "--inserted-after", "1h")) == 2

    shown = run("jobs", "show", str(job["id"]), "--database", url)
    assert shown.exit_code == 0
    assert "state:        available" in shown.stdout
    assert '"name": "Ada"' in shown.stdout
    assert run_json("jobs", "show", str(job["id"]), "--database", url)["id"] == job["id"]


def test_insert_without_app_needs_a_known_worker(url: str) -> None:
    unknown = run("jobs", "insert", "nobody.here", "--database", url)
    assert unknown.exit_code == 2
    assert unknown.stderr.strip().count("\n") == 0
    assert "unknown worker 'nobody.here'" in unknown.stderr

    insert(url)  # now the database knows the worker
    again = run_json("jobs", "insert", "web.opsapp.greet", "--database", url, "--args", '{"x":1}')
    assert again["worker"] == "web.opsapp.greet"


def test_unknown_worker_and_queue_are_one_clear_line(url: str) -> None:
    result = run("jobs", "insert", "web.opsapp.nope", "--database", url, "--app", APP)
    assert result.exit_code == 2
    assert "unknown worker 'web.opsapp.nope'" in result.stderr
    assert "web.opsapp.greet" in result.stderr  # names what is registered
    assert len(result.stderr.strip().splitlines()) == 1

    result = run("jobs", "list", "--database", url, "--queue", "mailerz")
    assert result.exit_code == 2
    assert "unknown queue 'mailerz'" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1

    result = run("jobs", "insert", "web.opsapp.greet", "-d", url, "--app", APP, "--args", "[1")
    assert result.exit_code == 2
    assert "--args is not valid JSON" in result.stderr


def test_retry_cancel_delete_by_id(url: str) -> None:
    job = insert(url, schedule_in="3600")
    cancelled = run("jobs", "cancel", str(job["id"]), "--database", url)
    assert cancelled.exit_code == 0, cancelled.stderr
    assert f"cancelled 1 job(s): {job['id']}" in cancelled.stdout
    assert run_json("jobs", "show", str(job["id"]), "-d", url)["state"] == "cancelled"

    again = run("jobs", "cancel", str(job["id"]), "--database", url)
    assert again.exit_code == 1
    assert f"job(s) {job['id']}" in again.stderr

    assert run_json("jobs", "retry", str(job["id"]), "-d", url)["job_ids"] == [job["id"]]
    assert run_json("jobs", "show", str(job["id"]), "-d", url)["state"] == "available"

    assert run_json("jobs", "delete", str(job["id"]), "-d", url)["job_ids"] == [job["id"]]
    missing = run("jobs", "show", str(job["id"]), "--database", url)
    assert missing.exit_code == 1
    assert f"job {job['id']} not found" in missing.stderr


def test_bulk_by_filter_asks_first(url: str) -> None:
    a = insert(url, worker="web.opsapp.flaky", args='{"to": "a"}')
    b = insert(url, worker="web.opsapp.flaky", args='{"to": "b"}')
    keep = insert(url, args="{}")

    refused = run("jobs", "delete", "--queue", "mailers", "-d", url, input="n\n")
    assert refused.exit_code == 1
    assert "delete 2 matching job(s)?" in refused.stderr
    assert len(run_json("jobs", "list", "-d", url)) == 3

    nothing = run("jobs", "delete", "-d", url)
    assert nothing.exit_code == 2
    assert "give job ids or at least one filter" in nothing.stderr

    done = run_json("jobs", "delete", "--worker", "web.opsapp.flaky", "--yes", "-d", url)
    assert done["job_ids"] == sorted([a["id"], b["id"]])
    assert [j["id"] for j in run_json("jobs", "list", "-d", url)] == [keep["id"]]


def test_bulk_by_filter_that_matches_nothing_it_could_change_says_so_without_asking(
    url: str,
) -> None:
    job = insert(url, schedule_in="3600", tag="nightly")
    assert run("jobs", "cancel", str(job["id"]), "-d", url).exit_code == 0

    # No job has this tag; the one tagged job is cancelled already, so cancel has nothing to do.
    for tag in ("no-such-tag", "nightly"):
        result = run("jobs", "cancel", "--tag", tag, "-d", url)  # no --yes, no input given
        assert result.exit_code == 0, result.stderr
        assert "no job matches: nothing to cancel" in result.stderr
        assert "?" not in result.stderr
    assert run_json("jobs", "cancel", "--tag", "no-such-tag", "-d", url)["job_ids"] == []

    # Retry does apply to a cancelled job: it asks, counting only what it would change.
    asked = run("jobs", "retry", "--tag", "nightly", "-d", url, input="n\n")
    assert asked.exit_code == 1
    assert "retry 1 matching job(s)?" in asked.stderr


def test_unreachable_database_exits_3() -> None:
    result = run("jobs", "list", "--database", "postgresql://root:hunter2@127.0.0.1:1/nowhere")
    assert result.exit_code == 3
    assert "cannot connect" in result.stderr
    assert "hunter2" not in result.stderr


def test_bad_time_filter_is_usage_error(pg_url: str) -> None:
    result = run("jobs", "list", "-d", pg_url, "--inserted-after", "yesterday-ish")
    assert result.exit_code == 2
    assert "--inserted-after 'yesterday-ish' is not a time" in result.stderr


def test_stats_counts_by_queue_and_state(url: str) -> None:
    insert(url)
    insert(url)
    insert(url, worker="web.opsapp.flaky", schedule_in="60")
    stats = run_json("stats", "--database", url)
    assert stats["queues"]["default"]["available"] == 2
    assert stats["queues"]["mailers"]["scheduled"] == 1
    assert stats["exact"] is True
    table = run("stats", "--database", url)
    assert table.exit_code == 0
    assert table.stdout.splitlines()[0].split()[:3] == ["QUEUE", "AVAILABLE", "SCHEDULED"]


def test_queues_pause_resume_scale(url: str, run_node: Any) -> None:
    run_node(build(url, node="cli-node-1"))
    wait_until(lambda: run_json("nodes", "-d", url), what="the node to register")

    paused = run("queues", "pause", "mailers", "--database", url)
    assert paused.exit_code == 0, paused.stderr
    assert paused.stdout.strip() == "paused queue 'mailers' on every node"
    job = insert(url, worker=FLAKY, args='{"to": "ada"}')
    report = {q["queue"]: q for q in run_json("queues", "--database", url)}
    assert report["mailers"]["paused"] is True
    assert report["default"]["paused"] is False
    assert report["mailers"]["counts"]["available"] == 1
    assert run_json("jobs", "show", str(job["id"]), "-d", url)["state"] == "available"

    assert run("queues", "resume", "mailers", "-d", url).exit_code == 0
    wait_until(
        lambda: run_json("jobs", "show", str(job["id"]), "-d", url)["state"] == "completed",
        what="the job to run once the queue resumed",
    )

    scaled = run("queues", "-d", url, "scale", "default", "3")  # options before the subcommand
    assert scaled.exit_code == 0, scaled.stderr
    assert {q["queue"]: q["limit"] for q in run_json("queues", "status", "-d", url)}["default"] == 3
    assert run("queues", "scale", "default", "default", "-d", url).exit_code == 0
    assert {q["queue"]: q["limit"] for q in run_json("queues", "-d", url)}["default"] is None

    table = run("queues", "-d", url).stdout.splitlines()
    assert table[0].split()[:5] == ["QUEUE", "STATUS", "LIMIT", "NODES", "RUNNING"]


def test_queue_commands_reject_unknown_names(url: str) -> None:
    unknown = run("queues", "pause", "mailerz", "-d", url)
    assert unknown.exit_code == 2
    assert "unknown queue 'mailerz'" in unknown.stderr
    assert len(unknown.stderr.strip().splitlines()) == 1

    no_node = run("queues", "pause", "default", "--node", "ghost", "-d", url)
    assert no_node.exit_code == 2
    assert "ghost" in no_node.stderr

    bad_limit = run("queues", "scale", "default", "lots", "-d", url)
    assert bad_limit.exit_code == 2
    assert "LIMIT must be a whole number" in bad_limit.stderr


def test_nodes_lists_the_leader_and_heartbeats(url: str, run_node: Any) -> None:
    assert run("nodes", "-d", url).stdout.strip() == "no nodes are registered"
    run_node(build(url, node="cli-node-a"))
    found = wait_until(
        lambda: [n for n in run_json("nodes", "-d", url) if n["leader"]],
        what="the node to register and lead",
    )
    assert [n["name"] for n in found] == ["cli-node-a"]
    assert set(found[0]["queues"]) == {"default", "mailers"}
    table = run("nodes", "-d", url).stdout.splitlines()
    assert table[0].split() == ["NODE", "ROLE", "STARTED", "HEARTBEAT", "QUEUES"]
    assert table[1].split()[:2] == ["cli-node-a", "leader"]


def test_koban_dashboard_serves_with_a_token(pg_url: str, tmp_path: Any) -> None:
    port = free_port()
    parts = pg_url.split("://", 1)
    secret_url = f"{parts[0]}://root:hunter2-secret@{parts[1].split('@', 1)[1]}"
    log_path = tmp_path / "dashboard.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "koban.cli", "dashboard", "--database", secret_url,
             "--port", str(port), "--log-level", "debug"],
            env=subprocess_env(pg_url, KOBAN_DASHBOARD_TOKEN="cli-dashboard-token"),
            cwd=str(TESTS_DIR), stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        try:
            base = f"http://127.0.0.1:{port}"

            def up() -> bool:
                if proc.poll() is not None:
                    raise AssertionError(log_path.read_text())
                try:
                    return httpx.get(base + "/login").status_code == 200
                except httpx.TransportError:
                    return False

            wait_until(up, what="koban dashboard to listen")
            auth = {"Authorization": "Bearer cli-dashboard-token"}
            assert httpx.get(base + "/", headers=auth).status_code == 200
            assert httpx.get(base + "/jobs", headers=auth).status_code == 200
            assert httpx.get(base + "/").status_code == 401
        finally:
            proc.terminate()
            proc.wait(15)
    output = log_path.read_text()
    assert f"koban dashboard on http://127.0.0.1:{port}/" in output
    assert "hunter2" not in output
