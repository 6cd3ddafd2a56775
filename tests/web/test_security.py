"""The dashboard over real HTTP: sign-in, the read-only role, CSRF, escaping and secrets."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from urllib.parse import urlsplit, urlunsplit

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.routing import Mount

import koban
from koban.web import PasswordAuth, TokenAuth, User, dashboard
from web.conftest import serve
from web.opsapp import FLAKY, GREET, build, enqueue

ADMIN = "admin-token-0123456789"
VIEWER = "viewer-token-0123456789"


@pytest.fixture
def app(pg_url: str) -> Iterator[koban.Koban]:
    app = build(pg_url)
    yield app
    app.engine.close_sync()


@pytest.fixture
def base(app: koban.Koban) -> Iterator[str]:
    web = dashboard(build(app.engine.url), auth=TokenAuth(ADMIN, read_only_token=VIEWER))
    with serve(web) as url:
        yield url


def csrf_of(html: str) -> str:
    match = re.search(r'name="csrf_token" value="([^"]+)"', html)
    assert match, "the page has no CSRF token"
    return match.group(1)


def sign_in(client: httpx.Client, token: str) -> None:
    page = client.get("/login")
    assert page.status_code == 200
    done = client.post(
        "/login", data={"token": token, "csrf_token": csrf_of(page.text), "next": "/"}
    )
    assert done.status_code == 303, done.text
    assert "koban_session" in client.cookies


def test_every_page_needs_authentication(base: str) -> None:
    with httpx.Client(base_url=base) as client:
        for path in ("/", "/jobs", "/jobs/1", "/cron", "/metrics"):
            html = client.get(path, headers={"Accept": "text/html"})
            assert html.status_code == 303
            assert html.headers["location"].startswith("/login?next=")
            assert client.get(path).status_code == 401
        wrong = client.get("/", headers={"Authorization": "Bearer not-the-token"})
        assert wrong.status_code == 401
        client.cookies.set("koban_session", "eyJ1IjoiYWRtaW4ifQ.forged")
        assert client.get("/").status_code == 401


def test_token_sign_in_and_out(base: str) -> None:
    with httpx.Client(base_url=base) as client:
        page = client.get("/login")
        bad = client.post("/login", data={"token": "guess-guess", "csrf_token": csrf_of(page.text)})
        assert bad.status_code == 401
        assert "did not match" in bad.text
        assert "koban_session" not in client.cookies

        sign_in(client, ADMIN)
        overview = client.get("/")
        assert overview.status_code == 200
        assert "Queues" in overview.text
        assert overview.headers["content-security-policy"].startswith("default-src 'self'")

        out = client.post("/logout", data={"csrf_token": csrf_of(overview.text)})
        assert out.status_code == 303
        assert client.get("/").status_code == 401


def test_sign_in_redirects_only_inside_the_dashboard(base: str) -> None:
    with httpx.Client(base_url=base) as client:
        page = client.get("/login")
        done = client.post(
            "/login",
            data={"token": ADMIN, "csrf_token": csrf_of(page.text), "next": "//evil.example/x"},
        )
        assert done.status_code == 303
        assert done.headers["location"] == "/"


def test_actions_need_a_csrf_token_from_this_site(app: koban.Koban, base: str) -> None:
    job = enqueue(app, GREET, {}, schedule_in=3600)
    with httpx.Client(base_url=base) as client:
        sign_in(client, ADMIN)
        token = csrf_of(client.get("/jobs").text)
        form = {"action": "cancel", "ids": str(job.id), "next": "/jobs"}

        missing = client.post("/actions/jobs", data=form)
        assert missing.status_code == 403
        wrong = client.post("/actions/jobs", data={**form, "csrf_token": "x" * 43})
        assert wrong.status_code == 403
        other_site = client.post(
            "/actions/jobs",
            data={**form, "csrf_token": token},
            headers={"Origin": "https://evil.example"},
        )
        assert other_site.status_code == 403
        assert app.get_job(job.id).state == "scheduled"  # type: ignore[union-attr]

        # A token is only good with the cookie it was made for.
        with httpx.Client(base_url=base) as stranger:
            sign_in(stranger, ADMIN)
            stolen = stranger.post("/actions/jobs", data={**form, "csrf_token": token})
            assert stolen.status_code == 403

        ok = client.post("/actions/jobs", data={**form, "csrf_token": token})
        assert ok.status_code == 303
        assert ok.headers["location"] == "/jobs?notice=cancel&n=1&of=1"
        assert app.get_job(job.id).state == "cancelled"  # type: ignore[union-attr]
        assert "Cancelled 1 of 1 job(s)." in client.get(ok.headers["location"]).text


def test_get_never_changes_anything(app: koban.Koban, base: str) -> None:
    job = enqueue(app, GREET, {}, schedule_in=3600)
    with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {ADMIN}"}) as client:
        response = client.get("/actions/jobs", params={"action": "cancel", "ids": job.id})
        assert response.status_code == 405
    assert app.get_job(job.id).state == "scheduled"  # type: ignore[union-attr]


def test_bearer_requests_act_without_csrf(app: koban.Koban, base: str) -> None:
    job = enqueue(app, GREET, {}, schedule_in=3600)
    with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {ADMIN}"}) as client:
        done = client.post("/actions/jobs", data={"action": "retry", "ids": str(job.id)})
        assert done.status_code == 303
    assert app.get_job(job.id).state == "available"  # type: ignore[union-attr]


def test_read_only_role_sees_but_cannot_change(app: koban.Koban, base: str) -> None:
    job = enqueue(app, GREET, {}, schedule_in=3600)
    with httpx.Client(base_url=base) as client:
        sign_in(client, VIEWER)
        page = client.get(f"/jobs/{job.id}")
        assert page.status_code == 200
        assert "read-only" in page.text
        assert 'value="cancel"' not in page.text  # no action buttons
        assert 'value="pause"' not in client.get("/").text
        token = csrf_of(page.text)
        refused = client.post(
            "/actions/jobs", data={"action": "cancel", "ids": str(job.id), "csrf_token": token}
        )
        assert refused.status_code == 403
        assert "read-only" in refused.text
        queue = client.post(
            "/actions/queues", data={"action": "pause", "queue": "default", "csrf_token": token}
        )
        assert queue.status_code == 403
    with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {VIEWER}"}) as api:
        assert api.get("/jobs").status_code == 200
        assert (
            api.post("/actions/jobs", data={"action": "cancel", "ids": str(job.id)}).status_code
            == 403
        )
    assert app.get_job(job.id).state == "scheduled"  # type: ignore[union-attr]


def test_job_data_is_escaped(app: koban.Koban, base: str) -> None:
    evil = '<script>alert("args")</script><img src=x onerror=alert(1)>'
    job = enqueue(app, FLAKY, {"to": evil, "fail": True}, tags=["<b>tag</b>"])
    with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {ADMIN}"}) as client:
        for path in (f"/jobs/{job.id}", "/jobs", f"/jobs?args={evil}", "/jobs?partial=1"):
            html = client.get(path).text
            assert "<script>alert" not in html
            assert "<img src=x" not in html
            assert "<b>tag</b>" not in html
        assert "&lt;script&gt;alert(" in client.get(f"/jobs/{job.id}").text


def test_filters_are_data_not_sql(app: koban.Koban, base: str) -> None:
    job = enqueue(app, GREET, {"name": "Robert'); DROP TABLE koban_jobs;--"})
    with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {ADMIN}"}) as client:
        found = client.get(
            "/jobs", params={"args": "Robert'); DROP", "queue": "default' OR '1'='1"}
        )
        assert found.status_code == 200
        assert "No jobs match." in found.text
        found = client.get("/jobs", params={"args": "Robert'); DROP TABLE"})
        assert f"#{job.id}" in found.text
    assert app.get_job(job.id) is not None


def test_credentials_never_reach_pages_or_logs(
    pg_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    # Local connections are trusted, so a made-up password still connects: it must not show.
    parts = urlsplit(pg_url)
    with_password = urlunsplit(
        parts._replace(netloc=f"root:hunter2-secret@{parts.hostname}:{parts.port}")
    )
    broken = urlunsplit(parts._replace(netloc=f"root:hunter2-secret@{parts.hostname}:1"))
    caplog.set_level(logging.DEBUG)
    for url in (with_password, broken):
        with serve(dashboard(url, auth=TokenAuth(ADMIN))) as base:
            with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {ADMIN}"}) as c:
                for path in ("/", "/jobs", "/cron", "/jobs/1"):
                    assert "hunter2" not in c.get(path).text
    assert "hunter2" not in caplog.text
    assert "unavailable" in caplog.text or "database" in caplog.text


def test_password_sign_in(pg_url: str) -> None:
    auth = PasswordAuth({"ada": "correct horse"}, read_only={"bob": "battery staple"})
    with serve(dashboard(pg_url, auth=auth)) as base, httpx.Client(base_url=base) as client:
        page = client.get("/login")
        assert 'name="username"' in page.text
        form = {"username": "ada", "password": "wrong", "csrf_token": csrf_of(page.text)}
        assert client.post("/login", data=form).status_code == 401
        form["password"] = "correct horse"
        assert client.post("/login", data=form).status_code == 303
        assert ">ada<" in client.get("/").text


def test_mounted_with_a_resolver(app: koban.Koban) -> None:
    def resolver(request: Request) -> User | None:
        name = request.headers.get("x-user")
        return User(name, read_only=name == "guest") if name else None

    job = enqueue(app, GREET, {}, schedule_in=3600)
    web = dashboard(build(app.engine.url), auth=resolver)
    host = Starlette(routes=[Mount("/ops/koban", app=web)])
    with serve(host) as base, httpx.Client(base_url=base) as client:
        assert client.get("/ops/koban/").status_code == 401
        page = client.get("/ops/koban/jobs", headers={"X-User": "ada"})
        assert page.status_code == 200
        assert 'href="/ops/koban/jobs/' in page.text
        assert 'href="/ops/koban/static/app.css"' in page.text
        assert client.get("/ops/koban/static/app.js").status_code == 200
        token = csrf_of(page.text)
        form = {"action": "cancel", "ids": str(job.id), "csrf_token": token, "next": "/jobs"}
        # The host's sign-in is a cookie or header the browser sends by itself: CSRF still applies.
        assert client.post("/ops/koban/actions/jobs", data={**form, "csrf_token": ""},
                           headers={"X-User": "ada"}).status_code == 403  # fmt: skip
        guest = client.post("/ops/koban/actions/jobs", data=form, headers={"X-User": "guest"})
        assert guest.status_code == 403
        done = client.post("/ops/koban/actions/jobs", data=form, headers={"X-User": "ada"})
        assert done.status_code == 303
        assert done.headers["location"].startswith("/ops/koban/jobs?notice=cancel")
    assert app.get_job(job.id).state == "cancelled"  # type: ignore[union-attr]
