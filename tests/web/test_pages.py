"""What the dashboard's pages show and what its queue and job actions do, over real HTTP."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

import koban
from helpers import wait_until
from koban.web import TokenAuth, dashboard
from web.conftest import serve
from web.opsapp import FLAKY, GREET, build, enqueue

TOKEN = "pages-token-0123456789"


@pytest.fixture(params=["postgres", "sqlite"])
def url(request: pytest.FixtureRequest) -> str:
    return request.getfixturevalue("pg_url" if request.param == "postgres" else "sqlite_url")


@pytest.fixture
def app(url: str) -> Iterator[koban.Koban]:
    app = build(url)
    yield app
    app.engine.close_sync()


@pytest.fixture
def client(app: koban.Koban) -> Iterator[httpx.Client]:
    cron = [koban.Cron("*/5 * * * *", GREET, args={"from": "cron"}, name="five-minutely")]
    web = dashboard(build(app.engine.url, cron=cron), auth=TokenAuth(TOKEN))
    with (
        serve(web) as base,
        httpx.Client(base_url=base, headers={"Authorization": f"Bearer {TOKEN}"}) as client,
    ):
        yield client


def csrf_of(html: str) -> str:
    match = re.search(r'name="csrf_token" value="([^"]+)"', html)
    assert match
    return match.group(1)


def job_ids(html: str) -> list[int]:
    return [int(i) for i in re.findall(r'data-job-id="(\d+)"', html)]


def test_jobs_list_filters_and_pages_by_keyset(app: koban.Koban, client: httpx.Client) -> None:
    greet = [enqueue(app, GREET, {"n": n}, tags=["batch"] if n % 2 else []) for n in range(60)]
    mail = enqueue(app, FLAKY, {"to": "grace@example.com"})

    first = client.get("/jobs")
    assert job_ids(first.text) == [mail.id, *[j.id for j in reversed(greet)][:49]]
    assert "61 matching job(s)" in first.text
    older = re.search(r'href="(/jobs\?[^"]*before=\d+)"', first.text)
    assert older, "no link to older jobs"
    second = client.get(older.group(1).replace("&amp;", "&"))
    assert job_ids(second.text) == [j.id for j in reversed(greet)][49:]
    assert 'rel="next"' not in second.text

    assert job_ids(client.get("/jobs", params={"worker": FLAKY}).text) == [mail.id]
    assert job_ids(client.get("/jobs", params={"queue": "mailers"}).text) == [mail.id]
    assert job_ids(client.get("/jobs", params={"args": "grace@"}).text) == [mail.id]
    tagged = job_ids(client.get("/jobs", params={"tag": "batch"}).text)
    assert tagged == [j.id for j in reversed(greet) if j.tags]
    assert job_ids(client.get("/jobs", params={"state": "scheduled"}).text) == []
    assert client.get("/jobs", params={"state": "bogus"}).status_code == 400


def test_live_fragment_is_only_the_live_region(app: koban.Koban, client: httpx.Client) -> None:
    job = enqueue(app, GREET, {})
    fragment = client.get(f"/jobs/{job.id}", params={"partial": "1"}).text
    assert "<html" not in fragment
    assert "data-job-state>available<" in fragment
    assert client.get("/jobs/999999").status_code == 404


def test_queue_actions_and_node_table(
    app: koban.Koban, client: httpx.Client, run_node: Callable[[koban.Koban], Any]
) -> None:
    run_node(build(app.engine.url, node="web-node-1"))

    def node_shown() -> str | None:
        text = client.get("/").text
        # The node registers first and takes the leadership lease a moment later.
        return text if "web-node-1" in text and 'class="badge leader"' in text else None

    overview = wait_until(node_shown, what="the node to appear on the overview as leader")
    token = csrf_of(overview)

    def act(**form: str) -> httpx.Response:
        return client.post("/actions/queues", data={"csrf_token": token, "next": "/", **form})

    paused = act(action="pause", queue="mailers")
    assert paused.status_code == 303
    assert paused.headers["location"] == "/?notice=pause&queue=mailers"
    assert "Paused queue mailers." in client.get(paused.headers["location"]).text
    row = re.search(r'<tr data-queue="mailers">(.*?)</tr>', client.get("/").text, re.S)
    assert row and "paused" in row.group(1)

    assert act(action="scale", queue="default", limit="3").status_code == 303
    settings = {q.name: q for q in app.queue_states()}
    assert settings["mailers"].paused is True
    assert settings["default"].limit == 3
    assert act(action="scale", queue="default", limit="many").status_code == 400
    assert act(action="explode", queue="default").status_code == 400
    assert act(action="resume", queue="mailers").status_code == 303
    assert {q.name: q for q in app.queue_states()}["mailers"].paused is False


def test_job_actions(app: koban.Koban, client: httpx.Client) -> None:
    a = enqueue(app, GREET, {}, schedule_in=3600)
    b = enqueue(app, GREET, {}, schedule_in=3600)
    token = csrf_of(client.get("/jobs").text)

    def act(action: str, *ids: int, next: str = "/jobs") -> httpx.Response:
        form = {"csrf_token": token, "action": action, "next": next, "ids": [str(i) for i in ids]}
        return client.post("/actions/jobs", data=form)

    done = act("cancel", a.id, b.id)
    assert done.headers["location"] == "/jobs?notice=cancel&n=2&of=2"
    assert {str(j.state) for j in app.list_jobs(ids=[a.id, b.id])} == {"cancelled"}
    assert act("retry", a.id).headers["location"] == "/jobs?notice=retry&n=1&of=1"
    gone = act("delete", b.id, next=f"/jobs/{b.id}")
    assert gone.headers["location"] == "/jobs?notice=delete&n=1&of=1"
    assert app.get_job(b.id) is None
    assert act("cancel").headers["location"] == "/jobs?notice=none"


def test_cron_page_shows_next_and_last_runs(client: httpx.Client) -> None:
    page = client.get("/cron").text
    row = re.search(r'<tr data-cron="five-minutely">(.*?)</tr>', page, re.S)
    assert row, page
    assert "*/5 * * * *" in row.group(1)
    assert GREET in row.group(1)
    assert "never" in row.group(1)
    assert re.search(r"\d{4}-\d\d-\d\d \d\d:\d[05]:00 UTC", row.group(1))
