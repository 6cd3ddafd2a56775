"""Named SQL statements run by the SQLite engine (`queries.sql`)."""

from koban.engines._sql import load_queries

QUERIES = load_queries(__name__)
