"""OpenTelemetry tracing for koban: one span per job execution, linked to where it was enqueued.

>>> from koban.contrib.otel import instrument
>>> instrument(app)                      # uses the global tracer provider and propagator

At enqueue, the trace context current in the caller (for example a web request's span) is
written into the job's meta under ``"otel"`` with the configured propagator (W3C
``traceparent`` by default). When a node runs the job, it starts a CONSUMER span named
``koban.job <worker>`` that links to that context (or, with ``as_child=True``, continues its
trace as a child), records the attempt's outcome, and is current while the worker runs, so
spans the worker starts nest under it. Needs the `otel` extra.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.trace import Link, SpanKind, Status, StatusCode

from koban.telemetry import Telemetry

if TYPE_CHECKING:
    from koban.app import Koban

#: The key in job.meta that carries the trace context.
META_KEY = "otel"
TRACER_NAME = "koban"


class Tracing:
    """The telemetry subscriber behind `instrument`; `detach()` stops tracing."""

    def __init__(
        self,
        telemetry: Telemetry,
        tracer_provider: trace.TracerProvider | None = None,
        *,
        as_child: bool = False,
    ) -> None:
        from koban import __version__

        self.tracer = trace.get_tracer(TRACER_NAME, __version__, tracer_provider=tracer_provider)
        self.as_child = as_child
        # (job id, attempt) -> (span, context token); start and stop run in the job's own task.
        self._running: dict[tuple[int, int], tuple[trace.Span, object]] = {}
        self._unsubscribe = [
            telemetry.subscribe("job:enqueue", self._on_enqueue),
            telemetry.subscribe("job:start", self._on_start),
            telemetry.subscribe("job:stop", self._on_end),
            telemetry.subscribe("job:exception", self._on_end),
        ]

    def detach(self) -> None:
        for unsubscribe in self._unsubscribe:
            unsubscribe()
        self._unsubscribe = []

    def _on_enqueue(self, event: str, data: dict[str, Any]) -> None:
        job = data["job"]
        carrier: dict[str, str] = {}
        propagate.inject(carrier)
        if carrier:
            # A copy: callers may share one meta dict between jobs.
            job.meta = {**job.meta, META_KEY: carrier}

    def _on_start(self, event: str, data: dict[str, Any]) -> None:
        job = data["job"]
        carrier = job.meta.get(META_KEY) if isinstance(job.meta, dict) else None
        parent = None
        links: list[Link] = []
        if isinstance(carrier, dict):
            extracted = propagate.extract({str(k): str(v) for k, v in carrier.items()})
            enqueued = trace.get_current_span(extracted).get_span_context()
            if enqueued.is_valid:
                links.append(Link(enqueued, {"koban.link": "enqueued"}))
                if self.as_child:
                    parent = extracted
        span = self.tracer.start_span(
            f"koban.job {job.worker}",
            context=parent if parent is not None else otel_context.Context(),
            kind=SpanKind.CONSUMER,
            links=links,
            attributes={
                "messaging.system": "koban",
                "messaging.operation": "process",
                "messaging.destination.name": job.queue,
                "koban.job.id": int(job.id or 0),
                "koban.job.worker": job.worker,
                "koban.job.queue": job.queue,
                "koban.job.attempt": int(job.attempt),
                "koban.job.max_attempts": int(job.max_attempts),
                "koban.job.queue_wait_s": float(data.get("queue_wait") or 0.0),
            },
        )
        token = otel_context.attach(trace.set_span_in_context(span))
        self._running[(int(job.id or 0), int(job.attempt))] = (span, token)

    def _on_end(self, event: str, data: dict[str, Any]) -> None:
        job = data["job"]
        entry = self._running.pop((int(job.id or 0), int(job.attempt)), None)
        if entry is None:
            return
        span, token = entry
        span.set_attribute("koban.job.outcome", str(data.get("state") or "unknown"))
        if event == "job:exception":
            error = str(data.get("error") or "")
            kind, _, message = error.partition(": ")
            span.add_event(
                "exception",
                {
                    "exception.type": kind,
                    "exception.message": message,
                    "exception.stacktrace": str(data.get("traceback") or ""),
                },
            )
            span.set_status(Status(StatusCode.ERROR, error))
        span.end()
        otel_context.detach(token)  # type: ignore[arg-type]


def instrument(
    app: Koban | Telemetry,
    *,
    tracer_provider: trace.TracerProvider | None = None,
    as_child: bool = False,
) -> Tracing:
    """Trace `app`'s enqueues and executions; returns the subscriber (call `detach()` to stop)."""
    telemetry = app if isinstance(app, Telemetry) else app.telemetry
    return Tracing(telemetry, tracer_provider, as_child=as_child)
