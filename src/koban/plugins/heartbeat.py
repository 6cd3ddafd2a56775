"""Heartbeat: keeps this node's row in `koban_nodes` fresh, which is what keeps its jobs its own.

Every `interval` seconds the node writes its queues (slots, paused, running jobs) and the time;
the lifeline rescues the jobs of a node whose heartbeat is older than its `rescue_after`. The
same round trip brings the node's runtime settings back: the cluster-wide queue settings in
`koban_queues` and this node's own in its row, so a pause, resume or scale reaches every node
even where notifications are not delivered (and a node started later honours them). It also
stops running jobs the database no longer holds as executing here (cancelled, or rescued while
this node was cut off), for the same reason.

A node registers before it fetches its first job and deletes its row on a clean stop; if jobs
were abandoned at shutdown, the row is left to expire so they are rescued only then.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import uuid
from datetime import datetime
from typing import TYPE_CHECKING

from koban.engines.base import JobFilter, NodeInfo
from koban.errors import ConfigurationError
from koban.job import JobState
from koban.plugins.base import Plugin

if TYPE_CHECKING:
    from koban.runtime.node import Node

log = logging.getLogger("koban.heartbeat")

DEFAULT_INTERVAL = 5.0


def _version() -> str:
    try:
        from koban import __version__

        return __version__
    except ImportError:  # pragma: no cover - during koban's own import
        return "?"


class Heartbeat(Plugin):
    """Registers the node and refreshes its heartbeat every `interval` seconds."""

    name = "heartbeat"
    leader_only = False

    def __init__(self, *, interval: float = DEFAULT_INTERVAL) -> None:
        if isinstance(interval, bool) or not isinstance(interval, int | float) or interval <= 0:
            raise ConfigurationError(
                f"Heartbeat interval must be a positive number of seconds, got {interval!r}"
            )
        self.interval = float(interval)
        self.incarnation = uuid.uuid4().hex
        self._failing = False
        #: The row another process registered under this node's name, once it did.
        self._usurper: NodeInfo | None = None

    def __repr__(self) -> str:
        return f"<Heartbeat every {self.interval}s>"

    def _info(self, node: Node) -> NodeInfo:
        return NodeInfo(
            name=node.name,
            queues=node.queue_report(),
            meta={
                "incarnation": self.incarnation,
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "version": _version(),
                "interval": self.interval,
            },
        )

    async def _beat(self, node: Node, *, takeover: bool = False) -> NodeInfo:
        info = await node.engine.heartbeat(
            self._info(node), node.live_within, now=node.db_now(), takeover=takeover
        )
        if info.meta.get("incarnation") != self.incarnation:
            self._lose_name(node, info)
            return info
        node.last_heartbeat = node.clock.now()
        started = info.meta.get("cluster_started_at")
        if isinstance(started, str):
            node.cluster_started_at = datetime.fromisoformat(started)
        settings = await node.engine.queue_settings()
        control = info.meta.get("control")
        node.apply_control(settings, control if isinstance(control, dict) else {})
        return info

    async def start(self, node: Node) -> None:
        # A fresh incarnation per start: a restarted node (same name) must not look like the
        # one whose jobs it never ran.
        self.incarnation = uuid.uuid4().hex
        self._usurper = None
        await self._refuse_a_live_namesake(node)
        await self._beat(node, takeover=True)

    def _lose_name(self, node: Node, other: NodeInfo) -> None:
        """Another process registered under this node's name after it started.

        Both started at about the same moment, too close for `_refuse_a_live_namesake`. Taking
        the row back would make each restart the other's row over and over, and the lifeline
        would rescue both nodes' running jobs as a restarted node's. The later registration
        keeps the name: this node leaves the row alone and stops fetching; the jobs it runs
        now finish, and those the other's registration made look orphaned are rescued.
        """
        self._usurper = other
        node.fail(
            ConfigurationError(
                f"node name {node.name!r} was registered by another process (pid "
                f"{other.meta.get('pid', '?')} on {other.meta.get('host', '?')}) after this "
                "node started under it: two processes under one name would rescue each "
                "other's jobs. This node stops fetching jobs. Give each process its own name "
                "(koban start --node NAME, or app.start(node=...)), or leave it to the default "
                "(host.pid)."
            )
        )

    async def _refuse_a_live_namesake(self, node: Node) -> None:
        """Refuse to start under the name of a node that is still running.

        Two live processes with one name would each re-register over the other and rescue
        each other's jobs as a restarted node's. A row left under the name may also be a
        predecessor that crashed (a restart under a fixed name): it is watched for two of
        its heartbeat intervals (the longer of its and ours), and only a heartbeat that moves
        on refuses the start. Only the row's own fields are compared, so no clock is needed;
        two processes started at the very same moment under one name are not caught.
        """
        other = await self._namesake(node)
        if other is None:
            return
        theirs = other.meta.get("interval")
        interval = max(self.interval, float(theirs) if isinstance(theirs, int | float) else 0.0)
        log.info(
            "node name %s is registered by another process (pid %s on %s); watching its "
            "heartbeat for %.1f s before taking the name over",
            node.name, other.meta.get("pid", "?"), other.meta.get("host", "?"), 2 * interval,
        )  # fmt: skip
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 2 * interval
        while loop.time() < deadline:
            await asyncio.sleep(min(0.5, interval / 5))
            now = await self._namesake(node)
            if now is None:
                return  # it stopped cleanly and removed its row
            if (now.heartbeat_at, now.meta.get("incarnation")) != (
                other.heartbeat_at,
                other.meta.get("incarnation"),
            ):
                raise ConfigurationError(
                    f"node name {node.name!r} is in use by a running node (pid "
                    f"{now.meta.get('pid', '?')} on {now.meta.get('host', '?')}): two processes "
                    "under one name would rescue each other's jobs. Give each process its own "
                    "name (koban start --node NAME, or app.start(node=...)), or leave it to the "
                    "default (host.pid); or stop the other node first."
                )

    async def _namesake(self, node: Node) -> NodeInfo | None:
        """The row registered under this node's name by another incarnation, if any."""
        for info in await node.engine.list_nodes():
            if info.name == node.name and info.meta.get("incarnation") != self.incarnation:
                return info
        return None

    async def tick(self, node: Node) -> int:
        """Refresh the heartbeat and settings; return how many stale jobs were stopped."""
        if self._usurper is not None:
            return 0  # the name is another process's now: its row is left alone
        try:
            await self._beat(node)
        except Exception:
            if not self._failing:
                log.warning(
                    "node %s cannot reach the database to heartbeat; if this lasts longer than "
                    "the rescue window its running jobs will be run again elsewhere",
                    node.name,
                )
            self._failing = True
            raise
        if self._failing:
            log.info("node %s is heartbeating again", node.name)
            self._failing = False
        return await self._stop_stale(node)

    async def _stop_stale(self, node: Node) -> int:
        running = node.running_job_attempts()
        if not running:
            return 0
        stored = await node.engine.list_jobs(JobFilter(ids=list(running)))
        stopped = 0
        for job in stored:
            assert job.id is not None
            ours = (
                job.state is JobState.EXECUTING
                and job.attempt == running.get(job.id)
                and job.attempted_by is not None
                and job.attempted_by[:1] == [node.name]
            )
            if not ours and node.cancel_local(job.id, attempt=running[job.id]):
                stopped += 1
                log.info(
                    "job %s is %s in the database, no longer executing here; stopping it",
                    job.id, job.state,
                )  # fmt: skip
        return stopped

    async def stop(self, node: Node) -> None:
        if node.abandoned:
            # Threads may still be running those jobs: let the row expire before rescue.
            return
        if self._usurper is not None:
            return  # the row is the other process's
        try:
            await node.engine.remove_node(node.name)
        except Exception as exc:
            log.warning(
                "node %s could not unregister (%s); its row expires on its own", node.name, exc
            )
