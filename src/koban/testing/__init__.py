"""koban.testing: run jobs in tests through the real execution path, check what was enqueued.

>>> from koban.testing import KobanTesting
>>> with KobanTesting(app) as testing:              # manual mode: nothing runs on its own
...     SyncAllWorker.enqueue({})
...     testing.assert_enqueued(worker=SyncAllWorker)
...     testing.drain_queue("default")              # {'completed': 1, ...}

With pytest, the `koban_testing` fixture (installed with koban as a pytest plugin) gives a
`KobanTesting` for the `koban_app` fixture; `@pytest.mark.koban(mode="inline")` switches a
test to inline mode. See docs/testing.md.
"""

from koban.testing.helpers import (
    MODES,
    OUTCOMES,
    KobanTesting,
    Outcome,
    all_enqueued,
    assert_enqueued,
    drain_queue,
    perform_job,
    refute_enqueued,
    run_sync,
    use,
)

__all__ = [
    "MODES",
    "OUTCOMES",
    "KobanTesting",
    "Outcome",
    "all_enqueued",
    "assert_enqueued",
    "drain_queue",
    "perform_job",
    "refute_enqueued",
    "run_sync",
    "use",
]
