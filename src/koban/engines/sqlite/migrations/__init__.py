"""Versioned schema migrations for the SQLite engine, `NNNN_name.sql`, applied in order."""
