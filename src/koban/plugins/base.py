"""The plugin contract: a small maintenance unit the node runs on an interval.

>>> class Reporter(Plugin):
...     name = "reporter"
...     interval = 60.0
...     async def tick(self, node): ...

A plugin with `leader_only = True` runs only on the node that holds leadership at that moment;
the node asks before every tick.
"""

from __future__ import annotations

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
