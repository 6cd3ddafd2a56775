"""Stager: makes due scheduled and retryable jobs available, and wakes their queues."""

from __future__ import annotations

from typing import TYPE_CHECKING

from koban.engines.base import INSERT_CHANNEL
from koban.plugins.base import Plugin

if TYPE_CHECKING:
    from koban.runtime.node import Node


class Stager(Plugin):
    name = "stager"
    interval = 1.0

    def __init__(self, *, interval: float = 1.0, batch: int = 5000) -> None:
        self.interval = interval
        self.batch = batch

    async def tick(self, node: Node) -> int:
        queues = await node.engine.stage(self.batch, now=node.db_now())
        for queue in set(queues):
            node.wake(queue)
            await node.engine.notify(INSERT_CHANNEL, {"queue": queue})
        return len(queues)

    def next_delay(self, result: int) -> float:
        return self.interval
