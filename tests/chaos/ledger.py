"""The independent ledger: what every attempt did, as seen by the worker code itself.

Each node process appends to its own file, one line per event, with O_APPEND so that a line is
one write() that the kernel keeps even if the process is SIGKILLed right after:

    S <job id> <attempt> <pid> <node> <monotonic ns> <wall ns>          an attempt started
    F <job id> <attempt> <pid> <node> <monotonic ns> <wall ns> ok|fail  its code ran to the end

The ledger never goes through koban or its database connection, so it can contradict them.
CLOCK_MONOTONIC is one clock for every process on the machine, so times compare across files;
the wall clock is the one PostgreSQL's now() reads on this machine, so it compares with the
times the database stores.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True, slots=True)
class Event:
    kind: str  # "S" (start) or "F" (finish)
    job_id: int
    attempt: int
    pid: int
    node: str
    at_ns: int
    wall_ns: int = 0
    outcome: str = ""  # "ok" or "fail" for finishes


class LedgerWriter:
    """Appends events for one process to `<directory>/<pid>.log`."""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        path = Path(directory) / f"{os.getpid()}.log"
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def write(self, kind: str, job_id: int, attempt: int, node: str, outcome: str = "") -> None:
        line = (
            f"{kind} {job_id} {attempt} {os.getpid()} {node} {time.monotonic_ns()} "
            f"{time.time_ns()} {outcome}"
        )
        os.write(self._fd, (line.rstrip() + "\n").encode())


def read_ledger(directory: str | os.PathLike[str]) -> list[Event]:
    """Every event from every process file, in time order. A torn last line is an error."""
    events: list[Event] = []
    for path in sorted(Path(directory).glob("*.log")):
        for number, line in enumerate(path.read_text().splitlines(), 1):
            parts = line.split()
            if len(parts) not in (7, 8) or parts[0] not in ("S", "F"):
                raise AssertionError(f"{path.name}:{number}: malformed ledger line {line!r}")
            events.append(
                Event(
                    kind=parts[0],
                    job_id=int(parts[1]),
                    attempt=int(parts[2]),
                    pid=int(parts[3]),
                    node=parts[4],
                    at_ns=int(parts[5]),
                    wall_ns=int(parts[6]),
                    outcome=parts[7] if len(parts) == 8 else "",
                )
            )
    events.sort(key=lambda e: e.at_ns)
    return events
