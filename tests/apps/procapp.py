"""An app with a process worker, for subprocess tests (see tests/apps/nodeapp.py).

- KOBAN_DATABASE_URL: the database (set by helpers.subprocess_env)
"""

from __future__ import annotations

import os

import koban
import procworkers

app = koban.Koban(
    os.environ["KOBAN_DATABASE_URL"], queues={"default": 2}, processes=1, shutdown_grace=1.0
)
hang = app.worker(procworkers.hang, executor="process", max_attempts=1)
