"""Acker: records job outcomes in batches, so a burst of finished jobs costs few statements."""

from __future__ import annotations

import asyncio
import logging
from datetime import datetime

from koban.clock import Clock
from koban.engines.base import Ack, Engine

log = logging.getLogger("koban.acker")


class Acker:
    """Collects acks and writes them in batches; retries while the database is unreachable.

    Outcomes held here are lost if the process dies; their jobs stay `executing` and are
    rescued once the node's heartbeat expires, so they run again (at-least-once).
    """

    def __init__(self, engine: Engine, clock: Clock, *, max_batch: int = 2000) -> None:
        self.engine = engine
        self.clock = clock
        self.max_batch = max_batch
        self._pending: list[Ack] = []
        self._ready = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._failing = False

    def add(self, ack: Ack) -> None:
        self._pending.append(ack)
        self._idle.clear()
        self._ready.set()

    @property
    def pending(self) -> int:
        return len(self._pending)

    async def run(self) -> None:
        """Write batches until cancelled."""
        delay = 0.1
        while True:
            await self._ready.wait()
            # Let the other jobs finishing in this loop turn join the batch.
            await asyncio.sleep(0)
            if await self._write_batch():
                delay = 0.1
            else:
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    async def _write_batch(self) -> bool:
        batch = self._pending[: self.max_batch]
        if not batch:
            self._ready.clear()
            self._idle.set()
            return True
        try:
            await self.engine.ack(batch, now=self._now())
        except Exception as exc:
            if not self._failing:
                log.warning(
                    "cannot record %d job outcome(s) (%s: %s); retrying until the database is back",
                    len(batch),
                    type(exc).__name__,
                    str(exc).strip().splitlines()[0] if str(exc).strip() else "",
                )
                self._failing = True
            return False
        if self._failing:
            log.info("recording job outcomes again")
            self._failing = False
        del self._pending[: len(batch)]
        if not self._pending:
            self._ready.clear()
            self._idle.set()
        return True

    def _now(self) -> datetime | None:
        return self.clock.now() if self.clock.frozen else None

    async def drain(self, timeout: float) -> bool:
        """Wait until every pending ack is written (the run loop must be running)."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
            return True
        except TimeoutError:
            return False
