"""Workers for tests/test_process_pool.py, at module level so worker processes can import them.

Each writes what the test needs to see into files named by its args (a worker process shares
no memory with the test). Files are written whole and renamed into place, so a reader never
sees half of one.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import koban


def write(path: str | Path, data: Any) -> None:
    """Write `data` as JSON to `path` atomically."""
    tmp = Path(f"{path}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


def record_pid(job: koban.Job) -> None:
    """Append this process's id to the file `out` (one line per run)."""
    with open(job.args["out"], "a") as f:
        f.write(f"{os.getpid()}\n")


class RecordPid(koban.Worker):
    """`record_pid` as a class worker."""

    def perform(self, job: koban.Job) -> None:
        record_pid(job)


class NeedsTwo(Exception):
    """An exception that pickles but cannot be unpickled (its __init__ takes two arguments)."""

    def __init__(self, first: str, second: str) -> None:
        super().__init__(f"{first} needs {second}")


def fail_twice(job: koban.Job) -> None:
    """Attempt 1 raises ValueError, attempt 2 NeedsTwo, attempt 3 records its pid."""
    if job.attempt == 1:
        raise ValueError("boom on attempt 1")
    if job.attempt == 2:
        raise NeedsTwo("a", "b")
    record_pid(job)


def returns(job: koban.Job) -> koban.Snooze | koban.Cancel | koban.Discard | None:
    """Return the outcome named by `kind`."""
    return {
        "snooze": koban.Snooze(3600),
        "cancel": koban.Cancel("not wanted"),
        "discard": koban.Discard("of no use"),
    }.get(job.args["kind"])


def hang(job: koban.Job) -> None:
    """Write this process's id to `out`, then sleep far longer than any test waits."""
    write(job.args["out"], {"pid": os.getpid(), "cancelled": job.cancelled})
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        time.sleep(0.05)


def exit_hard(job: koban.Job) -> None:
    """Write this process's id to `out`, then end the process without any clean-up."""
    write(job.args["out"], {"pid": os.getpid()})
    os._exit(3)


def calls_sys_exit(job: koban.Job) -> None:
    """Write this process's id to `out`, then call sys.exit() as a script would."""
    write(job.args["out"], {"pid": os.getpid()})
    sys.exit(5)


def spin_until_peer(job: koban.Job) -> None:
    """Burn CPU until the job named `peer` has started too (or 10 s pass), then record this
    job's pid and its [start, end] window in `dir`/`name`.json."""
    folder, name, peer = Path(job.args["dir"]), job.args["name"], job.args["peer"]
    start = time.time()
    write(folder / f"{name}.started", {"pid": os.getpid()})
    saw_peer = False
    deadline = time.monotonic() + 10
    while not saw_peer and time.monotonic() < deadline:
        sum(i * i for i in range(2000))  # pure-Python work between two looks
        saw_peer = (folder / f"{peer}.started").exists()
    write(
        folder / f"{name}.json",
        {"pid": os.getpid(), "start": start, "end": time.time(), "saw_peer": saw_peer},
    )
