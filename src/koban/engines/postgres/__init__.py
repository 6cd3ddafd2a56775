"""The PostgreSQL engine: psycopg 3, LISTEN/NOTIFY, FOR UPDATE SKIP LOCKED."""

from koban.engines.postgres.engine import PostgresEngine

__all__ = ["PostgresEngine"]
