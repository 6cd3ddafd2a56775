"""Dashboard fixtures: a real uvicorn server on a free port, and a node running in a thread."""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import uvicorn

import koban
from helpers import wait_until


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def serve(asgi: Any) -> Iterator[str]:
    """Run `asgi` under uvicorn in a thread; yield its base URL; stop it on exit."""
    port = free_port()
    config = uvicorn.Config(asgi, host="127.0.0.1", port=port, log_level="warning", lifespan="on")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="test-uvicorn", daemon=True)
    thread.start()
    try:
        wait_until(lambda: server.started, what="uvicorn to start")
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


class NodeThread:
    """A koban node for `app`, running on its own event loop in a thread until `stop`."""

    def __init__(self, app: koban.Koban) -> None:
        self.app = app
        self._loop = asyncio.new_event_loop()
        self._stopped: asyncio.Event | None = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="test-node", daemon=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(self._main())

    async def _main(self) -> None:
        self._stopped = asyncio.Event()
        await self.app.start()
        self._ready.set()
        await self._stopped.wait()
        await self.app.close()

    def start(self) -> NodeThread:
        self._thread.start()
        if not self._ready.wait(15):
            raise AssertionError("the node did not start within 15 s")
        return self

    def stop(self) -> None:
        if self._thread.is_alive() and self._stopped is not None:
            self._loop.call_soon_threadsafe(self._stopped.set)
            self._thread.join(15)


@pytest.fixture
def run_node() -> Iterator[Any]:
    """Start nodes with `run_node(app)`; every one started is stopped at the end of the test."""
    started: list[NodeThread] = []

    def start(app: koban.Koban) -> NodeThread:
        node = NodeThread(app).start()
        started.append(node)
        return node

    yield start
    for node in started:
        node.stop()
