"""Opening a SQLite file safely, and running one write transaction on it.

Every problem a user can meet here gets one error naming the file and what to do: a directory
that does not exist, a read-only file, a file that is not a SQLite database (never written to:
SQLite refuses it on the first read, before any write), a corrupt one, a file locked for too
long by another process.

Concurrency comes from SQLite itself: WAL mode lets readers run beside the one writer; every
write transaction starts with BEGIN IMMEDIATE, so it takes the write lock up front and waits
for it (up to the busy timeout) instead of failing half-way with "database is locked".
"""

from __future__ import annotations

import logging
import os
import sqlite3
import stat
import urllib.parse
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, TypeVar

from koban.errors import ConfigurationError, DatabaseError, DatabaseUnavailableError

if TYPE_CHECKING:
    from koban.engines.sqlite.notifier import Outbox

log = logging.getLogger("koban.engine")

T = TypeVar("T")

#: RETURNING, which every claim and state change relies on, arrived in SQLite 3.35.
MIN_SQLITE_VERSION = (3, 35, 0)
#: Seconds a statement waits for another connection's write lock before giving up.
DEFAULT_BUSY_TIMEOUT = 30.0
#: The smallest page size: a non-empty database file is never shorter.
_MIN_PAGE_SIZE = 512

# SQLite primary result codes (extended codes carry them in the low byte).
_PERM, _BUSY, _LOCKED, _READONLY, _IOERR, _CORRUPT, _FULL, _CANTOPEN, _NOTADB = (
    3, 5, 6, 8, 10, 11, 13, 14, 26,
)  # fmt: skip


def path_from_url(url: str) -> str:
    """The absolute file path in `sqlite:///relative.db` or `sqlite:////absolute.db`."""
    scheme, sep, rest = url.partition("://")
    example = "sqlite:///relative/path.db or sqlite:////absolute/path.db"
    if scheme.lower() != "sqlite" or not sep:
        raise ConfigurationError(f"database URL {url!r} is not a SQLite URL; use {example}")
    if not rest.startswith("/"):
        raise ConfigurationError(
            f"SQLite URL {url!r} names a host ({rest.split('/', 1)[0]!r}); SQLite files are "
            f"local: write three slashes before a relative path and four before an absolute "
            f"one, as in {example}"
        )
    path = rest[1:]
    if not path:
        raise ConfigurationError(f"SQLite URL {url!r} has no file path; use {example}")
    if path == ":memory:" or path.startswith("file:"):
        raise ConfigurationError(
            f"SQLite URL {url!r}: in-memory and URI databases are not supported, because "
            "every connection of every process must see the same jobs; use a file path "
            f"(for tests, one in a temporary directory), as in {example}"
        )
    if "?" in path:
        raise ConfigurationError(
            f"SQLite URL {url!r} has query parameters, which koban does not read; "
            f"remove them and use {example}"
        )
    return os.path.abspath(path)


def check_library(version: tuple[int, int, int] = sqlite3.sqlite_version_info) -> None:
    """Raise ConfigurationError if Python's SQLite library is too old for koban."""
    if tuple(version) < MIN_SQLITE_VERSION:
        have = ".".join(map(str, version))
        need = ".".join(map(str, MIN_SQLITE_VERSION))
        raise ConfigurationError(
            f"koban's SQLite engine needs SQLite {need} or newer (for UPDATE ... RETURNING), "
            f"but this Python is linked with SQLite {have}; use a newer Python build or "
            "system libsqlite3, or a postgresql:// database URL"
        )


def check_file(path: str, *, create: bool) -> int | None:
    """The size of the database file at `path` (None if it does not exist yet).

    Raises, naming the file and what to do, if the directory is missing, the path is a
    directory, or the file or its directory is read-only. Whether the file is a SQLite
    database at all is left to SQLite's first read (`translate` names the error), which
    writes nothing.

    The file is only stat()ed, never opened here: closing any descriptor of a database file
    drops every POSIX lock this process's SQLite connections hold on it, and another process
    could then checkpoint and delete the WAL under them.
    """
    directory = os.path.dirname(path)
    if not os.path.isdir(directory):
        raise ConfigurationError(
            f"SQLite database {path}: the directory {directory} does not exist; create it "
            f"(mkdir -p {directory}) or change the path in the database URL"
        )
    if os.path.isdir(path):
        raise ConfigurationError(
            f"SQLite database {path} is a directory; put a file name at the end of the URL, "
            f"as in sqlite:///{os.path.join(path, 'koban.db')}"
        )
    try:
        st = os.stat(path)
    except FileNotFoundError:
        if create and not os.access(directory, os.W_OK):
            raise DatabaseUnavailableError(
                f"SQLite database {path} cannot be created: the directory {directory} is not "
                "writable; make it writable or choose another path"
            ) from None
        return None
    if not stat.S_ISREG(st.st_mode):
        raise ConfigurationError(
            f"{path} is not a regular file, so not a SQLite database; koban leaves it "
            "untouched. Point the database URL at a new file or an existing SQLite database"
        )
    if 0 < st.st_size < _MIN_PAGE_SIZE:
        # SQLite takes some of these for an empty database and would write over them.
        raise ConfigurationError(
            f"{path} is not a SQLite database (it has {st.st_size} bytes, less than one "
            "database page); koban leaves it untouched. Point the database URL at a new file "
            "or an existing SQLite database, or move this file away"
        )
    if not os.access(path, os.R_OK):
        raise DatabaseUnavailableError(
            f"SQLite database {path} cannot be read (permission denied); give the user "
            "running koban read and write access to it"
        )
    if not os.access(path, os.W_OK) or not st.st_mode & 0o222:
        raise DatabaseUnavailableError(
            f"SQLite database {path} is read-only; koban writes to it whenever a job changes "
            f"state. Make it writable (chmod u+w {path}) or use another file"
        )
    if not os.access(directory, os.W_OK):
        raise DatabaseUnavailableError(
            f"SQLite database {path}: the directory {directory} is not writable, and SQLite "
            "keeps its -wal and -shm files there; make the directory writable or move the "
            "database"
        )
    return st.st_size


def connect(path: str, *, create: bool, busy_timeout: float) -> sqlite3.Connection:
    """A connection to `path` in autocommit mode (koban issues BEGIN/COMMIT itself).

    Without `create`, a missing file is an error rather than a new empty database.
    """
    uri = f"file:{urllib.parse.quote(path)}?mode={'rwc' if create else 'rw'}"
    conn = sqlite3.connect(
        uri,
        uri=True,
        timeout=busy_timeout,
        isolation_level=None,
        # Each connection is used by one thread at a time, but not always the one that made
        # it: connections are lent to caller threads and closed from wherever close() runs.
        check_same_thread=False,
        cached_statements=256,
    )
    conn.row_factory = sqlite3.Row
    return conn


def use_wal(conn: sqlite3.Connection, path: str) -> None:
    """Switch the file to WAL (persistent, once per file) and set per-connection pragmas."""
    mode = str(conn.execute("PRAGMA journal_mode").fetchone()[0]).lower()
    if mode != "wal":
        mode = str(conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]).lower()
        if mode != "wal":
            raise DatabaseUnavailableError(
                f"SQLite database {path} cannot use write-ahead logging (journal mode stays "
                f"{mode!r}); koban needs WAL so several processes can share the file. Keep "
                "the database on a local disk, not a network share"
            )
    # In WAL mode NORMAL is durable against application crashes; only a power loss can undo
    # the last commits, and it never corrupts the file.
    conn.execute("PRAGMA synchronous = NORMAL")


def translate(exc: sqlite3.Error, path: str, busy_timeout: float) -> Exception | None:
    """A koban error naming the file for an sqlite3 error users can act on, else None."""
    code = getattr(exc, "sqlite_errorcode", None)
    primary = code & 0xFF if isinstance(code, int) else None
    detail = str(exc)
    if primary in (_BUSY, _LOCKED) or (primary is None and "locked" in detail):
        return DatabaseUnavailableError(
            f"SQLite database {path} stayed locked by another connection for more than "
            f"{busy_timeout:g} s ({detail}); something holds a long write transaction: a "
            "transaction left open on a connection passed as conn=, or another program. "
            "Commit or close it; koban's own transactions are short"
        )
    if primary == _READONLY:
        return DatabaseUnavailableError(
            f"SQLite database {path} is read-only ({detail}); koban writes to it whenever a "
            "job changes state. Make the file and its directory writable"
        )
    if primary == _NOTADB:
        return ConfigurationError(
            f"{path} is not a SQLite database ({detail}); koban leaves it untouched. Point "
            "the database URL at a new file or an existing SQLite database"
        )
    if primary == _CORRUPT:
        return DatabaseError(
            f"SQLite database {path} is corrupt ({detail}); koban does not modify it. Restore "
            "it from a backup, or recover it with the sqlite3 shell's .recover command"
        )
    if primary in (_CANTOPEN, _PERM):
        return DatabaseUnavailableError(
            f"cannot open SQLite database {path} ({detail}); check the file and its "
            "directory exist and are readable and writable by this user"
        )
    if primary == _FULL:
        return DatabaseUnavailableError(f"SQLite database {path}: the disk is full ({detail})")
    if primary == _IOERR:
        return DatabaseUnavailableError(
            f"SQLite database {path}: disk I/O error ({detail}); check the disk and the "
            "file's permissions"
        )
    return None


@contextmanager
def translated(path: str, busy_timeout: float) -> Iterator[None]:
    """Re-raise sqlite3 errors users can act on as koban errors naming the file."""
    try:
        yield
    except sqlite3.Error as exc:
        mapped = translate(exc, path, busy_timeout)
        if mapped is None:
            raise
        raise mapped from exc


def write_transaction(
    conn: sqlite3.Connection, fn: Callable[[sqlite3.Connection, Outbox], T], outbox: Outbox
) -> T:
    """Run `fn(conn, outbox)` in one BEGIN IMMEDIATE transaction, then deliver its notifications.

    BEGIN IMMEDIATE takes the write lock before the first read, waiting up to the busy
    timeout, so no statement inside can fail with "database is locked", and a claim made
    inside sees and changes the newest rows: no two transactions, in any process, claim the
    same job.
    """
    conn.execute("BEGIN IMMEDIATE")
    try:
        result = fn(conn, outbox)
        conn.execute("COMMIT")
    except BaseException:
        rollback(conn)
        raise
    outbox.deliver()
    return result


def rollback(conn: sqlite3.Connection) -> None:
    """Roll back the open transaction, if SQLite has not already done so."""
    if conn.in_transaction:
        try:
            conn.execute("ROLLBACK")
        except sqlite3.Error as exc:  # the original error matters more
            log.debug("rollback failed: %s", exc)


def split_statements(script: str) -> list[str]:
    """The statements of a SQL script, split where SQLite's own tokenizer says one ends."""
    statements: list[str] = []
    pending = ""
    for line in script.splitlines(keepends=True):
        pending += line
        if sqlite3.complete_statement(pending):
            statements.append(pending.strip())
            pending = ""
    leftover = [ln for ln in pending.splitlines() if ln.strip() and not ln.strip().startswith("--")]
    if leftover:
        raise ValueError(f"SQL script ends inside a statement: {' '.join(leftover)[:200]!r}")
    return statements
