"""The SQLite engine: stdlib sqlite3 off the event loop, WAL, in-process wake-ups."""

from koban.engines.sqlite.engine import SQLiteEngine

__all__ = ["SQLiteEngine"]
