"""The dashboard, fuzzed over real HTTP: any query string or form post gets a page, a redirect
inside the dashboard or a 4xx with a message, never a server error; reading a page never
changes the database, and a refused action does not either.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers import sql_rows

pytest.importorskip("starlette", reason="the dashboard needs the web extra")

from koban.web import TokenAuth, dashboard
from web.conftest import serve
from web.opsapp import GREET, build, enqueue

EXAMPLES = int(os.environ.get("KOBAN_FUZZ_EXAMPLES", "60"))
FUZZ = settings(
    max_examples=EXAMPLES * 2,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
TOKEN = "fuzz-token-0123456789abcdef"
ALLOWED = {200, 303, 400, 401, 403, 404, 405, 501}

# Text a browser or a script may send: printable, plus digits that str.isdigit() accepts but
# int() does not (superscripts), huge numbers, and paths that try to leave the site.
text = st.text(
    alphabet=st.characters(codec="utf-8", exclude_characters="\x00"),
    min_size=0,
    max_size=24,
)
# Includes digits that str.isdigit() accepts but int() refuses ("²", "①"), which once
# became a 500 (also pinned by test_digits_int_cannot_read).
numbers = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70).map(str),
    st.sampled_from(["١٢", "0", "00", "-1", "1e3", " 5", "5 ", "٣", "²", "①"]),
)
paths = st.one_of(
    st.sampled_from(
        [
            "/",
            "/jobs",
            "/jobs/1",
            "//evil.example",
            "/\\evil.example",
            "https://evil.example/",
            "/\t/evil.example",
            "javascript:alert(1)",
            "/%2F%2Fevil.example",
            "/jobs?x=1",
        ]
    ),
    text,
)
values = st.one_of(text, numbers, paths)
query_keys = st.sampled_from(
    ["state", "queue", "worker", "tag", "args", "before", "partial", "notice", "n", "of", "next"]
)
query = st.lists(st.tuples(st.one_of(query_keys, text), values), max_size=6)
pages = st.one_of(
    st.sampled_from(["/", "/jobs", "/cron", "/metrics", "/login"]),
    numbers.map(lambda n: f"/jobs/{n}"),
)


def table(url: str) -> list[tuple[Any, ...]]:
    return [
        *sql_rows(
            url, "SELECT id, state, queue, attempt, scheduled_at FROM koban_jobs ORDER BY id"
        ),
        *sql_rows(url, 'SELECT name, paused, "limit" FROM koban_queues ORDER BY name'),
    ]


Site = tuple[httpx.Client, httpx.Client, str, str]


def sign_in(base: str) -> tuple[httpx.Client, str]:
    """A browser session signed in through the form: (client with cookies, its CSRF token)."""
    browser = httpx.Client(base_url=base)
    page = browser.get("/login")
    data = {"csrf_token": csrf_of(page.text), "token": TOKEN, "next": "/jobs"}
    signed_in = browser.post("/login", data=data)
    assert signed_in.status_code == 303, signed_in.text[:300]
    return browser, csrf_of(browser.get("/jobs").text)


def csrf_of(html: str) -> str:
    match = re.search(r'name="csrf_token" value="([^"]+)"', html)
    assert match, "no CSRF token on the page"
    return match.group(1)


@pytest.fixture
def site(db_url: str) -> Iterator[Site]:
    """A dashboard over a database with a few jobs: (API client with a bearer token, signed-in
    browser, the browser's CSRF token, database url)."""
    app = build(db_url)
    try:
        for n in range(3):
            enqueue(app, GREET, {"n": n}, schedule_in=3600)
    finally:
        app.engine.close_sync()
    web = dashboard(build(db_url), auth=TokenAuth(TOKEN))
    with (
        serve(web) as base,
        httpx.Client(base_url=base, headers={"Authorization": f"Bearer {TOKEN}"}) as client,
    ):
        browser, token = sign_in(base)
        try:
            yield client, browser, token, db_url
        finally:
            browser.close()


def check_response(response: httpx.Response, what: str) -> None:
    shown = f"{what} -> {response.status_code}: {response.text[:300]}"
    assert response.status_code in ALLOWED, shown
    if response.status_code == 303:
        location = response.headers["location"]
        parts = urlsplit(location)
        assert not parts.scheme and not parts.netloc, f"redirect off the dashboard: {shown}"
        assert location.startswith("/") and not location.startswith(("//", "/\\")), shown
    elif response.status_code in (400, 403, 404):
        assert response.text.strip(), f"an error without a message: {shown}"


@FUZZ
@given(page=pages, params=query)
def test_any_query_string(site: Site, page: str, params: list[tuple[str, str]]) -> None:
    client, _browser, _token, url = site
    before = table(url)
    response = client.get(page, params=params, headers={"Accept": "text/html"})
    check_response(response, f"GET {page} {params!r}")
    assert table(url) == before, f"GET {page} {params!r} changed the database"


job_forms = st.fixed_dictionaries(
    {"action": st.one_of(st.sampled_from(["retry", "cancel", "delete"]), text)},
    optional={"ids": st.lists(numbers, max_size=3), "next": paths},
)
queue_forms = st.fixed_dictionaries(
    {"action": st.one_of(st.sampled_from(["pause", "resume", "scale"]), text)},
    optional={
        "queue": st.one_of(st.sampled_from(["default", "mailers", "", " "]), text),
        "limit": numbers,
        "node": text,
        "next": paths,
    },
)


@FUZZ
@given(
    form=st.one_of(
        job_forms.map(lambda f: ("/actions/jobs", f)),
        queue_forms.map(lambda f: ("/actions/queues", f)),
    ),
    csrf=st.sampled_from(["valid", "missing", "wrong"]),
)
def test_any_form_post(site: Site, form: tuple[str, dict[str, Any]], csrf: str) -> None:
    _client, browser, token, url = site
    path, fields = form
    data = dict(fields)
    if csrf != "missing":
        data["csrf_token"] = token if csrf == "valid" else "forged"
    before = table(url)
    # A browser form: no bearer header, so the session cookie and the CSRF check apply.
    response = browser.post(path, data=data, headers={"Accept": "text/html"})
    check_response(response, f"POST {path} {data!r}")
    if csrf != "valid":
        assert response.status_code == 403, f"a form without its CSRF token was accepted: {data}"
    if response.status_code != 303:
        assert table(url) == before, f"a refused POST {path} {data!r} changed the database"


@FUZZ
@given(token=st.one_of(st.just(TOKEN), text), next_path=paths)
def test_any_sign_in(site: Site, token: str, next_path: str) -> None:
    client = site[0]
    with httpx.Client(base_url=str(client.base_url)) as browser:
        page = browser.get("/login", params={"next": next_path})
        check_response(page, f"GET /login next={next_path!r}")
        data = {"csrf_token": csrf_of(page.text), "token": token, "next": next_path}
        response = browser.post("/login", data=data)
        check_response(response, f"POST /login {data!r}")
        assert (response.status_code == 303) == (token == TOKEN), response.text[:300]


@pytest.mark.parametrize(
    ("method", "path", "fields"),
    [
        # Digits str.isdigit() accepts but int() refuses ('²', '①') once became a 500.
        ("GET", "/jobs", {"before": "²"}),
        ("GET", "/", {"notice": "retry", "n": "①"}),
        ("POST", "/actions/jobs", {"action": "retry", "ids": "²"}),
        ("POST", "/actions/queues", {"action": "scale", "queue": "default", "limit": "²"}),
        ("GET", "/jobs", {"before": "١٢"}),  # Arabic-Indic digits: int() reads them
    ],
)
def test_digits_int_cannot_read(site: Site, method: str, path: str, fields: dict[str, str]) -> None:
    _client, browser, token, url = site
    before = table(url)
    if method == "GET":
        response = browser.get(path, params=fields)
    else:
        response = browser.post(path, data={**fields, "csrf_token": token})
    check_response(response, f"{method} {path} {fields}")
    if method == "GET" or response.status_code != 303:
        assert table(url) == before
