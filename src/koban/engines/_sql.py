"""Named SQL statements kept in .sql files next to the engine that runs them.

A file holds statements in this shape::

    -- name: fetch_jobs
    -- Claim up to %(limit)s available jobs of one queue.
    UPDATE ...;

Python refers to statements by name, so a reviewer reads the queries without reading Python.
"""

from __future__ import annotations

import re
from importlib import resources

_NAME = re.compile(r"^--\s*name:\s*(\w+)\s*$", re.MULTILINE)


def load_queries(package: str, filename: str = "queries.sql") -> dict[str, str]:
    """Map each statement name in `package/filename` to its SQL text."""
    text = resources.files(package).joinpath(filename).read_text(encoding="utf-8")
    parts = _NAME.split(text)
    queries: dict[str, str] = {}
    for name, body in zip(parts[1::2], parts[2::2], strict=True):
        lines = [line for line in body.strip().splitlines() if not line.lstrip().startswith("--")]
        sql = "\n".join(lines).strip().rstrip(";").strip()
        if name in queries:
            raise RuntimeError(f"{package}/{filename}: statement {name!r} is defined twice")
        queries[name] = sql
    return queries


def load_migrations(package: str) -> list[tuple[int, str, str]]:
    """(version, file name, SQL) for every `NNNN_*.sql` file in `package`, in order."""
    found = []
    for entry in resources.files(package).iterdir():
        match = re.match(r"^(\d{4})_\w+\.sql$", entry.name)
        if match:
            found.append((int(match.group(1)), entry.name, entry.read_text(encoding="utf-8")))
    found.sort()
    versions = [v for v, _, _ in found]
    if versions != list(range(1, len(versions) + 1)):
        raise RuntimeError(f"{package}: migrations must be numbered 0001, 0002, ... without gaps")
    return found
