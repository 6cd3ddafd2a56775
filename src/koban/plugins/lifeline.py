"""Lifeline: puts the jobs of dead nodes back to work (leader only).

A job is `executing` on exactly one node, named in `attempted_by`. While that node heartbeats,
its job is never touched, however long it runs. When the node's heartbeat is older than
`rescue_after` seconds (it crashed, was killed, or lost its machine or the database), or the node
was restarted since it took the job, the job goes back to `available` to run again elsewhere,
or to `discarded` when it has no attempt left. The rescue is written into the job: an entry of
type `koban.Rescued` in its errors and a `rescued` count in its meta.

With the defaults (heartbeat every 5 s, rescue after 30 s, a check every 5 s, a 15 s leadership
lease) a killed node's jobs run again within about 40 s, even when the killed node was the
leader.

>>> koban.Koban(url, plugins=[Lifeline(rescue_after=60)])
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from koban.engines.base import INSERT_CHANNEL
from koban.errors import ConfigurationError
from koban.job import JobState
from koban.plugins.base import Plugin

if TYPE_CHECKING:
    from koban.runtime.node import Node

log = logging.getLogger("koban.lifeline")

DEFAULT_RESCUE_AFTER = 30.0


def _positive(value: float, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
        raise ConfigurationError(f"{what} must be a positive number of seconds, got {value!r}")
    return float(value)


class Lifeline(Plugin):
    """Rescues executing jobs whose node stopped heartbeating."""

    name = "lifeline"
    leader_only = True

    def __init__(
        self,
        *,
        rescue_after: float = DEFAULT_RESCUE_AFTER,
        interval: float = 5.0,
        batch: int = 1000,
        forget_after: float = 3600.0,
    ) -> None:
        self.rescue_after = _positive(rescue_after, "Lifeline rescue_after")
        self.interval = _positive(interval, "Lifeline interval")
        if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
            raise ConfigurationError(
                f"Lifeline batch must be a whole number of at least 1, got {batch!r}"
            )
        self.batch = batch
        # Rows of dead nodes stay visible (list_nodes, the dashboard) for a while, then go.
        self.forget_after = max(_positive(forget_after, "Lifeline forget_after"), self.rescue_after)

    def __repr__(self) -> str:
        return f"<Lifeline rescue_after={self.rescue_after}s>"

    async def tick(self, node: Node) -> int:
        """Rescue one batch of orphaned jobs; return how many."""
        last = node.last_heartbeat
        if last is not None and (node.clock.now() - last).total_seconds() > self.rescue_after / 2:
            # This node's own heartbeat is late (the process was paused, or the database is
            # struggling): its own jobs would look dead too. Judge others once it has caught up.
            return 0
        now = node.db_now()
        # `by`: the statement checks this node's heartbeat again as it runs, in case it waited
        # out an outage (for a connection, say) after the check above.
        rescued = await node.engine.rescue_jobs(
            self.rescue_after, self.batch, now=now, by=node.name
        )
        if rescued:
            available = sorted({j.queue for j in rescued if j.state is JobState.AVAILABLE})
            discarded = [j.id for j in rescued if j.state is JobState.DISCARDED]
            dead = sorted({j.attempted_by[0] for j in rescued if j.attempted_by})
            log.warning(
                "rescued %d job(s) left executing by node(s) %s that stopped heartbeating: "
                "%d to run again, %d discarded (no attempt left)",
                len(rescued), ", ".join(dead), len(rescued) - len(discarded), len(discarded),
            )  # fmt: skip
            node.telemetry.emit("plugin:lifeline", jobs=rescued, nodes=dead)
            for queue in available:
                node.wake(queue)
                await node.engine.notify(INSERT_CHANNEL, {"queue": queue})
        await node.engine.forget_nodes(self.forget_after, now=now)
        return len(rescued)

    def next_delay(self, result: int) -> float:
        # A full batch means more may be waiting.
        return 0.0 if result >= self.batch else self.interval
