"""Integrations that live outside koban's core: each needs its own extra installed."""
