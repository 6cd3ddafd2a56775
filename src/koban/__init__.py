"""koban: reliable background jobs for Python, stored as rows in PostgreSQL or SQLite."""

from koban.app import Koban
from koban.clock import Clock, FrozenClock
from koban.engines.base import JobFilter
from koban.errors import (
    ConfigurationError,
    DatabaseError,
    DatabaseUnavailableError,
    JobTimeoutError,
    JobValidationError,
    KobanError,
    SchemaNotMigratedError,
    SchemaTooNewError,
    UnknownQueueError,
    UnknownWorkerError,
)
from koban.job import Cancel, Discard, Job, JobState, Snooze
from koban.unique import Unique
from koban.worker import Worker

__version__ = "0.1.0"

__all__ = [
    "Cancel", "Clock", "ConfigurationError", "DatabaseError", "DatabaseUnavailableError",
    "Discard", "FrozenClock", "Job", "JobFilter", "JobState", "JobTimeoutError",
    "JobValidationError", "Koban", "KobanError", "SchemaNotMigratedError", "SchemaTooNewError",
    "Snooze", "Unique", "UnknownQueueError", "UnknownWorkerError", "Worker", "__version__",
]  # fmt: skip
