"""The dashboard in a real browser: Playwright driving Debian's headless Chromium.

Screenshots land in test-artifacts/ at the top of the repository.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import playwright.sync_api
import pytest

import koban
from helpers import REPO_DIR, wait_until
from koban.web import TokenAuth, dashboard
from web.conftest import serve
from web.opsapp import FLAKY, GREET, build, enqueue

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
ARTIFACTS = REPO_DIR / "test-artifacts"
TOKEN = "browser-test-token-0123"


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not os.path.exists(CHROMIUM):
        pytest.fail(f"{CHROMIUM} is missing: install Debian's chromium package (see .ci/run)")
    with playwright.sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield browser
        browser.close()


def shot(page: Any, name: str, url: str) -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    engine = "-sqlite" if url.startswith("sqlite") else ""
    path = ARTIFACTS / f"dashboard-{name}{engine}.png"
    page.screenshot(path=str(path), full_page=True)
    return path


def state_of(app: koban.Koban, job_id: int) -> str | None:
    job = app.get_job(job_id)
    return str(job.state) if job else None


def test_find_a_failed_job_retry_it_and_watch_it_complete(
    db_url: str, browser: Any, run_node: Callable[[koban.Koban], Any]
) -> None:
    expect = playwright.sync_api.expect
    app = build(db_url)
    done = [enqueue(app, GREET, {"n": n}) for n in range(3)]
    failing = enqueue(app, FLAKY, {"to": "ada@example.com", "fail": True}, tags=["newsletter"])
    waiting = [enqueue(app, GREET, {"later": n}, schedule_in=3600) for n in range(2)]

    node = run_node(build(db_url))
    wait_until(lambda: state_of(app, failing.id) == "discarded", what="the failing job to fail")
    wait_until(
        lambda: all(state_of(app, j.id) == "completed" for j in done), what="jobs to complete"
    )
    node.stop()

    cron = [koban.Cron("0 6 * * *", GREET, args={"digest": True}, name="morning-digest")]
    web = dashboard(build(db_url, cron=cron), auth=TokenAuth(TOKEN), refresh=0.3)
    with serve(web) as base:
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.set_default_timeout(15_000)

        # Signing in lands on the overview, with the failure counted and charted.
        page.goto(base + "/")
        expect(page).to_have_url(f"{base}/login?next=%2F")
        page.fill('input[name="token"]', TOKEN)
        page.click('button[type="submit"]')
        expect(page).to_have_url(base + "/")
        expect(page.locator(".total.state-discarded .n")).to_have_text("1")
        expect(page.locator(".total.state-completed .n")).to_have_text("3")
        expect(page.locator("svg.chart rect.fail")).to_have_count(1)
        expect(page.locator('tr[data-queue="mailers"]')).to_be_visible()
        shot(page, "overview", db_url)

        # Filter the jobs list down to the failed job.
        page.click('nav >> text="Jobs"')
        page.select_option('select[name="state"]', "discarded")
        page.fill('input[name="worker"]', FLAKY)
        page.click('form.filters button[type="submit"]')
        rows = page.locator("table.jobs tbody tr")
        expect(rows).to_have_count(1)
        expect(rows.first).to_have_attribute("data-job-id", str(failing.id))
        shot(page, "jobs-failed", db_url)

        # Its page shows the error with the traceback and a timeline of the attempt.
        page.click(f'a[href="/jobs/{failing.id}"]')
        expect(page.locator("[data-job-state]")).to_have_text("discarded")
        expect(page.locator(".error-entry .message")).to_contain_text("mail server said no")
        expect(page.locator("pre.traceback")).to_contain_text("RuntimeError")
        expect(page.locator(".timeline .ev-failed")).to_have_count(1)
        shot(page, "job-failed", db_url)

        # Retry asks first; then, with no node running, the job waits as available.
        page.once("dialog", lambda dialog: dialog.dismiss())
        page.click('button[value="retry"]')
        expect(page.locator("[data-job-state]")).to_have_text("discarded")
        page.once("dialog", lambda dialog: dialog.accept())
        page.click('button[value="retry"]')
        expect(page.locator(".notice")).to_have_text("Retried 1 of 1 job(s).")
        expect(page.locator("[data-job-state]")).to_have_text("available")

        # A node starts; the page updates itself (same document, no reload) to completed.
        page.evaluate("window.__sameDocument = true")
        run_node(build(db_url))
        expect(page.locator("[data-job-state]")).to_have_text("completed")
        assert page.evaluate("window.__sameDocument") is True
        expect(page.locator(".timeline .ev-completed")).to_have_count(1)
        shot(page, "job-completed", db_url)
        assert state_of(app, failing.id) == "completed"

        # Bulk: select the two scheduled jobs and cancel them, after confirming.
        page.goto(base + "/jobs?state=scheduled")
        expect(page.locator("table.jobs tbody tr")).to_have_count(2)
        page.check("input[data-select-all]")
        expect(page.locator("[data-selected-count]")).to_have_text("2 selected")
        messages: list[str] = []

        def accept(dialog: Any) -> None:
            messages.append(dialog.message)
            dialog.accept()

        page.once("dialog", accept)
        page.click('button[value="cancel"]')
        expect(page.locator(".notice")).to_have_text("Cancelled 2 of 2 job(s).")
        assert messages == ["Cancel 2 selected job(s)?"]
        expect(page.locator("table.jobs tbody tr")).to_have_count(1)  # "No jobs match."
        assert all(state_of(app, j.id) == "cancelled" for j in waiting)

        # The overview now shows the running node as leader; the cron page its schedule.
        page.goto(base + "/")
        expect(page.locator(".badge.leader")).to_be_visible()
        shot(page, "overview-with-node", db_url)
        page.click('nav >> text="Cron"')
        expect(page.locator('tr[data-cron="morning-digest"]')).to_contain_text("0 6 * * *")
        shot(page, "cron", db_url)
        page.close()
    app.engine.close_sync()
