"""koban: reliable background jobs for Python, stored as rows in PostgreSQL or SQLite."""

from koban.app import Koban
from koban.clock import Clock, FrozenClock
from koban.cron import Cron, CronEntryInfo
from koban.engines.base import JobFilter, NodeInfo, QueueState
from koban.errors import (
    ConfigurationError,
    DatabaseError,
    DatabaseUnavailableError,
    JobTimeoutError,
    JobValidationError,
    KobanError,
    SchemaNotMigratedError,
    SchemaTooNewError,
    UnknownNodeError,
    UnknownQueueError,
    UnknownWorkerError,
    WorkerProcessDied,
)
from koban.job import Cancel, Discard, Job, JobState, Snooze
from koban.plugins.heartbeat import Heartbeat
from koban.plugins.lifeline import Lifeline
from koban.plugins.pruner import Pruner
from koban.plugins.reindexer import Reindexer
from koban.plugins.scheduler import Scheduler
from koban.plugins.stager import Stager
from koban.runtime.leadership import Leadership
from koban.unique import Unique
from koban.worker import Worker

__version__ = "0.1.0"

__all__ = [
    "Cancel", "Clock", "ConfigurationError", "Cron", "CronEntryInfo", "DatabaseError",
    "DatabaseUnavailableError", "Discard", "FrozenClock", "Heartbeat", "Job", "JobFilter",
    "JobState", "JobTimeoutError", "JobValidationError", "Koban", "KobanError", "Leadership",
    "Lifeline", "NodeInfo", "Pruner", "QueueState", "Reindexer", "Scheduler",
    "SchemaNotMigratedError", "SchemaTooNewError", "Snooze", "Stager", "Unique",
    "UnknownNodeError", "UnknownQueueError", "UnknownWorkerError", "Worker", "WorkerProcessDied",
    "__version__",
]  # fmt: skip
