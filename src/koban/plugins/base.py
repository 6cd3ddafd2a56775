"""The plugin contract: a small maintenance unit the node runs on an interval.

>>> class Reporter(Plugin):
...     name = "reporter"
...     interval = 60.0
...     async def tick(self, node): ...

A plugin with `leader_only = True` runs only on the node that holds leadership at that moment;
the node asks before every tick.

Lifecycle: `start` runs once before the node fetches (raising aborts the start), `stopping`
when the node begins to stop, `stop` once it has stopped (its tasks are cancelled by then).
`wake` makes the next tick run now instead of after the current delay.
"""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from koban.runtime.node import Node


class Plugin(ABC):
    name: str = "plugin"
    #: Seconds between ticks.
    interval: float = 1.0
    #: Run only on the cluster's leader.
    leader_only: bool = False

    @abstractmethod
    async def tick(self, node: Node) -> Any:
        """Do one round of work. Exceptions are logged and the next tick runs as planned."""

    def next_delay(self, result: Any) -> float:
        """Seconds until the next tick, given what this one returned."""
        return self.interval

    async def start(self, node: Node) -> None:
        """Prepare before the node fetches its first job."""
        return None

    async def stopping(self, node: Node) -> None:
        """The node has begun to stop: jobs may still be finishing."""
        return None

    async def stop(self, node: Node) -> None:
        """The node has stopped: no job runs any more and this plugin ticks no more."""
        return None

    def wake(self) -> None:
        """Run the next tick now rather than after the current delay."""
        self._wake_event().set()

    async def sleep(self, seconds: float) -> None:
        """Wait `seconds`, or until `wake` is called."""
        event = self._wake_event()
        try:
            await asyncio.wait_for(event.wait(), seconds)
        except TimeoutError:
            pass
        event.clear()

    def _wake_event(self) -> asyncio.Event:
        # Created on first use so subclasses need not call super().__init__().
        event: asyncio.Event | None = getattr(self, "_woken", None)
        if event is None:
            event = asyncio.Event()
            self._woken = event
        return event
