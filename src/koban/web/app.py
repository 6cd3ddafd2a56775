"""The dashboard's ASGI app: pages, actions, live fragments and /metrics.

Pages render on the server with Jinja2 (autoescaped: nothing from a job reaches the page as
markup). A small hand-written script refreshes each page's live region by fetching the same
URL with ``?partial=1`` every few seconds, and asks before bulk or destructive actions.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from jinja2 import Environment, FileSystemLoader, select_autoescape
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, PlainTextResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import Receive, Scope, Send

from koban.app import Koban
from koban.engines.base import JobFilter, redact
from koban.errors import DatabaseError, KobanError
from koban.job import FINISHED_STATES, Job, JobState
from koban.plugins.lifeline import DEFAULT_RESCUE_AFTER
from koban.web import auth as _auth
from koban.web.auth import (
    CSRF_COOKIE,
    CSRF_FIELD,
    CSRF_HEADER,
    SESSION_COOKIE,
    SESSION_SECONDS,
    PasswordAuth,
    Resolver,
    Signer,
    TokenAuth,
    User,
)
from koban.web.stats import STATES, JobCounts, estimate_jobs, job_counts, throughput

log = logging.getLogger("koban.web")

HERE = Path(__file__).resolve().parent
PAGE_SIZE = 50
#: A node whose heartbeat is older than this is shown as gone (the lifeline's default).
LIVE_WITHIN = DEFAULT_RESCUE_AFTER
#: Seconds a count or chart is reused before the database is asked again.
CACHE_SECONDS = 3.0

Handler = Callable[[Request, User], Awaitable[Response]]


class Forbidden(Exception):
    """The signed-in user may not do this (read-only)."""


class Dashboard:
    """The dashboard as an ASGI app, for a `Koban` app or a database URL.

    `auth` is a `TokenAuth`, a `PasswordAuth` or a resolver callable (see `koban.web.auth`);
    there is no anonymous access. `read_only=True` makes every user read-only. `secret_key`
    signs sessions and CSRF tokens: set it when several processes serve the dashboard, so a
    sign-in works on all of them (by default each process draws a random one).
    `refresh` is the live-update period in seconds. `login_url` is where a resolver-based
    dashboard sends people who are not signed in to the host app.
    """

    def __init__(
        self,
        app_or_url: Koban | str,
        *,
        auth: TokenAuth | PasswordAuth | Resolver,
        read_only: bool = False,
        secret_key: str | bytes | None = None,
        refresh: float = 2.0,
        login_url: str | None = None,
        title: str = "koban",
    ) -> None:
        if auth is None:
            raise KobanError(
                "the dashboard needs authentication: pass auth=TokenAuth(...), "
                "PasswordAuth(...) or a resolver callable"
            )
        self.app = app_or_url if isinstance(app_or_url, Koban) else Koban(app_or_url)
        # An app handed in belongs to its host (it may be running a node): never close it.
        self._owns_app = not isinstance(app_or_url, Koban)
        self.auth = auth
        self.read_only = read_only
        self.signer = Signer(secret_key)
        self.refresh = refresh
        self.login_url = login_url
        self.title = title
        self._open_lock = asyncio.Lock()
        self._opened = False
        self._cache: dict[str, tuple[float, Any]] = {}
        self._metrics: Any = None
        self.templates = Environment(
            loader=FileSystemLoader(HERE / "templates"),
            autoescape=select_autoescape(["html"], default=True),
            trim_blocks=True,
            lstrip_blocks=True,
        )
        self.templates.filters.update(
            when=_when, ago=_ago, pretty=_pretty, compact=_compact, number=_number
        )
        self.starlette = Starlette(
            routes=[
                Route("/", self._page(self.overview), name="overview"),
                Route("/jobs", self._page(self.jobs), name="jobs"),
                Route("/jobs/{job_id:int}", self._page(self.job), name="job"),
                Route("/cron", self._page(self.cron), name="cron"),
                Route("/metrics", self._page(self.metrics), name="metrics"),
                Route("/actions/jobs", self._page(self.job_action), methods=["POST"]),
                Route("/actions/queues", self._page(self.queue_action), methods=["POST"]),
                Route("/login", self.login, methods=["GET", "POST"]),
                Route("/logout", self.logout, methods=["POST"]),
                Mount("/static", StaticFiles(directory=HERE / "static"), name="static"),
            ],
            lifespan=self._lifespan,
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.starlette(scope, receive, send)

    # ----- lifecycle ------------------------------------------------------------------------
    @asynccontextmanager
    async def _lifespan(self, _: Starlette) -> AsyncIterator[None]:
        yield
        await self.close()

    async def _ensure_open(self) -> None:
        # Mounted sub-apps get no lifespan events, so the app opens on the first request.
        if not self._opened:
            async with self._open_lock:
                if not self._opened:
                    await self.app.open()
                    self._opened = True

    async def close(self) -> None:
        """Release the database connections of an app the dashboard made from a URL."""
        if self._opened and self._owns_app:
            self._opened = False
            await self.app.close()

    # ----- auth plumbing --------------------------------------------------------------------
    async def authenticate(self, request: Request) -> tuple[User | None, bool]:
        """The user behind a request, and whether a bearer header (not a cookie) proved it."""
        header = request.headers.get("authorization", "")
        if isinstance(self.auth, TokenAuth) and header[:7].lower() == "bearer ":
            user = self.auth.check(header[7:].strip())
            return self._role(user), True
        if isinstance(self.auth, TokenAuth | PasswordAuth):
            cookie = request.cookies.get(SESSION_COOKIE)
            user = self.signer.read_session(cookie, self.auth.fingerprint()) if cookie else None
            return self._role(user), False
        return self._role(await _auth.resolve(self.auth, request)), False

    def _role(self, user: User | None) -> User | None:
        if user is not None and self.read_only and not user.read_only:
            return User(user.name, read_only=True)
        return user

    def _page(self, handler: Handler) -> Callable[[Request], Awaitable[Response]]:
        async def endpoint(request: Request) -> Response:
            user, by_header = await self.authenticate(request)
            if user is None:
                return self._unauthenticated(request, by_header)
            if request.method == "POST":
                form = await request.form()
                token = request.headers.get(CSRF_HEADER) or str(form.get(CSRF_FIELD) or "")
                if not by_header and not (
                    self._same_origin(request)
                    and self.signer.check_csrf(request.cookies.get(CSRF_COOKIE), token)
                ):
                    return self._error(
                        request, user, 403, "This form expired or came from another site; "
                        "reload the page and try again."
                    )  # fmt: skip
                if user.read_only:
                    return self._error(request, user, 403, "Your access is read-only.")
            try:
                await self._ensure_open()
                return await handler(request, user)
            except DatabaseError as exc:
                log.warning("dashboard: database error: %s", exc)
                return self._error(
                    request, user, 503, "The database is unavailable or not migrated; "
                    "see the dashboard's log for details."
                )  # fmt: skip
            except KobanError as exc:
                return self._error(request, user, 400, str(exc))

        return endpoint

    def _same_origin(self, request: Request) -> bool:
        # Browsers send Origin on POST; when present it must be this site.
        origin = request.headers.get("origin")
        if not origin or origin == "null":
            return origin is None
        host = request.headers.get("host", "")
        return origin.split("://", 1)[-1] == host

    def _unauthenticated(self, request: Request, by_header: bool) -> Response:
        wants_html = "text/html" in request.headers.get("accept", "")
        if by_header or not wants_html or request.method != "GET":
            return PlainTextResponse(
                "authentication required", 401, headers={"WWW-Authenticate": "Bearer"}
            )
        if isinstance(self.auth, TokenAuth | PasswordAuth):
            target = request.url.path.removeprefix(self._root(request)) or "/"
            if request.url.query:
                target += "?" + request.url.query
            return RedirectResponse(
                self.url(request, "/login") + "?" + urlencode({"next": target}), 303
            )
        if self.login_url:
            return RedirectResponse(self.login_url, 303)
        return self._render(
            request, None, "message.html", {"heading": "Not signed in",
            "message": "Sign in to the application that hosts this dashboard."}, status=401,
        )  # fmt: skip

    # ----- rendering ------------------------------------------------------------------------
    @staticmethod
    def _root(request: Request) -> str:
        return str(request.scope.get("root_path", "")).rstrip("/")

    def url(self, request: Request, path: str, **query: Any) -> str:
        """A URL inside the dashboard, wherever it is mounted."""
        params = {k: v for k, v in query.items() if v not in (None, "", [], ())}
        suffix = "?" + urlencode(params, doseq=True) if params else ""
        return self._root(request) + path + suffix

    def _csrf(self, request: Request) -> tuple[str, str | None]:
        """This browser's CSRF cookie (new if it has none) and the cookie to set, if new."""
        cookie = request.cookies.get(CSRF_COOKIE)
        if cookie and len(cookie) >= 16:
            return cookie, None
        cookie = self.signer.new_csrf_cookie()
        return cookie, cookie

    def _render(
        self,
        request: Request,
        user: User | None,
        template: str,
        context: dict[str, Any],
        status: int = 200,
    ) -> Response:
        cookie, new_cookie = self._csrf(request)
        partial = request.query_params.get("partial") == "1"
        page = self.templates.get_template(template)
        variables = dict(
            request=request,
            user=user,
            url=lambda path, **q: self.url(request, path, **q),
            static=lambda name: self.url(request, "/static/" + name),
            csrf_token=self.signer.csrf_token(cookie),
            title=self.title,
            refresh_ms=int(self.refresh * 1000),
            states=STATES,
            partial=partial,
            now=datetime.now(UTC),
            here=self._here(request),
            sign_out=isinstance(self.auth, TokenAuth | PasswordAuth),
            **context,
        )
        if partial and "live" in page.blocks:
            # Live refresh: only the page's live region, rendered by the same template.
            html = "".join(page.blocks["live"](page.new_context(variables)))
        else:
            html = page.render(variables)
        response = HTMLResponse(html, status)
        _security_headers(response)
        if new_cookie:
            response.set_cookie(
                CSRF_COOKIE, new_cookie, httponly=True, samesite="strict",
                path=self._root(request) + "/", secure=request.url.scheme == "https",
            )  # fmt: skip
        return response

    def _here(self, request: Request) -> str:
        """This page's path and query inside the dashboard, for redirects after an action."""
        query = [(k, v) for k, v in request.query_params.multi_items() if k != "partial"]
        path = request.url.path.removeprefix(self._root(request)) or "/"
        return path + ("?" + urlencode(query) if query else "")

    def _error(self, request: Request, user: User | None, status: int, message: str) -> Response:
        heading = {400: "Cannot do that", 403: "Not allowed", 404: "Not found"}.get(
            status, "Something is wrong"
        )
        return self._render(
            request, user, "message.html", {"heading": heading, "message": message}, status
        )

    def _back(self, request: Request, form: Any, **notice: Any) -> Response:
        target = str(form.get("next") or "/")
        # Only paths inside the dashboard: never an open redirect to another site.
        if not target.startswith("/") or target.startswith("//") or "\\" in target:
            target = "/"
        sep = "&" if "?" in target else "?"
        extra = urlencode({k: v for k, v in notice.items() if v is not None})
        return RedirectResponse(self._root(request) + target + (sep + extra if extra else ""), 303)

    async def _cached(self, key: str, make: Callable[[], Awaitable[Any]]) -> Any:
        hit = self._cache.get(key)
        if hit is not None and time.monotonic() - hit[0] < CACHE_SECONDS:
            return hit[1]
        value = await make()
        self._cache[key] = (time.monotonic(), value)
        return value

    # ----- cluster facts ---------------------------------------------------------------------
    async def _cluster(self) -> tuple[dict[str, Any], list[Any] | None]:
        """Queue settings and registered nodes, or ({}, None) where the engine has none."""
        try:
            settings = await self.app.engine.queue_settings()
            nodes = await self.app.engine.list_nodes()
        except NotImplementedError:
            return {}, None
        return settings, nodes

    async def _queues(
        self, settings: dict[str, Any], nodes: list[Any] | None
    ) -> tuple[JobCounts, list[dict[str, Any]]]:
        counts: JobCounts = await self._cached(
            "counts", lambda: job_counts(self.app, list(settings))
        )
        live = [n for n in nodes or [] if _age_seconds(n.heartbeat_at) < LIVE_WITHIN]
        names = sorted(set(counts.by_queue) | {q for n in live for q in n.queues})
        rows = []
        for name in names:
            setting = settings.get(name)
            reports = [n.queues[name] for n in live if isinstance(n.queues.get(name), dict)]
            slots = [int(r["limit"]) for r in reports if isinstance(r.get("limit"), int)]
            rows.append({
                "name": name,
                "counts": counts.by_queue.get(name) or dict.fromkeys(STATES, 0),
                "paused": bool(setting and setting.paused),
                "paused_nodes": sum(1 for r in reports if r.get("paused")),
                "limit": setting.limit if setting and setting.limit is not None else None,
                "node_slots": sorted(set(slots)),
                "nodes": len(reports),
                "running": sum(int(r.get("running") or 0) for r in reports),
            })  # fmt: skip
        return counts, rows

    @staticmethod
    def _nodes(nodes: list[Any] | None) -> list[dict[str, Any]] | None:
        if nodes is None:
            return None
        return [
            {
                "name": n.name,
                "queues": {
                    q: info if isinstance(info, dict) else {}
                    for q, info in sorted(n.queues.items())
                },
                "started_at": n.started_at,
                "heartbeat_at": n.heartbeat_at,
                "heartbeat_age": _age_seconds(n.heartbeat_at),
                "live": _age_seconds(n.heartbeat_at) < LIVE_WITHIN,
                "leader": bool(n.leader),
            }
            for n in nodes
        ]

    # ----- pages ----------------------------------------------------------------------------
    async def overview(self, request: Request, user: User) -> Response:
        settings, nodes = await self._cluster()
        counts, queues = await self._queues(settings, nodes)
        minutes = await self._cached("throughput", lambda: throughput(self.app, 60))
        return self._render(request, user, "overview.html", {
            "page": "overview",
            "counts": counts,
            "queues": queues,
            "chart": _chart(minutes),
            "nodes": self._nodes(nodes),
            "live_within": LIVE_WITHIN,
            "notice": _notice(request),
        })  # fmt: skip

    def _filter(self, request: Request) -> tuple[JobFilter, dict[str, Any]]:
        q = request.query_params
        state = q.get("state") or ""
        if state and state not in STATES:
            raise KobanError(f"unknown state {state!r}; use one of {', '.join(STATES)}")
        values = {
            "state": state,
            "queue": (q.get("queue") or "").strip(),
            "worker": (q.get("worker") or "").strip(),
            "tag": (q.get("tag") or "").strip(),
            "args": (q.get("args") or "").strip(),
        }
        flt = JobFilter(
            states=[state] if state else None,
            queues=[values["queue"]] if values["queue"] else None,
            workers=[values["worker"]] if values["worker"] else None,
            tags=[values["tag"]] if values["tag"] else None,
            args_text=values["args"] or None,
        )
        return flt, values

    async def jobs(self, request: Request, user: User) -> Response:
        flt, values = self._filter(request)
        before = request.query_params.get("before")
        flt.before_id = int(before) if before and before.isdecimal() else None
        flt.limit = PAGE_SIZE + 1
        found = await self.app.alist_jobs(flt)
        more = len(found) > PAGE_SIZE
        found = found[:PAGE_SIZE]
        total = await estimate_jobs(self.app, flt)
        return self._render(request, user, "jobs.html", {
            "page": "jobs",
            "jobs": found,
            "filters": values,
            "before": flt.before_id,
            "older": found[-1].id if more and found else None,
            "total": total,
            "notice": _notice(request),
        })  # fmt: skip

    async def job(self, request: Request, user: User) -> Response:
        job_id = int(request.path_params["job_id"])
        job = await self.app.aget_job(job_id)
        if job is None:
            return self._error(
                request, user, 404, f"Job {job_id} does not exist (it may have been pruned)."
            )
        return self._render(request, user, "job.html", {
            "page": "jobs",
            "job": job,
            "timeline": _timeline(job),
            "finished": job.state in FINISHED_STATES,
            "notice": _notice(request),
        })  # fmt: skip

    async def cron(self, request: Request, user: User) -> Response:
        try:
            entries = await self.app.acron_entries()
        except NotImplementedError:
            entries = None
        return self._render(request, user, "cron.html", {"page": "cron", "entries": entries})

    async def metrics(self, request: Request, user: User) -> Response:
        try:
            from koban.contrib.prometheus import CONTENT_TYPE, PrometheusMetrics
        except ImportError:
            return PlainTextResponse(
                "metrics need the prometheus extra: pip install 'koban[prometheus]'", 501
            )
        if self._metrics is None:
            self._metrics = PrometheusMetrics()
            self._metrics.attach(self.app.telemetry)
        await self._cached("metrics", lambda: self._metrics.refresh(self.app))
        return Response(self._metrics.render(), media_type=CONTENT_TYPE)

    # ----- actions --------------------------------------------------------------------------
    async def job_action(self, request: Request, user: User) -> Response:
        form = await request.form()
        action = str(form.get("action") or "")
        ids = [int(str(v)) for v in form.getlist("ids") if str(v).isdecimal()]
        if action not in ("retry", "cancel", "delete"):
            return self._error(request, user, 400, f"Unknown job action {action!r}.")
        if not ids:
            return self._back(request, form, notice="none")
        flt = JobFilter(ids=ids)
        if action == "retry":
            done = len(await self.app.aretry_jobs(flt))
        elif action == "cancel":
            done = len(await self.app.acancel_jobs(flt))
        else:
            done = len(await self.app.adelete_jobs(flt))
        log.info("dashboard: %s %s job(s) %s: %d applied", user.name, action, ids[:20], done)
        self._cache.clear()
        back: Any = form
        if action == "delete" and done and str(form.get("next") or "").startswith("/jobs/"):
            back = {"next": "/jobs"}  # the job's own page is gone
        return self._back(request, back, notice=action, n=done, of=len(ids))

    async def queue_action(self, request: Request, user: User) -> Response:
        form = await request.form()
        action = str(form.get("action") or "")
        queue = str(form.get("queue") or "").strip()
        node = str(form.get("node") or "").strip() or None
        if not queue:
            return self._error(request, user, 400, "Name the queue to change.")
        method = getattr(self.app, f"a{action}_queue", None) if action in (
            "pause", "resume", "scale"
        ) else None  # fmt: skip
        if method is None:
            return self._error(request, user, 400, f"Queue action {action!r} is not available.")
        if action == "scale":
            raw = str(form.get("limit") or "")
            if not raw.isdecimal():
                return self._error(
                    request, user, 400, f"Scale queue {queue!r}: the limit must be a whole "
                    f"number of slots, got {raw!r}."
                )  # fmt: skip
            await method(queue, int(raw), node=node)
        else:
            await method(queue, node=node)
        log.info("dashboard: %s %s queue %r", user.name, action, queue)
        self._cache.clear()
        return self._back(request, form, notice=action, queue=queue)

    # ----- sign-in --------------------------------------------------------------------------
    async def login(self, request: Request) -> Response:
        if not isinstance(self.auth, TokenAuth | PasswordAuth):
            if self.login_url:
                return RedirectResponse(self.login_url, 303)
            return self._error(request, None, 404, "Sign in through the host application.")
        error = None
        next_path = request.query_params.get("next") or "/"
        if request.method == "POST":
            form = await request.form()
            next_path = str(form.get("next") or "/")
            if not (
                self._same_origin(request)
                and self.signer.check_csrf(
                    request.cookies.get(CSRF_COOKIE), str(form.get(CSRF_FIELD) or "")
                )
            ):
                error = "The form expired; please try again."
            else:
                if isinstance(self.auth, TokenAuth):
                    user = self.auth.check(str(form.get("token") or ""))
                else:
                    user = self.auth.check(
                        str(form.get("username") or ""), str(form.get("password") or "")
                    )
                if user is not None:
                    response = self._back(request, {"next": next_path})
                    response.set_cookie(
                        SESSION_COOKIE,
                        self.signer.session(user, self.auth.fingerprint()),
                        max_age=SESSION_SECONDS,
                        httponly=True,
                        samesite="lax",
                        path=self._root(request) + "/",
                        secure=request.url.scheme == "https",
                    )
                    log.info("dashboard: %s signed in", user.name)
                    return response
                log.warning("dashboard: failed sign-in from %s", _client(request))
                error = "That did not match; try again."
        return self._render(
            request, None, "login.html",
            {"page": "login", "kind": self.auth.kind, "error": error, "next": next_path},
            status=401 if error else 200,
        )  # fmt: skip

    async def logout(self, request: Request) -> Response:
        form = await request.form()
        if not self.signer.check_csrf(
            request.cookies.get(CSRF_COOKIE), str(form.get(CSRF_FIELD) or "")
        ):
            return self._error(request, None, 403, "This form expired; reload and try again.")
        response = RedirectResponse(self.url(request, "/login"), 303)
        response.delete_cookie(SESSION_COOKIE, path=self._root(request) + "/")
        return response

    def __repr__(self) -> str:
        return f"<koban Dashboard {redact(self.app.engine.url)}>"


# ----- helpers -------------------------------------------------------------------------------
def _security_headers(response: Response) -> None:
    response.headers["Content-Security-Policy"] = (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
    )
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Referrer-Policy"] = "same-origin"
    response.headers["X-Frame-Options"] = "DENY"
    response.headers["Cache-Control"] = "no-store"


def _client(request: Request) -> str:
    return request.client.host if request.client else "unknown"


_NOTICES = {
    "retry": "Retried {n} of {of} job(s).",
    "cancel": "Cancelled {n} of {of} job(s).",
    "delete": "Deleted {n} of {of} job(s).",
    "none": "Select at least one job first.",
    "pause": "Paused queue {queue}.",
    "resume": "Resumed queue {queue}.",
    "scale": "Scaled queue {queue}.",
}


def _notice(request: Request) -> str | None:
    q = request.query_params
    template = _NOTICES.get(q.get("notice") or "")
    if template is None:
        return None
    n, of = q.get("n", "0"), q.get("of", "0")
    return template.format(
        n=int(n) if n.isdecimal() else 0,
        of=int(of) if of.isdecimal() else 0,
        queue=q.get("queue", ""),
    )


def _age_seconds(value: datetime | None) -> float:
    return (datetime.now(UTC) - value).total_seconds() if value else float("inf")


def _when(value: datetime | None) -> str:
    if value is None:
        return "—"
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _ago(value: datetime | float | None) -> str:
    if value is None:
        return "—"
    seconds = value if isinstance(value, int | float) else (
        datetime.now(UTC) - value
    ).total_seconds()  # fmt: skip
    future = seconds < 0
    seconds = abs(seconds)
    if seconds < 60:
        text = f"{seconds:.0f}s"
    elif seconds < 3600:
        text = f"{seconds / 60:.0f}m"
    elif seconds < 86400:
        text = f"{seconds / 3600:.1f}h"
    else:
        text = f"{seconds / 86400:.1f}d"
    return f"in {text}" if future else f"{text} ago"


def _pretty(value: Any) -> str:
    return json.dumps(value, indent=2, ensure_ascii=False, default=str, sort_keys=True)


def _compact(value: Any, width: int = 80) -> str:
    text = json.dumps(value, ensure_ascii=False, default=str)
    return text if len(text) <= width else text[: width - 1] + "…"


def _number(value: int) -> str:
    if value >= 10_000_000:
        return f"{value / 1_000_000:.0f}M"
    if value >= 1_000_000:
        return f"{value / 1_000_000:.1f}M"
    if value >= 100_000:
        return f"{value / 1000:.0f}k"
    return f"{value:,}"


def _timeline(job: Job) -> list[dict[str, Any]]:
    """What happened to a job, oldest first: insert, each failed attempt, the latest run, end."""
    events: list[dict[str, Any]] = []
    if job.inserted_at:
        events.append(
            {"at": job.inserted_at, "kind": "inserted", "text": f"Inserted into {job.queue}"}
        )
    for error in job.errors:
        at = _parse(error.get("at"))
        kind = {"koban.Cancel": "cancelled", "koban.Discard": "discarded"}.get(
            str(error.get("type")), "failed"
        )
        events.append({
            "at": at, "kind": kind,
            "text": f"Attempt {error.get('attempt')} {kind}: "
            f"{error.get('type')}: {error.get('message')}",
        })  # fmt: skip
    if job.attempted_at:
        by = (job.attempted_by or ["?"])[0]
        events.append({
            "at": job.attempted_at, "kind": "attempt",
            "text": f"Attempt {job.attempt} of {job.max_attempts} started on {by}",
        })  # fmt: skip
    for at, kind, text in (
        (job.completed_at, "completed", "Completed"),
        (job.cancelled_at, "cancelled", "Cancelled"),
        (job.discarded_at, "discarded", "Discarded"),
    ):
        if at is not None:
            events.append({"at": at, "kind": kind, "text": text})
    if job.state in (JobState.SCHEDULED, JobState.RETRYABLE) and job.scheduled_at:
        events.append({"at": job.scheduled_at, "kind": "scheduled", "text": "Runs next"})
    far = datetime.max.replace(tzinfo=UTC)
    events.sort(key=lambda e: e["at"] or far)
    return events


def _parse(value: Any) -> datetime | None:
    try:
        parsed = datetime.fromisoformat(str(value))
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def _chart(minutes: list[Any]) -> dict[str, Any]:
    """Bars for an SVG chart: completed and failed per minute, scaled to the busiest minute."""
    width, height, pad = 1200, 150, 28
    peak = max([m.completed + m.failed for m in minutes] + [1])
    slot = (width - pad) / max(len(minutes), 1)
    bars = []
    for i, m in enumerate(minutes):
        x = pad + i * slot
        done_h = (height - 20) * m.completed / peak
        fail_h = (height - 20) * m.failed / peak
        bars.append({
            "x": round(x + 1, 1), "w": round(max(slot - 2, 1), 1),
            "done_y": round(height - done_h, 1), "done_h": round(done_h, 1),
            "fail_y": round(height - done_h - fail_h, 1), "fail_h": round(fail_h, 1),
            "label": f"{m.minute.astimezone(UTC):%H:%M} UTC: "
            f"{m.completed} completed, {m.failed} failed",
        })  # fmt: skip
    start = minutes[0].minute if minutes else datetime.now(UTC) - timedelta(hours=1)
    return {
        "width": width,
        "height": height,
        "pad": pad,
        "peak": peak,
        "bars": bars,
        "start": start,
        "completed": sum(m.completed for m in minutes),
        "failed": sum(m.failed for m in minutes),
    }
