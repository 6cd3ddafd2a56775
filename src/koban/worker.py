"""Workers: the code that performs a job, as a function or a class.

>>> app = Koban(queues={"default": 10})
>>> @app.worker(queue="default", max_attempts=3)
... async def sync_athlete(job: Job) -> None: ...
>>> @app.worker
... class SyncAllWorker(Worker):
...     queue = "default"
...     def perform(self, job: Job) -> None: ...   # sync: runs in a thread pool
>>> @app.worker(executor="process", timeout=60)   # CPU-bound: in a worker process
... def render_heatmap(job: Job) -> None: ...     # (module level; see runtime/processes.py)
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any, ClassVar

from koban import backoff as _backoff
from koban.errors import ConfigurationError, JobValidationError
from koban.job import DEFAULT_MAX_ATTEMPTS, DEFAULT_QUEUE, Job
from koban.unique import Unique

if TYPE_CHECKING:
    from koban.app import Koban

EXECUTORS = ("async", "thread", "process")
_TAG_COLLECTIONS = (list, tuple, set, frozenset)
_UNIQUE_SETTINGS = (bool, Unique)


def worker_name(obj: Any) -> str:
    """The name a worker is stored under: its import path, `module.qualname`."""
    return f"{obj.__module__}.{obj.__qualname__}"


@dataclass(frozen=True, slots=True)
class WorkerOptions:
    """Defaults a worker gives its jobs, and how it runs them."""

    queue: str = DEFAULT_QUEUE
    max_attempts: int = DEFAULT_MAX_ATTEMPTS
    priority: int = 0
    tags: tuple[str, ...] = ()
    timeout: float | None = None
    unique: Unique | None = None
    executor: str | None = None


def check_options(name: str, options: WorkerOptions) -> None:
    """Raise ConfigurationError naming the worker if an option is out of range."""
    if not isinstance(options.queue, str) or not options.queue:
        raise ConfigurationError(f"worker {name!r}: queue must be a non-empty string")
    if (
        isinstance(options.max_attempts, bool)
        or not isinstance(options.max_attempts, int)
        or (options.max_attempts < 1)
    ):
        raise ConfigurationError(
            f"worker {name!r}: max_attempts must be an int of at least 1, "
            f"got {options.max_attempts!r}"
        )
    if (
        isinstance(options.priority, bool)
        or not isinstance(options.priority, int)
        or not (0 <= options.priority <= 9)
    ):
        raise ConfigurationError(
            f"worker {name!r}: priority must be an int from 0 to 9, got {options.priority!r}"
        )
    if options.timeout is not None and not (
        isinstance(options.timeout, int | float) and options.timeout > 0
    ):
        raise ConfigurationError(
            f"worker {name!r}: timeout must be a positive number of seconds or None, "
            f"got {options.timeout!r}"
        )
    if options.executor is not None and options.executor not in EXECUTORS:
        raise ConfigurationError(
            f"worker {name!r}: executor must be one of {', '.join(EXECUTORS)}, "
            f"got {options.executor!r}"
        )
    if options.unique is not None and not isinstance(options.unique, Unique):
        raise ConfigurationError(
            f"worker {name!r}: unique must be a koban.Unique(...) or None, "
            f"got {options.unique!r:.60}"
        )


def build_job(
    name: str,
    options: WorkerOptions,
    args: dict[str, Any] | None = None,
    *,
    queue: str | None = None,
    priority: int | None = None,
    max_attempts: int | None = None,
    tags: list[str] | tuple[str, ...] | None = None,
    meta: dict[str, Any] | None = None,
    schedule_in: float | None = None,
    scheduled_at: datetime | None = None,
    unique: Unique | bool | None = True,
    replace: tuple[str, ...] | list[str] | None = None,
) -> Job:
    """An unsaved job for worker `name`, per-call options over the worker's defaults.

    `unique` is the worker's setting (True), another `koban.Unique`, or False/None for none;
    `replace` names fields of an existing duplicate to update from this job on conflict.
    """
    tag_list: Any = list(options.tags) if tags is None else tags
    if isinstance(tags, _TAG_COLLECTIONS):
        tag_list = list(tags)
    # Anything else (notably a string: list("urgent") would make six one-letter tags) is
    # passed on as given and refused by name in validate().
    if not (unique is None or isinstance(unique, _UNIQUE_SETTINGS)):
        raise JobValidationError(
            f"unique for worker {name!r} must be a koban.Unique, True (the worker's setting), "
            f"False or None, got {unique!r:.60}"
        )
    job = Job(
        worker=name,
        args={} if args is None else args,
        queue=options.queue if queue is None else queue,
        priority=options.priority if priority is None else priority,
        max_attempts=options.max_attempts if max_attempts is None else max_attempts,
        tags=tag_list,
        meta={} if meta is None else meta,
        scheduled_at=scheduled_at,
        schedule_in=schedule_in,
    )
    job.unique = options.unique if unique is True else (unique or None)
    if replace is not None:
        if job.unique is None:
            raise JobValidationError(
                f"replace= for worker {name!r} needs a unique job: pass unique=koban.Unique(...) "
                "or set unique on the worker"
            )
        try:
            job.unique = dataclasses.replace(job.unique, replace=tuple(replace))
        except ConfigurationError as exc:
            raise JobValidationError(f"worker {name!r}: {exc}") from None
    return job


class Worker:
    """Base class for class-based workers.

    Subclass it, set the options as class attributes, implement `perform` (sync or async) and
    register it with `@app.worker`. `perform` may return None (completed), `Snooze`, `Cancel`
    or `Discard`; raising fails the attempt.
    """

    queue: ClassVar[str] = DEFAULT_QUEUE
    max_attempts: ClassVar[int] = DEFAULT_MAX_ATTEMPTS
    priority: ClassVar[int] = 0
    tags: ClassVar[tuple[str, ...]] = ()
    timeout: ClassVar[float | None] = None
    unique: ClassVar[Unique | None] = None
    executor: ClassVar[str | None] = None

    name: ClassVar[str] = ""
    app: ClassVar[Koban | None] = None

    def perform(self, job: Job) -> Any:
        raise NotImplementedError(f"worker {worker_name(type(self))!r} must implement perform()")

    def backoff(self, job: Job) -> float:
        """Seconds until the next attempt after `job.attempt` failed."""
        return _backoff.exponential(job.attempt)

    @classmethod
    def options(cls) -> WorkerOptions:
        return WorkerOptions(
            queue=cls.queue,
            max_attempts=cls.max_attempts,
            priority=cls.priority,
            tags=tuple(cls.tags),
            timeout=cls.timeout,
            unique=cls.unique,
            executor=cls.executor,
        )

    @classmethod
    def new(cls, args: dict[str, Any] | None = None, **options: Any) -> Job:
        """An unsaved job for this worker; takes the same options as `enqueue`."""
        return build_job(cls.name or worker_name(cls), cls.options(), args, **options)

    @classmethod
    def enqueue(
        cls, args: dict[str, Any] | None = None, *, conn: Any = None, **options: Any
    ) -> Job:
        """Insert a job for this worker and return it as stored."""
        return _app_of(cls).enqueue(cls.new(args, **options), conn=conn)

    @classmethod
    async def aenqueue(
        cls, args: dict[str, Any] | None = None, *, conn: Any = None, **options: Any
    ) -> Job:
        """Async twin of `enqueue`."""
        return await _app_of(cls).aenqueue(cls.new(args, **options), conn=conn)


class FunctionWorker:
    """A worker made from a function by `@app.worker`. Calling it calls the function."""

    def __init__(
        self,
        fn: Callable[[Job], Any],
        options: WorkerOptions,
        app: Koban,
        backoff: Callable[[Job], float] | None = None,
    ) -> None:
        self.fn = fn
        self.name = worker_name(fn)
        self.app = app
        self._options = options
        self._backoff = backoff
        self.__doc__ = fn.__doc__
        self.__wrapped__ = fn

    def __call__(self, job: Job) -> Any:
        return self.fn(job)

    def __repr__(self) -> str:
        return f"<koban worker {self.name} queue={self._options.queue!r}>"

    def options(self) -> WorkerOptions:
        return self._options

    def backoff(self, job: Job) -> float:
        return self._backoff(job) if self._backoff else _backoff.exponential(job.attempt)

    def new(self, args: dict[str, Any] | None = None, **options: Any) -> Job:
        """An unsaved job for this worker; takes the same options as `enqueue`."""
        return build_job(self.name, self._options, args, **options)

    def enqueue(
        self, args: dict[str, Any] | None = None, *, conn: Any = None, **options: Any
    ) -> Job:
        """Insert a job for this worker and return it as stored."""
        return self.app.enqueue(self.new(args, **options), conn=conn)

    async def aenqueue(
        self, args: dict[str, Any] | None = None, *, conn: Any = None, **options: Any
    ) -> Job:
        """Async twin of `enqueue`."""
        return await self.app.aenqueue(self.new(args, **options), conn=conn)


def _app_of(cls: type[Worker]) -> Koban:
    if cls.app is None:
        raise ConfigurationError(
            f"worker {worker_name(cls)!r} is not registered with an app; "
            "decorate it with @app.worker before enqueueing"
        )
    return cls.app


@dataclass(frozen=True, slots=True)
class RegisteredWorker:
    """How a node runs one worker: the registry's entry."""

    name: str
    options: WorkerOptions
    is_async: bool
    target: type[Worker] | FunctionWorker

    def make_perform(self) -> Callable[[Job], Any]:
        """A callable that performs one job (a fresh instance per job for class workers)."""
        if isinstance(self.target, FunctionWorker):
            return self.target.fn
        return self.target().perform

    def backoff(self, job: Job) -> float:
        if isinstance(self.target, FunctionWorker):
            return self.target.backoff(job)
        return self.target().backoff(job)


def register(
    target: Callable[[Job], Any] | type[Worker],
    app: Koban,
    *,
    backoff: Callable[[Job], float] | None = None,
    **overrides: Any,
) -> RegisteredWorker:
    """Build the registry entry for a function or Worker subclass."""
    if inspect.isclass(target):
        if not issubclass(target, Worker):
            raise ConfigurationError(
                f"{worker_name(target)!r} is a class but not a koban.Worker subclass; "
                "subclass koban.Worker and implement perform()"
            )
        for key, value in overrides.items():
            setattr(target, key, value)
        target.name = worker_name(target)
        target.app = app
        options = target.options()
        is_async = inspect.iscoroutinefunction(target.perform)
        entry_target: type[Worker] | FunctionWorker = target
    elif callable(target):
        unknown = set(overrides) - set(WorkerOptions.__slots__)
        if unknown:
            raise ConfigurationError(
                f"worker {worker_name(target)!r}: unknown option(s) {', '.join(sorted(unknown))}"
            )
        if "tags" in overrides:
            overrides["tags"] = tuple(overrides["tags"])
        options = WorkerOptions(**overrides)
        is_async = inspect.iscoroutinefunction(target)
        entry_target = FunctionWorker(target, options, app, backoff)
    else:
        raise ConfigurationError(f"@app.worker needs a function or a Worker class, got {target!r}")
    name = worker_name(target)
    check_options(name, options)
    if options.executor == "async" and not is_async:
        raise ConfigurationError(
            f"worker {name!r}: executor='async' needs an async perform; sync code would block "
            "the event loop. Use executor='thread' or make perform async."
        )
    if options.executor == "process":
        _check_process_worker(name, target, is_async)
    return RegisteredWorker(name=name, options=options, is_async=is_async, target=entry_target)


def _check_process_worker(name: str, target: Any, is_async: bool) -> None:
    """Refuse what a worker process cannot run: async code, and anything it cannot import by
    its path (lambdas, functions and classes defined inside a function)."""
    if is_async:
        raise ConfigurationError(
            f"worker {name!r}: executor='process' runs a plain function or a Worker with a "
            "sync perform in a worker process, and this one is async. Make it sync, or leave "
            "executor unset (or 'async') to run it on the event loop."
        )
    if not (inspect.isfunction(target) or inspect.isclass(target)):
        raise ConfigurationError(
            f"worker {name!r}: executor='process' needs a plain function or a Worker class "
            f"defined at module level, got a {type(target).__name__}"
        )
    if "<" in target.__qualname__:
        raise ConfigurationError(
            f"worker {name!r}: executor='process' needs a worker defined at module level: the "
            "worker process imports it by its path, and this one is a lambda or is defined "
            "inside a function. Define it at module level."
        )
