"""ProcessPool: runs `executor="process"` jobs in worker processes of koban's own.

>>> pool = ProcessPool(size=4)
>>> pool.start()                          # spawn the children now (else on first use)
>>> result = await pool.run(registered, job)
>>> await pool.close()

Each child is a fresh interpreter started with multiprocessing's "spawn" method (never a fork
of a process running an event loop and threads), connected to the pool by a duplex pipe.
A child imports the worker by its path (`module.qualname`), so process workers must be defined
at module level; it receives the job's fields, rebuilds the `Job`, runs it, and sends back what
it returned (None, `Snooze`, `Cancel` or `Discard`) or what it raised, pickled if possible,
with its formatted traceback. Children are reused job after job.

Unlike a thread, a process can be stopped: a job past its timeout, or cancelled while it runs,
has its child terminated (then killed), and the pool starts a replacement. A child that dies
during a job (os._exit, a crash in native code, the out-of-memory killer) fails that attempt
with `WorkerProcessDied`, retried with the worker's backoff like any error.

The pool waits for replies with `loop.add_reader` on each pipe (POSIX event loops), so the
event loop never blocks on a child. A child exits when the pool closes its pipe, and on its
own when its parent process dies.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import dataclasses
import importlib
import inspect
import multiprocessing
import os
import pickle
import signal
import threading
import time
import traceback
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any

from koban.errors import ConfigurationError, JobTimeoutError, WorkerProcessDied
from koban.job import Cancel, Discard, Job, Snooze
from koban.worker import FunctionWorker, RegisteredWorker, Worker

#: Job fields sent to a child: what `Job(...)` takes, but the in-process cancel flag (a child
#: is killed, not asked, to stop) and the insert-time unique settings.
_SENT_FIELDS = tuple(
    f.name for f in dataclasses.fields(Job) if f.init and f.name not in ("_cancel_event", "unique")
)
#: Seconds a terminated child gets to exit before it is killed.
KILL_AFTER = 1.0
#: Attribute under which an exception from a child carries the child's formatted traceback.
_TRACEBACK_ATTR = "_koban_child_traceback"


def child_traceback(exc: BaseException) -> str | None:
    """The traceback formatted in the child, for an exception a process job raised."""
    value = getattr(exc, _TRACEBACK_ATTR, None)
    return value if isinstance(value, str) else None


def import_path(registered: RegisteredWorker) -> tuple[str, str]:
    """(module, qualname) by which a child imports the worker's function or class."""
    target = registered.target
    obj: Any = target.fn if isinstance(target, FunctionWorker) else target
    return obj.__module__, obj.__qualname__


# ----- the child ------------------------------------------------------------------------------
def _child_main(conn: Connection, parent_pid: int) -> None:
    """A worker process: run the jobs the pool sends until it sends None or goes away."""
    # Ctrl-C reaches the whole process group; the node decides when its jobs stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    threading.Thread(
        target=_exit_with_parent, args=(parent_pid,), name="koban-parent-watch", daemon=True
    ).start()
    targets: dict[tuple[str, str], Any] = {}
    conn.send("ready")  # a job's timeout starts once the interpreter is up, not before
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            return  # the pool closed the pipe, or its process died
        if message is None:
            return
        module, qualname, fields = message
        conn.send(_perform_in_child(targets, module, qualname, fields))


def _exit_with_parent(parent_pid: int) -> None:
    """End this process once its parent is gone (even in the middle of a job)."""
    while True:
        time.sleep(0.5)
        if os.getppid() != parent_pid:
            os._exit(1)


def _perform_in_child(
    targets: dict[tuple[str, str], Any], module: str, qualname: str, fields: dict[str, Any]
) -> tuple[Any, ...]:
    try:
        job = Job(**fields)
        target = targets.get((module, qualname))
        if target is None:
            target = targets[(module, qualname)] = _import_target(job.worker, module, qualname)
        perform: Any = target().perform if isinstance(target, type) else target
        result = perform(job)
    except BaseException as exc:  # sys.exit() or KeyboardInterrupt in a job fail that job only
        return ("raised", *_describe(exc))
    # Only the outcomes koban acts on cross back; any other return value means "completed".
    return ("returned", result if isinstance(result, Snooze | Cancel | Discard) else None)


def _import_target(worker: str, module: str, qualname: str) -> Any:
    try:
        obj: Any = importlib.import_module(module)
    except Exception as exc:
        raise ConfigurationError(
            f"worker {worker!r}: its worker process cannot import module {module!r} "
            f"({type(exc).__name__}: {exc}); process workers must be importable in a fresh "
            "interpreter (and a script must guard its start-up with "
            "if __name__ == '__main__')"
        ) from exc
    for part in qualname.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            raise ConfigurationError(
                f"worker {worker!r}: its worker process found no {qualname!r} in module "
                f"{module!r}; define the worker at module level under that name"
            )
    if isinstance(obj, FunctionWorker):
        return obj.fn
    if inspect.isclass(obj) and issubclass(obj, Worker):
        return obj
    if callable(obj):
        return obj
    raise ConfigurationError(
        f"worker {worker!r}: {module}.{qualname} in the worker process is a "
        f"{type(obj).__name__}, not a function or Worker class"
    )


def _describe(exc: BaseException) -> tuple[bytes | None, str, str, str, str]:
    """What crosses back for a raised exception: itself pickled if that round-trips, its
    type's module and qualname and its message (to recreate it if not), and its traceback."""
    tb = "".join(traceback.format_exception(exc))
    payload: bytes | None
    try:
        payload = pickle.dumps(exc)
        pickle.loads(payload)
    except Exception:
        payload = None
    kind = type(exc)
    try:
        message = str(exc)
    except Exception:  # an exception whose __str__ fails still fails its job, not the child
        message = f"<{kind.__qualname__}: its message could not be formatted>"
    return payload, kind.__module__, kind.__qualname__, message, tb


# ----- the parent -----------------------------------------------------------------------------
def _recreate(payload: bytes | None, module: str, qualname: str, message: str) -> Exception:
    if payload is not None:
        try:
            exc = pickle.loads(payload)
        except Exception:
            exc = None
        # SystemExit, KeyboardInterrupt and the like stay in the child: raised in the node
        # they would stop it. A stand-in Exception of the same name fails the job alone.
        if isinstance(exc, Exception):
            return exc
    # Same type name and message, so the error entry reads as it would for a thread job.
    stand_in = type(
        qualname.rsplit(".", 1)[-1], (Exception,), {"__module__": module, "__qualname__": qualname}
    )
    return stand_in(message)


def _exit_description(code: int | None) -> str:
    if code is None:
        return "closed its pipe"
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"exited with code {code} (killed by {name})"
    return f"exited with code {code}"


async def _readable(fd: int, timeout: float | None = None) -> bool:
    """Wait until `fd` is readable (data, end of file, or a process sentinel firing)."""
    loop = asyncio.get_running_loop()
    ready = loop.create_future()

    def wake() -> None:
        if not ready.done():
            ready.set_result(None)

    loop.add_reader(fd, wake)
    try:
        async with asyncio.timeout(timeout):
            await ready
        return True
    except TimeoutError:
        return False
    finally:
        loop.remove_reader(fd)


@dataclasses.dataclass(eq=False)
class _Child:
    process: BaseProcess
    conn: Connection
    pid: int
    #: True once the child said it is ready for jobs.
    ready: bool = False
    #: Set once the child has exited and been reaped.
    exitcode: int | None = None
    #: The task stopping and reaping the child, once it is retired.
    reaper: asyncio.Task[None] | None = None


class ProcessPool:
    """Up to `size` worker processes for one node, each running one job at a time.

    Children are spawned by `start()` (the node calls it when a registered worker uses
    executor="process"), or one by one as jobs need them; a child that is killed or dies is
    replaced at once. Use it from one event loop.
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self._context = multiprocessing.get_context("spawn")
        #: Children taking jobs: idle or running one.
        self._children: set[_Child] = set()
        #: Every child not yet reaped, including retired ones still being stopped.
        self._living: set[_Child] = set()
        self._idle: asyncio.Queue[_Child] | None = None
        self._closed = False
        self._at_exit = False

    @property
    def pids(self) -> list[int]:
        """The process ids of the children taking jobs."""
        return [child.pid for child in self._children]

    def start(self) -> None:
        """Spawn every child now, so the first jobs do not wait for an interpreter to start."""
        while not self._closed and len(self._children) < self.size:
            self._queue().put_nowait(self._spawn())

    async def run(self, registered: RegisteredWorker, job: Job) -> Any:
        """Run one attempt of `job` in a child; return what the worker returned, or raise what
        it raised. Past the worker's timeout, or when cancelled, the child is killed."""
        child = await self._acquire()
        if not child.ready:
            await self._wait_ready(child, job)
        module, qualname = import_path(registered)
        fields = {name: getattr(job, name) for name in _SENT_FIELDS}
        try:
            child.conn.send((module, qualname, fields))
        except OSError:
            await self._retire(child, grace=KILL_AFTER)
            raise self._died(job, child) from None
        except BaseException:  # the fields did not pickle: the child never saw the job
            self._queue().put_nowait(child)
            raise
        timeout = registered.options.timeout
        try:
            async with asyncio.timeout(timeout) as deadline:
                await _readable(child.conn.fileno())
        except BaseException as exc:
            if isinstance(exc, TimeoutError) and deadline.expired():
                # Waited for, so the process is gone before the attempt is recorded.
                await asyncio.shield(self._retire(child, grace=0.0))
                raise JobTimeoutError(
                    f"job {job.id} of worker {job.worker!r} ran past its timeout of {timeout} "
                    f"s; its worker process (pid {child.pid}) was killed"
                ) from None
            # Cancelled (the job was, or shutdown ran out of grace): stop the child at once.
            self._retire(child, grace=0.0)
            raise
        try:
            reply = child.conn.recv()
        except (EOFError, OSError):
            # Its pipe closed: the child is exiting; let it finish so its exit code is known.
            await self._retire(child, grace=KILL_AFTER)
            raise self._died(job, child) from None
        except BaseException:  # a reply that cannot be read: do not trust the child again
            self._retire(child, grace=0.0)
            raise
        self._queue().put_nowait(child)
        if reply[0] == "returned":
            return reply[1]
        _kind, payload, type_module, type_qualname, message, tb = reply
        raised = _recreate(payload, type_module, type_qualname, message)
        with contextlib.suppress(AttributeError, TypeError):
            setattr(raised, _TRACEBACK_ATTR, tb)
        raise raised

    def closing(self) -> None:
        """Start no more children: the node is stopping (jobs cancelled now kill their child
        without a replacement)."""
        self._closed = True

    async def close(self, timeout: float = 5.0) -> None:
        """Ask every child to exit, give them `timeout` seconds, then terminate and kill them;
        return once every child has exited and been reaped."""
        self._closed = True
        for child in list(self._children):
            with contextlib.suppress(OSError):
                child.conn.send(None)
            self._retire(child, grace=timeout)
        await asyncio.gather(
            *(c.reaper for c in list(self._living) if c.reaper is not None),
            return_exceptions=True,
        )
        self._idle = None
        self._closed = False  # empty, and usable again by a node that starts again
        if self._at_exit and not self._living:
            atexit.unregister(self._kill_all)
            self._at_exit = False

    # ----- children -------------------------------------------------------------------------
    def _queue(self) -> asyncio.Queue[_Child]:
        if self._idle is None:
            self._idle = asyncio.Queue()
        return self._idle

    def _spawn(self) -> _Child:
        ours, theirs = self._context.Pipe(duplex=True)
        process = self._context.Process(
            target=_child_main, args=(theirs, os.getpid()), name="koban-process-job"
        )
        process.start()
        theirs.close()  # the child holds the only other end: its death reads as end of file
        assert process.pid is not None
        child = _Child(process, ours, process.pid)
        self._children.add(child)
        self._living.add(child)
        if not self._at_exit:
            # If the node is never stopped, children must not outlive the interpreter (and
            # multiprocessing would wait for them at exit).
            atexit.register(self._kill_all)
            self._at_exit = True
        return child

    async def _acquire(self) -> _Child:
        idle = self._queue()
        while True:
            if self._closed:
                raise RuntimeError("the node's process pool is closed")
            if idle.empty() and len(self._children) < self.size:
                return self._spawn()
            child = await idle.get()
            if child.reaper is None and child.process.is_alive():
                return child
            self._retire(child, grace=KILL_AFTER)  # died while idle: replace it, take another

    async def _wait_ready(self, child: _Child, job: Job) -> None:
        """Wait, with no deadline, for a new child to start; fail the attempt if it dies."""
        try:
            await _readable(child.conn.fileno())
        except BaseException:
            self._queue().put_nowait(child)  # still starting: the next job waits for it
            raise
        try:
            child.ready = child.conn.recv() == "ready"
        except (EOFError, OSError):
            await self._retire(child, grace=KILL_AFTER)
            raise self._died(job, child, starting=True) from None
        except BaseException:
            self._retire(child, grace=0.0)
            raise

    def _retire(self, child: _Child, grace: float) -> asyncio.Task[None]:
        """Take `child` out of the pool and start a replacement; the returned task waits up
        to `grace` s for the child to exit, terminates it, kills it, and reaps it."""
        self._children.discard(child)
        if child.reaper is None:
            child.reaper = asyncio.get_running_loop().create_task(self._reap(child, grace))
        if not self._closed and len(self._children) < self.size:
            self._queue().put_nowait(self._spawn())
        return child.reaper

    async def _reap(self, child: _Child, grace: float) -> None:
        process = child.process
        try:
            # The sentinel fires as the process exits (a signal to an exiting one is harmless).
            exited = grace > 0 and await _readable(process.sentinel, grace)
            if not exited:
                process.terminate()
                exited = await _readable(process.sentinel, KILL_AFTER)
            if not exited:
                process.kill()
                exited = await _readable(process.sentinel, 10.0)
            if exited:
                # Its sentinel fired, so the process is exiting: this waits microseconds for
                # the blocking waitpid (join(0) would poll and could find it not yet reaped).
                process.join(KILL_AFTER)
                child.exitcode = process.exitcode
        finally:
            child.conn.close()
        if child.exitcode is not None:
            process.close()
            self._living.discard(child)

    def _died(self, job: Job, child: _Child, starting: bool = False) -> WorkerProcessDied:
        if starting:
            return WorkerProcessDied(
                f"job {job.id} of worker {job.worker!r}: its worker process (pid {child.pid}) "
                f"{_exit_description(child.exitcode)} while starting, before it took the job "
                "(see the node's output for why; a script must guard its start-up with "
                "if __name__ == '__main__'); this attempt failed and the job is retried with "
                "backoff"
            )
        return WorkerProcessDied(
            f"job {job.id} of worker {job.worker!r}: its worker process (pid {child.pid}) "
            f"{_exit_description(child.exitcode)} while running it (os._exit, a crash in "
            "native code or the out-of-memory killer); this attempt failed and the job is "
            "retried with backoff"
        )

    def _kill_all(self) -> None:
        """At interpreter exit: kill and reap every child still there."""
        for child in list(self._living):
            with contextlib.suppress(Exception):
                child.process.kill()
                child.process.join(5.0)
