"""Prometheus metrics for koban: a telemetry subscriber plus gauges read from the database.

>>> metrics = PrometheusMetrics()
>>> metrics.attach(app.telemetry)            # executions, durations, queue waits
>>> app.extra_plugins.append(metrics.plugin(app))   # refresh the gauges from a node
>>> metrics.serve(9100)                      # or: `koban start --metrics-port 9100`

The dashboard serves the same metrics at ``/metrics``. Needs the `prometheus` extra.

Exported (all prefixed ``koban_``):

- ``job_executions_total{queue,worker,outcome}``: attempts by how they ended (completed,
  snoozed, cancelled, discarded, retryable)
- ``job_errors_total{queue,worker}``: attempts that raised
- ``job_duration_seconds{queue,worker}``: execution time (histogram)
- ``job_queue_wait_seconds{queue}``: from when a job could run until it started (histogram)
- ``jobs{queue,state}``: jobs in the table (``jobs_counts_exact`` is 0 while they are estimates)
- ``queue_depth{queue}``: available jobs waiting for a slot
- ``nodes_live``: nodes whose heartbeat is recent
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    start_http_server,
)

from koban.plugins.base import Plugin
from koban.plugins.lifeline import DEFAULT_RESCUE_AFTER
from koban.telemetry import Telemetry
from koban.web.stats import job_counts

if TYPE_CHECKING:
    from koban.app import Koban
    from koban.runtime.node import Node

log = logging.getLogger("koban.metrics")

CONTENT_TYPE = CONTENT_TYPE_LATEST
#: A node is live while its last heartbeat is younger than this (the lifeline's default).
LIVE_WITHIN = DEFAULT_RESCUE_AFTER

DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900)
WAIT_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 300, 900, 3600)


class PrometheusMetrics:
    """koban's metrics in one registry (a fresh one unless you pass yours)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.executions = Counter(
            "koban_job_executions", "Job attempts by how they ended.",
            ["queue", "worker", "outcome"], registry=r,
        )  # fmt: skip
        self.errors = Counter(
            "koban_job_errors", "Job attempts that raised.", ["queue", "worker"], registry=r
        )
        self.duration = Histogram(
            "koban_job_duration_seconds", "Time spent executing one attempt.",
            ["queue", "worker"], buckets=DURATION_BUCKETS, registry=r,
        )  # fmt: skip
        self.queue_wait = Histogram(
            "koban_job_queue_wait_seconds", "Time from when a job could run until it started.",
            ["queue"], buckets=WAIT_BUCKETS, registry=r,
        )  # fmt: skip
        self.jobs = Gauge("koban_jobs", "Jobs by queue and state.", ["queue", "state"], registry=r)
        self.jobs_exact = Gauge(
            "koban_jobs_counts_exact", "1 if koban_jobs is counted, 0 if estimated.", registry=r
        )
        self.queue_depth = Gauge(
            "koban_queue_depth", "Available jobs waiting for a slot.", ["queue"], registry=r
        )
        self.nodes_live = Gauge("koban_nodes_live", "Nodes with a recent heartbeat.", registry=r)
        self._job_labels: set[tuple[str, ...]] = set()
        self._depth_labels: set[tuple[str, ...]] = set()

    # ----- telemetry ------------------------------------------------------------------------
    def attach(self, telemetry: Telemetry) -> Callable[[], None]:
        """Count every execution reported on `telemetry`; returns a function that detaches."""
        return telemetry.subscribe_many(("job:stop", "job:exception"), self)

    def __call__(self, event: str, data: dict[str, Any]) -> None:
        job = data["job"]
        queue, worker = str(data.get("queue") or job.queue), str(job.worker)
        self.executions.labels(queue, worker, str(data.get("state") or "unknown")).inc()
        if event == "job:exception":
            self.errors.labels(queue, worker).inc()
        self.duration.labels(queue, worker).observe(float(data.get("duration") or 0.0))
        self.queue_wait.labels(queue).observe(float(data.get("queue_wait") or 0.0))

    # ----- database gauges ------------------------------------------------------------------
    async def refresh(self, app: Koban) -> None:
        """Read job counts and live nodes from the database into the gauges."""
        counts = await job_counts(app)
        # Set every value, then drop label sets that are gone: clearing first would let a
        # scrape running in another thread see a half-filled table.
        jobs: dict[tuple[str, ...], float] = {
            (q, s): n for q, by_state in counts.by_queue.items() for s, n in by_state.items()
        }
        depth: dict[tuple[str, ...], float] = {
            (q,): by_state.get("available", 0) for q, by_state in counts.by_queue.items()
        }
        self._job_labels = _replace(self.jobs, jobs, self._job_labels)
        self._depth_labels = _replace(self.queue_depth, depth, self._depth_labels)
        self.jobs_exact.set(1 if counts.exact else 0)
        list_nodes = getattr(app, "alist_nodes", None)
        if list_nodes is not None:
            now = datetime.now(UTC)
            nodes = await list_nodes()
            self.nodes_live.set(
                sum(
                    1
                    for n in nodes
                    if n.heartbeat_at is not None
                    and (now - n.heartbeat_at).total_seconds() < LIVE_WITHIN
                )
            )

    def render(self) -> bytes:
        """The registry in Prometheus' text format."""
        return generate_latest(self.registry)

    def plugin(self, app: Koban, interval: float = 15.0) -> Plugin:
        """A node plugin that refreshes the database gauges every `interval` seconds."""
        return _Refresh(self, app, interval)

    def serve(self, port: int, addr: str = "0.0.0.0") -> Any:
        """Serve /metrics on `port` from a background thread; returns the server."""
        server, _thread = start_http_server(port, addr=addr, registry=self.registry)
        log.info("metrics at http://%s:%d/metrics", addr, port)
        return server


def _replace(
    gauge: Gauge, values: dict[tuple[str, ...], float], previous: set[tuple[str, ...]]
) -> set[tuple[str, ...]]:
    """Set `values` on `gauge`, remove the label sets of `previous` now gone; return the new."""
    for labels, value in values.items():
        gauge.labels(*labels).set(value)
    for labels in previous - values.keys():
        gauge.remove(*labels)
    return set(values)


class _Refresh(Plugin):
    name = "metrics"

    def __init__(self, metrics: PrometheusMetrics, app: Koban, interval: float) -> None:
        self.metrics = metrics
        self.app = app
        self.interval = interval

    async def tick(self, node: Node) -> None:
        await self.metrics.refresh(self.app)
