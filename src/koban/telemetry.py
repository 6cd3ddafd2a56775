"""One event bus for everything koban reports; logging, metrics and traces subscribe to it.

>>> app.telemetry.subscribe("job:stop", lambda event, data: print(data["job"].id, data["duration"]))

Events and their data:

- ``job:enqueue``    job, before it is validated and inserted; subscribers may add entries
                     to a copy of ``job.meta`` (tracing carries its context this way)
- ``job:start``      job, queue, queue_wait (seconds from scheduled_at to start)
- ``job:stop``       job, queue, queue_wait, duration, state (the outcome: completed, snoozed...)
- ``job:exception``  job, queue, queue_wait, duration, state (retryable or discarded), error,
                     traceback
- ``plugin:...``     emitted by plugins (stager, lifeline, pruner, cron) with their results
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable
from typing import Any

log = logging.getLogger("koban.telemetry")

Handler = Callable[[str, dict[str, Any]], None]


class Telemetry:
    """Subscribers per event name; ``"*"`` receives every event."""

    def __init__(self) -> None:
        self._handlers: dict[str, list[Handler]] = {}

    def subscribe(self, event: str, handler: Handler) -> Callable[[], None]:
        """Call `handler(event, data)` for every `event`; returns a function that unsubscribes."""
        self._handlers.setdefault(event, []).append(handler)

        def unsubscribe() -> None:
            handlers = self._handlers.get(event, [])
            if handler in handlers:
                handlers.remove(handler)

        return unsubscribe

    def subscribe_many(self, events: Iterable[str], handler: Handler) -> Callable[[], None]:
        """Subscribe `handler` to each of `events`; returns one function that undoes them all."""
        undo = [self.subscribe(event, handler) for event in events]

        def unsubscribe() -> None:
            for step in undo:
                step()

        return unsubscribe

    def listening(self, event: str) -> bool:
        """True if emitting `event` would reach a subscriber: a hot path can skip building the
        event's data when nobody listens."""
        return bool(self._handlers.get(event) or self._handlers.get("*"))

    def emit(self, event: str, **data: Any) -> None:
        """Deliver an event. A failing subscriber is logged and never reaches the caller."""
        for handler in (*self._handlers.get(event, ()), *self._handlers.get("*", ())):
            try:
                handler(event, data)
            except Exception:
                log.exception("telemetry subscriber %r failed on %s", handler, event)


class JobLogger:
    """Writes one structured line per job outcome to the ``koban.jobs`` logger."""

    def __init__(self, logger: logging.Logger | None = None, *, as_json: bool = False) -> None:
        self.logger = logger or logging.getLogger("koban.jobs")
        self.as_json = as_json

    def attach(self, telemetry: Telemetry) -> Callable[[], None]:
        return telemetry.subscribe_many(("job:stop", "job:exception"), self)

    def __call__(self, event: str, data: dict[str, Any]) -> None:
        job = data["job"]
        record: dict[str, Any] = {
            "event": event,
            "job_id": job.id,
            "worker": job.worker,
            "queue": job.queue,
            "attempt": job.attempt,
            "state": data.get("state"),
            "duration_ms": round(data.get("duration", 0.0) * 1000, 3),
            "queue_wait_ms": round(data.get("queue_wait", 0.0) * 1000, 3),
        }
        if event == "job:exception":
            record["error"] = data.get("error")
        level = logging.WARNING if event == "job:exception" else logging.INFO
        if self.as_json:
            self.logger.log(level, json.dumps(record, default=str))
        else:
            self.logger.log(level, " ".join(f"{k}={_fmt(v)}" for k, v in record.items()))


def _fmt(value: Any) -> str:
    text = str(value)
    return json.dumps(text) if (" " in text or '"' in text or not text) else text
