"""Exceptions koban raises. Each message names what is at fault and what to do."""

from __future__ import annotations


class KobanError(Exception):
    """Base class for every error koban raises on purpose."""


class ConfigurationError(KobanError, ValueError):
    """A setting, URL, queue or worker definition is invalid."""


class JobValidationError(KobanError, ValueError):
    """A job cannot be enqueued as given (bad args, priority, max_attempts...)."""


class UnknownWorkerError(KobanError, LookupError):
    """A worker name does not match any registered worker."""


class UnknownQueueError(KobanError, LookupError):
    """A queue name is not configured."""


class DatabaseError(KobanError):
    """The database could not be reached or is not in the expected shape."""


class DatabaseUnavailableError(DatabaseError):
    """The database could not be reached."""


class SchemaNotMigratedError(DatabaseError):
    """The database has no koban schema, or an older one than this koban needs."""


class SchemaTooNewError(DatabaseError):
    """The database was migrated by a newer koban than the one running."""


class JobTimeoutError(KobanError, TimeoutError):
    """A job ran longer than its worker's timeout."""


class UnknownNodeError(KobanError, LookupError):
    """A node name does not match any registered node."""


class WorkerProcessDied(KobanError):
    """The worker process running a job (executor="process") exited before replying."""
