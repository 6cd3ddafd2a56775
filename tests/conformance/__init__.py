"""The engine conformance suite: every test here runs against PostgreSQL and SQLite."""
