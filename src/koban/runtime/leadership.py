"""Leadership: at most one node of a cluster runs the leader-only plugins at any moment.

The leader holds a lease, one row in `koban_leader` with an expiry, taken and renewed by one
atomic statement that succeeds only when the lease is free, expired or already ours. A node
renews every `lease / 3` seconds.

A leader that cannot reach the database must stop acting as leader before another node can
take the lease over. The database sets the expiry from its own clock when the renewal arrives,
which is no earlier than when this node sent it; so the node keeps its own deadline, the time it
sent the last successful renewal plus the lease less a safety `margin`, measured on its own
monotonic clock, and `is_leader` turns false at that deadline whatever the database says.

A stopping leader deletes its row and tells the other nodes, which try to take over at once
rather than waiting for the lease to expire.

>>> koban.Koban(url, plugins=[Leadership(lease=30)])   # a longer lease than the default 15 s
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from koban.engines.base import SIGNAL_CHANNEL
from koban.errors import ConfigurationError
from koban.plugins.base import Plugin

if TYPE_CHECKING:
    from koban.runtime.node import Node

log = logging.getLogger("koban.leadership")

DEFAULT_LEASE = 15.0
#: The signal a resigning leader sends so the others try to take over now.
RESIGNED = "leader_resigned"


class Leadership(Plugin):
    """Seeks, holds and renews the cluster's leadership lease for its node."""

    name = "leadership"
    leader_only = False

    def __init__(
        self,
        *,
        lease: float = DEFAULT_LEASE,
        renew_every: float | None = None,
        margin: float | None = None,
    ) -> None:
        if isinstance(lease, bool) or not isinstance(lease, int | float) or lease <= 0:
            raise ConfigurationError(
                f"Leadership lease must be a positive number of seconds, got {lease!r}"
            )
        self.lease = float(lease)
        self.interval = self.lease / 3 if renew_every is None else float(renew_every)
        self.margin = min(self.lease * 0.2, 5.0) if margin is None else float(margin)
        if not (0 <= self.margin and 0 < self.interval < self.lease - self.margin):
            # Renewing less often than that would let the lease lapse between renewals.
            raise ConfigurationError(
                f"Leadership needs 0 <= margin and 0 < renew_every < lease - margin; got "
                f"lease={lease!r}, renew_every={renew_every!r}, margin={margin!r}"
            )
        self._node: Node | None = None
        self._deadline: float | None = None
        self._stopping = False
        self._failing = False
        self._renew_now = False

    def __repr__(self) -> str:
        return f"<Leadership lease={self.lease}s>"

    # ----- local view -----------------------------------------------------------------------
    def _now(self) -> float:
        # A frozen test clock drives the lease in the database, so it drives ours too; in
        # production the monotonic clock, which wall-clock corrections never move.
        node = self._node
        if node is not None and node.clock.frozen:
            return node.clock.now().timestamp()
        return time.monotonic()

    @property
    def is_leader(self) -> bool:
        """True while this node holds a lease that no other node can have taken over."""
        deadline = self._deadline
        if deadline is None:
            return False
        if self._now() < deadline:
            return True
        self._deadline = None
        node = self._node
        log.warning(
            "node %s stops acting as leader: its lease could not be renewed in time",
            node.name if node else "?",
        )
        if node is not None:
            node.telemetry.emit("plugin:leadership", node=node.name, leader=False)
        return False

    # ----- plugin ---------------------------------------------------------------------------
    async def start(self, node: Node) -> None:
        self._node = node
        self._deadline = None
        self._stopping = False

    async def tick(self, node: Node) -> bool:
        """Take or renew the lease; True while this node leads."""
        self._node = node
        if self._stopping:
            return False
        was = self.is_leader
        sent = self._now()
        try:
            expires = await node.engine.acquire_leadership(node.name, self.lease, now=node.db_now())
        except Exception:
            if was and not self._failing:
                log.warning(
                    "node %s cannot renew its leadership lease; it stays leader for at most "
                    "%.1f s more unless the database comes back",
                    node.name, max(0.0, (self._deadline or sent) - sent),
                )  # fmt: skip
            self._failing = True
            raise
        self._failing = False
        if self._stopping:
            # stopping() ran while the renewal was in flight: give the lease back again.
            await node.engine.resign_leadership(node.name)
            return False
        if expires is None:
            if was:
                log.warning("node %s lost the leadership lease to another node", node.name)
                node.telemetry.emit("plugin:leadership", node=node.name, leader=False)
            self._deadline = None
            return False
        leading = self.is_leader  # logs it if the lease lapsed while the call was out
        deadline = sent + self.lease - self.margin
        # An answer that took longer than a renewal period (the call waited out an outage, or
        # for a connection) gives a deadline counted from when it was sent: nearly spent, or
        # spent, though the lease was just granted. Renew again at once rather than lapse on
        # it; a spent one is not acted on at all.
        self._renew_now = self._now() - sent > self.interval
        if self._now() >= deadline:
            return False
        self._deadline = deadline
        if not leading:
            log.info("node %s is now the cluster's leader", node.name)
            node.telemetry.emit("plugin:leadership", node=node.name, leader=True)
            for plugin in node.plugins:
                if plugin.leader_only:
                    plugin.wake()
        return True

    def next_delay(self, result: bool) -> float:
        return 0.0 if self._renew_now else self.interval

    async def stopping(self, node: Node) -> None:
        """Resign at once, so another node takes over without waiting for the lease."""
        self._stopping = True
        was = self._deadline is not None
        self._deadline = None
        try:
            resigned = await node.engine.resign_leadership(node.name)
            if resigned:
                await node.engine.notify(SIGNAL_CHANNEL, {"action": RESIGNED, "from": node.name})
        except Exception as exc:
            if was:
                log.warning(
                    "node %s could not resign its leadership (%s); another node takes over "
                    "once the lease expires",
                    node.name, exc,
                )  # fmt: skip
            return
        if resigned:
            log.info("node %s resigned the leadership", node.name)
            node.telemetry.emit("plugin:leadership", node=node.name, leader=False)
