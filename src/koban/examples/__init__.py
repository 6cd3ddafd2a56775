"""Runnable examples shipped with koban, importable from an installed package (`koban demo`)."""
