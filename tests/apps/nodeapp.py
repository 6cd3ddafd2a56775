"""An app for subprocess tests, configured through the environment.

- KOBAN_DATABASE_URL: the database (set by helpers.subprocess_env)
- KOBAN_TEST_GRACE: shutdown grace in seconds (default 5)
- KOBAN_TEST_LEDGER: a file every `record` job appends "<job id> <pid>" to

Worker names are `apps.nodeapp.<function>`; tests enqueue them by name.
"""

from __future__ import annotations

import asyncio
import os
import time

import koban

app = koban.Koban(
    os.environ["KOBAN_DATABASE_URL"],
    queues={"default": 10},
    shutdown_grace=float(os.environ.get("KOBAN_TEST_GRACE", "5")),
)


@app.worker(max_attempts=1)
async def record(job: koban.Job) -> None:
    """Append this job's id and the process id to the ledger: one line per run."""
    # O_APPEND makes each short write atomic, so two processes never interleave lines.
    fd = os.open(os.environ["KOBAN_TEST_LEDGER"], os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    try:
        os.write(fd, f"{job.id} {os.getpid()}\n".encode())
    finally:
        os.close(fd)
    await asyncio.sleep(0.001)


@app.worker(max_attempts=1)
async def sleepy(job: koban.Job) -> None:
    """Sleep `seconds` on the event loop."""
    await asyncio.sleep(float(job.args["seconds"]))


@app.worker(max_attempts=1)
def sleepy_sync(job: koban.Job) -> None:
    """Sleep `seconds` in a worker thread."""
    time.sleep(float(job.args["seconds"]))
