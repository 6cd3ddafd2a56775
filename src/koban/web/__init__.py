"""The koban dashboard: an ASGI app to see and steer jobs, queues, nodes and cron.

>>> from koban.web import dashboard, TokenAuth
>>> web = dashboard(app, auth=TokenAuth("a-long-random-token"))
>>> starlette_app.mount("/koban", web)        # or: uvicorn.run(web)

Needs the `web` extra: ``pip install 'koban[web]'``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from koban.web.app import Dashboard
    from koban.web.auth import PasswordAuth, TokenAuth, User

__all__ = ["Dashboard", "PasswordAuth", "TokenAuth", "User", "dashboard"]


def dashboard(app_or_url: Any, **options: Any) -> Dashboard:
    """The dashboard for a koban app (or a database URL) as an ASGI app; see `Dashboard`."""
    from koban.web.app import Dashboard

    return Dashboard(app_or_url, **options)


def __getattr__(name: str) -> Any:
    # Imported on first use so `koban.web.stats` works without the web extra installed.
    if name == "Dashboard":
        from koban.web.app import Dashboard

        return Dashboard
    if name in ("PasswordAuth", "TokenAuth", "User"):
        from koban.web import auth

        return getattr(auth, name)
    raise AttributeError(f"module 'koban.web' has no attribute {name!r}")
