"""koban's pytest plugin, loaded automatically once koban is installed (entry point `pytest11`).

Fixtures:

- ``koban_app``: the app under test. Set it once in the pytest configuration::

      [tool.pytest.ini_options]
      koban_app = "myproject.jobs:app"

  or define a ``koban_app`` fixture in conftest.py (it wins over this one), for example one that
  builds the app on a per-test database.
- ``koban_testing``: a `koban.testing.KobanTesting` for ``koban_app``, in manual mode unless
  the test is marked ``@pytest.mark.koban(mode="inline")``; the module-level helpers
  (`koban.testing.assert_enqueued`, `drain_queue`...) use it during the test. The app's
  enqueue is restored afterwards.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest

from koban.testing.helpers import MODES, KobanTesting, use

if TYPE_CHECKING:
    from koban.app import Koban

INI_APP = "koban_app"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addini(INI_APP, "The koban app under test, as module:attribute", default="")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "koban(mode): run the koban_testing fixture in 'manual' (default) or 'inline' mode",
    )


def load_app(path: str) -> Koban:
    """Import `module:attribute` and return the koban app it names."""
    from koban.app import Koban

    module_name, sep, attr = path.partition(":")
    if not sep or not module_name or not attr:
        raise pytest.UsageError(f"{INI_APP} = {path!r} must look like 'package.module:app'")
    module = importlib.import_module(module_name)
    app: object = module
    for part in attr.split("."):
        app = getattr(app, part)
    if not isinstance(app, Koban):
        raise pytest.UsageError(
            f"{INI_APP} = {path!r} is a {type(app).__name__}, not a koban.Koban application"
        )
    return app


@pytest.fixture
def koban_app(request: pytest.FixtureRequest) -> Koban:
    """The app under test, from the `koban_app` ini setting (override the fixture to build one)."""
    path = str(request.config.getini(INI_APP) or "")
    if not path:
        raise pytest.UsageError(
            "koban.testing: no app to test; set koban_app = 'package.module:app' in the pytest "
            "configuration, or define a koban_app fixture in conftest.py"
        )
    return load_app(path)


@pytest.fixture
def koban_testing(request: pytest.FixtureRequest, koban_app: Koban) -> Iterator[KobanTesting]:
    """Testing helpers for `koban_app`, in the mode the test's koban marker asks for."""
    mode = "manual"
    marker = request.node.get_closest_marker("koban")
    if marker is not None:
        mode = marker.kwargs.get("mode", marker.args[0] if marker.args else "manual")
        if mode not in MODES:
            raise pytest.UsageError(
                f"@pytest.mark.koban(mode={mode!r}) on {request.node.nodeid}: "
                f"mode must be one of {', '.join(MODES)}"
            )
    with use(koban_app, mode) as testing:
        yield testing
