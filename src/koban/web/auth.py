"""Who may see the dashboard, who may change things, and proof that a change came from its pages.

Three ways to authenticate, chosen with `dashboard(..., auth=...)`:

- `TokenAuth("s3cret", read_only_token="v1ew")`: people paste the token into the sign-in
  page; scripts and scrapers send ``Authorization: Bearer s3cret``.
- `PasswordAuth({"ada": "pw"}, read_only={"bob": "pw"})`: a username and password form.
- a resolver callable supplied by the host app, ``resolver(request) -> User | None`` (sync or
  async), for a dashboard mounted inside an app that already knows its users.

Read-only users see everything and change nothing. Every state-changing request is a POST that
must carry a CSRF token tied to a cookie by an HMAC (``signed double submit``), unless it is
authenticated by a bearer token, which a browser never sends on its own.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import inspect
import json
import secrets
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from starlette.requests import Request

SESSION_COOKIE = "koban_session"
CSRF_COOKIE = "koban_csrf"
CSRF_FIELD = "csrf_token"
CSRF_HEADER = "x-csrf-token"
#: How long a sign-in lasts.
SESSION_SECONDS = 12 * 3600


@dataclass(frozen=True, slots=True)
class User:
    """Someone signed in to the dashboard."""

    name: str
    read_only: bool = False


Resolver = Callable[[Request], "User | Awaitable[User | None] | None"]


class TokenAuth:
    """Sign in with a shared token; an optional second token gives read-only access."""

    kind = "token"

    def __init__(self, token: str, *, read_only_token: str | None = None) -> None:
        if not token or len(token) < 8:
            raise ValueError("the dashboard token must be at least 8 characters long")
        if read_only_token is not None and len(read_only_token) < 8:
            raise ValueError("the dashboard's read-only token must be at least 8 characters long")
        if read_only_token == token:
            raise ValueError("the read-only token must differ from the admin token")
        self._token = token
        self._read_only_token = read_only_token

    def check(self, token: str) -> User | None:
        if _same(token, self._token):
            return User("admin")
        if self._read_only_token is not None and _same(token, self._read_only_token):
            return User("viewer", read_only=True)
        return None

    def fingerprint(self) -> str:
        return _digest(f"{self._token}\0{self._read_only_token}")


class PasswordAuth:
    """Sign in with a username and password; users in `read_only` may only look."""

    kind = "password"

    def __init__(
        self, users: Mapping[str, str], *, read_only: Mapping[str, str] | None = None
    ) -> None:
        self._users = {name: (pw, False) for name, pw in users.items()}
        for name, pw in (read_only or {}).items():
            if name in self._users:
                raise ValueError(f"dashboard user {name!r} is listed both as admin and read-only")
            self._users[name] = (pw, True)
        if not self._users:
            raise ValueError("PasswordAuth needs at least one user")
        for name, (pw, _) in self._users.items():
            if not pw:
                raise ValueError(f"dashboard user {name!r} has an empty password")

    def check(self, name: str, password: str) -> User | None:
        entry = self._users.get(name)
        # Compare even for unknown names so timing does not reveal which names exist.
        expected, read_only = entry if entry else ("\0unknown", False)
        if _same(password, expected) and entry is not None:
            return User(name, read_only=read_only)
        return None

    def fingerprint(self) -> str:
        return _digest(json.dumps(sorted(self._users.items())))


Auth = TokenAuth | PasswordAuth | Resolver


def _same(given: str, expected: str) -> bool:
    return hmac.compare_digest(given.encode(), expected.encode())


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class Signer:
    """Signs session cookies and CSRF tokens with one secret."""

    def __init__(self, secret: str | bytes | None) -> None:
        if secret is None:
            secret = secrets.token_bytes(32)
        self._key = secret.encode() if isinstance(secret, str) else secret

    def mac(self, text: str) -> str:
        digest = hmac.new(self._key, text.encode(), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(digest).decode().rstrip("=")

    # ----- sessions -------------------------------------------------------------------------
    def session(self, user: User, fingerprint: str, now: float | None = None) -> str:
        payload = {
            "u": user.name,
            "ro": user.read_only,
            "exp": int((now or time.time()) + SESSION_SECONDS),
            "fp": fingerprint,
        }
        body = base64.urlsafe_b64encode(json.dumps(payload).encode()).decode().rstrip("=")
        return f"{body}.{self.mac('session:' + body)}"

    def read_session(self, cookie: str, fingerprint: str, now: float | None = None) -> User | None:
        body, _, mac = cookie.partition(".")
        if not body or not mac or not hmac.compare_digest(mac, self.mac("session:" + body)):
            return None
        try:
            payload = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
        except ValueError:
            return None
        # A changed token or password list ends every session signed for the old one.
        if payload.get("fp") != fingerprint or payload.get("exp", 0) < (now or time.time()):
            return None
        return User(str(payload.get("u")), read_only=bool(payload.get("ro")))

    # ----- CSRF -----------------------------------------------------------------------------
    @staticmethod
    def new_csrf_cookie() -> str:
        return secrets.token_urlsafe(24)

    def csrf_token(self, cookie: str) -> str:
        """The token pages embed for this browser's CSRF cookie."""
        return self.mac("csrf:" + cookie)

    def check_csrf(self, cookie: str | None, token: str | None) -> bool:
        if not cookie or not token:
            return False
        return hmac.compare_digest(token, self.csrf_token(cookie))


async def resolve(resolver: Resolver, request: Request) -> User | None:
    """Call a host app's resolver, sync or async; anything but a User means not signed in."""
    result: Any = resolver(request)
    if inspect.isawaitable(result):
        result = await result
    return result if isinstance(result, User) else None
