"""Reading node logs: which warnings a node wrote, so a test can tell one report from a storm."""

from __future__ import annotations

import re
from collections import Counter
from datetime import datetime

# "2030-01-01 00:00:00,000 WARNING koban.acker: cannot record 3 job outcome(s) (...)"
_LINE = re.compile(r"^\S+ \S+ (?P<level>[A-Z]+) (?P<logger>[\w.]+): (?P<message>.*)$")
_NUMBERS = re.compile(r"\d+")


def warnings(text: str) -> list[tuple[str, str]]:
    """(logger, message) for every WARNING or worse line, job outcome lines excluded."""
    out = []
    for line in text.splitlines():
        m = _LINE.match(line)
        if m is None or m["level"] not in ("WARNING", "ERROR", "CRITICAL"):
            continue
        if m["logger"] == "koban.jobs":  # one line per failed job attempt, by design
            continue
        out.append((m["logger"], m["message"]))
    return out


def kinds(text: str) -> Counter[str]:
    """How often each kind of warning appeared: logger plus the message up to its first " ("
    or ": ", numbers blanked, so "cannot record 3 job outcome(s)" and "... 5 ..." are one kind."""
    counts: Counter[str] = Counter()
    for logger, message in warnings(text):
        head = _NUMBERS.sub("N", message.split(" (", 1)[0].split(": ", 1)[0])
        counts[f"{logger}: {head}"] += 1
    return counts


def storms(text: str, incidents: int, *, allowed: tuple[str, ...] = ()) -> list[str]:
    """Kinds of warning written more often than once per incident, except kinds starting with
    one of `allowed` (a caller checks those its own way)."""
    return [
        f"{n}x {kind}"
        for kind, n in kinds(text).items()
        if n > incidents and not kind.startswith(allowed)
    ]


def stamped(text: str, logger: str, prefix: str) -> list[tuple[float, str]]:
    """(wall-clock time, message) of each line `logger` wrote that starts with `prefix`."""
    out = []
    for line in text.splitlines():
        m = _LINE.match(line)
        if m is not None and m["logger"] == logger and m["message"].startswith(prefix):
            stamp = " ".join(line.split(" ", 2)[:2])
            when = datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f").timestamp()
            out.append((when, m["message"]))
    return out
