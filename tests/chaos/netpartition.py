"""Network partitions on one machine: a node in its own network namespace, reaching PostgreSQL
through a veth pair and a TCP relay, and a switch that cuts it off.

    root namespace                               namespace kc<id>
    PostgreSQL 127.0.0.1:5432 <- TcpRelay <- 10.250.N.1/30 ==veth== 10.250.N.2/30 <- node

`cut()` takes the root-namespace end of the veth pair down: the node's packets vanish without an
answer, as when a cable or a switch fails, so its connections hang rather than fail. `heal()`
brings it back and TCP retransmits what was waiting. Everything stays on this machine.

PostgreSQL listens on 127.0.0.1 only, so the relay (a small thread in the test process) accepts
on the veth address and connects to the server's real address.

Where network namespaces are not allowed, `RelayPartition` gives the same interface with the
node in the root namespace: the relay itself stops moving bytes (its sockets stay open, so
the node's connections hang as they would behind a dead link).
"""

from __future__ import annotations

import contextlib
import os
import selectors
import socket
import subprocess
import threading


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=30)


def namespaces_supported() -> str | None:
    """None if this process may create network namespaces, else why not (the tool's words)."""
    name = f"kcprobe{os.getpid()}"
    try:
        result = _ip("netns", "add", name, check=False)
    except FileNotFoundError:
        return "the `ip` command (iproute2) is not installed"
    if result.returncode != 0:
        return f"`ip netns add` failed: {result.stderr.strip() or result.stdout.strip()}"
    _ip("netns", "del", name, check=False)
    return None


class TcpRelay:
    """Accepts TCP connections on (host, port) and relays each to `target`, in one thread."""

    def __init__(self, host: str, target: tuple[str, int]) -> None:
        self.target = target
        self._listener = socket.create_server((host, 0))
        self._listener.setblocking(False)
        self.address = self._listener.getsockname()[:2]
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._listener, selectors.EVENT_READ, None)
        self._stop = threading.Event()
        self._frozen = threading.Event()
        self._paused = threading.Event()
        self._thread = threading.Thread(target=self._run, name="tcp-relay", daemon=True)
        self._thread.start()

    def freeze(self) -> None:
        """Stop moving bytes and accepting connections; everything waits, nothing is closed.
        Returns once the relay thread has stopped moving bytes."""
        self._paused.clear()
        self._frozen.set()
        if not self._paused.wait(5):
            raise RuntimeError("the relay did not pause")

    def thaw(self) -> None:
        self._frozen.clear()

    def _run(self) -> None:
        while not self._stop.is_set():
            if self._frozen.is_set():
                self._paused.set()
                self._stop.wait(0.05)
                continue
            for key, _ in self._selector.select(timeout=0.2):
                if key.data is None:
                    self._accept()
                else:
                    self._pump(key.fileobj, key.data)  # type: ignore[arg-type]

    def _accept(self) -> None:
        try:
            client, _ = self._listener.accept()
        except BlockingIOError:
            return
        try:
            upstream = socket.create_connection(self.target, timeout=5)
        except OSError:
            client.close()
            return
        for sock in (client, upstream):
            sock.setblocking(False)
        self._selector.register(client, selectors.EVENT_READ, upstream)
        self._selector.register(upstream, selectors.EVENT_READ, client)

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            data = source.recv(65536)
            if data:
                sink.setblocking(True)
                sink.sendall(data)
                sink.setblocking(False)
                return
        except OSError:
            pass
        for sock in (source, sink):  # either side closed: close the pair
            with contextlib.suppress(KeyError, ValueError):
                self._selector.unregister(sock)
            sock.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        for key in list(self._selector.get_map().values()):
            key.fileobj.close()  # type: ignore[union-attr]
        self._selector.close()


class Partition:
    """A network namespace joined to the root namespace by a veth pair, with a relay to
    PostgreSQL; `prefix` runs a command inside it."""

    def __init__(self, db_host: str, db_port: int) -> None:
        ident = os.getpid() % 100_000
        self.name = f"kc{ident}"
        self.host_if = f"kc{ident}h"
        self.ns_if = f"kc{ident}n"
        subnet = self._free_subnet()
        self.host_ip = f"10.250.{subnet}.1"
        self.ns_ip = f"10.250.{subnet}.2"
        self._created = False
        self.relay: TcpRelay | None = None
        try:
            _ip("netns", "add", self.name)
            self._created = True
            _ip("link", "add", self.host_if, "type", "veth", "peer", "name", self.ns_if)
            _ip("link", "set", self.ns_if, "netns", self.name)
            _ip("addr", "add", f"{self.host_ip}/30", "dev", self.host_if)
            _ip("link", "set", self.host_if, "up")
            self._in_ns("ip", "addr", "add", f"{self.ns_ip}/30", "dev", self.ns_if)
            self._in_ns("ip", "link", "set", self.ns_if, "up")
            self._in_ns("ip", "link", "set", "lo", "up")
            self.relay = TcpRelay(self.host_ip, (db_host, db_port))
        except BaseException:
            self.close()
            raise

    @staticmethod
    def _free_subnet() -> int:
        """A 10.250.N.0/30 that no interface on this machine uses yet."""
        used = _ip("-o", "addr").stdout
        for n in range(1, 255):
            if f"10.250.{n}." not in used:
                return n
        raise RuntimeError("no free 10.250.N.0/30 subnet for the test's veth pair")

    def _in_ns(self, *cmd: str) -> None:
        subprocess.run(["ip", "netns", "exec", self.name, *cmd], check=True, timeout=30)

    @property
    def prefix(self) -> list[str]:
        """Put before a command to run it inside the namespace."""
        return ["ip", "netns", "exec", self.name]

    @property
    def relay_address(self) -> tuple[str, int]:
        assert self.relay is not None
        host, port = self.relay.address
        return str(host), int(port)

    def cut(self) -> None:
        """Packets between the namespace and the database vanish from now on."""
        _ip("link", "set", self.host_if, "down")

    def heal(self) -> None:
        _ip("link", "set", self.host_if, "up")

    def close(self) -> None:
        if self.relay is not None:
            self.relay.close()
            self.relay = None
        _ip("link", "del", self.host_if, check=False)
        if self._created:
            _ip("netns", "del", self.name, check=False)
            self._created = False


class RelayPartition:
    """The same switch without a namespace: the node runs beside the test and reaches the
    database through a relay on 127.0.0.1, which `cut` freezes."""

    prefix: list[str] = []

    def __init__(self, db_host: str, db_port: int) -> None:
        self.relay = TcpRelay("127.0.0.1", (db_host, db_port))

    @property
    def relay_address(self) -> tuple[str, int]:
        host, port = self.relay.address
        return str(host), int(port)

    def cut(self) -> None:
        self.relay.freeze()

    def heal(self) -> None:
        self.relay.thaw()

    def close(self) -> None:
        self.relay.close()
