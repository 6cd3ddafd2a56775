"""The chaos driver: a cluster of node processes, and the hand that kills and restarts them.

>>> cluster = ChaosCluster(url, workdir, size=3)
>>> cluster.start()
>>> cluster.strike(random.Random(1))      # SIGKILL or SIGTERM one node, start a fresh one
>>> cluster.stop()                        # SIGTERM every node; cluster.exits says how each ended

Every node process is started with a name of its own (`chaos<slot>-<generation>`), so a
restarted node is a new node to the cluster, as a real restart (new pid) would be.
"""

from __future__ import annotations

import random
import signal
import time
from collections.abc import Mapping
from pathlib import Path

from helpers import NodeProcess

from .invariants import Exit

APP = "chaos.chaos_app:app"


class ChaosCluster:
    def __init__(
        self,
        url: str,
        workdir: Path,
        *,
        size: int = 3,
        env: Mapping[str, str] | None = None,
        grace: float = 3.0,
    ) -> None:
        self.url = url
        self.workdir = workdir
        self.size = size
        self.grace = grace
        self.ledger_dir = workdir / "ledger"
        self.log_dir = workdir / "logs"
        self.ledger_dir.mkdir(parents=True, exist_ok=True)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.env = {
            "KOBAN_CHAOS_LEDGER": str(self.ledger_dir),
            "KOBAN_CHAOS_GRACE": str(grace),
            **(env or {}),
        }
        self.nodes: dict[int, NodeProcess] = {}
        self.names: dict[int, str] = {}
        #: Per slot: the database URL its node uses and a command prefix (a network namespace).
        self.placement: dict[int, tuple[str, list[str]]] = {}
        self.generation = 0
        #: How every process that has ended did so, by pid.
        self.exits: dict[int, Exit] = {}
        self.crashes: list[str] = []

    # ----- lifecycle ------------------------------------------------------------------------
    def start(self) -> None:
        for slot in range(self.size):
            self._spawn(slot)
        for node in self.nodes.values():
            node.wait_started(timeout=30)

    def add(self, url: str | None = None, prefix: list[str] | None = None) -> int:
        """Start one more node, optionally reaching the database at another URL from inside
        a command prefix; return its slot once it has started."""
        slot = max(self.placement, default=self.size - 1) + 1
        slot = max(slot, self.size)
        self.placement[slot] = (url or self.url, prefix or [])
        self._spawn(slot).wait_started(timeout=30)
        return slot

    def _spawn(self, slot: int) -> NodeProcess:
        self.generation += 1
        name = f"chaos{slot}-{self.generation}"
        url, prefix = self.placement.get(slot, (self.url, []))
        node = NodeProcess(
            APP,
            url,
            self.log_dir / f"{name}.log",
            node=name,
            env=self.env,
            prefix=prefix,
        )
        self.nodes[slot] = node
        self.names[slot] = name
        return node

    def check_alive(self) -> None:
        """Record any node that exited without being told to: a crash."""
        for slot, node in list(self.nodes.items()):
            code = node.proc.poll()
            if code is not None:
                self._record(slot, None, code)
                self.crashes.append(
                    f"node {self.names[slot]} (pid {node.pid}) exited on its own with {code}:\n"
                    + node.output()[-3000:]
                )
                self._spawn(slot)

    def _record(self, slot: int, sent: int | None, code: int) -> None:
        node = self.nodes[slot]
        self.exits[node.pid] = Exit(node.pid, self.names[slot], sent, code, time.monotonic_ns())

    def stop_node(self, slot: int, sig: int) -> Exit:
        """Send `sig` to one node and wait for it to exit; return how it ended."""
        node = self.nodes[slot]
        node.signal(sig)
        code = node.wait(timeout=self.grace + 20)
        self._record(slot, sig, code)
        if sig == signal.SIGTERM and code != 0:
            self.crashes.append(
                f"node {self.names[slot]} exited with {code} after SIGTERM (expected 0):\n"
                + node.output()[-3000:]
            )
        return self.exits[node.pid]

    def strike(self, rng: random.Random, kill_share: float = 0.5) -> Exit:
        """SIGKILL or SIGTERM a random node, then start a new one in its place.

        SIGKILL is chosen so that kills stay at `kill_share` of all strikes so far: every run,
        however short, has both kinds.
        """
        self.check_alive()
        slot = rng.choice(sorted(self.nodes))
        kills = sum(1 for e in self.exits.values() if e.killed)
        strikes = sum(1 for e in self.exits.values() if e.sent is not None)
        sig = signal.SIGKILL if kills < kill_share * (strikes + 1) else signal.SIGTERM
        ended = self.stop_node(slot, sig)
        self._spawn(slot).wait_started(timeout=30)
        return ended

    def stop(self) -> None:
        """Stop every node gracefully (SIGTERM), the way a deploy would."""
        self.check_alive()
        for slot in list(self.nodes):
            node = self.nodes[slot]
            if node.proc.poll() is None:
                node.signal(signal.SIGTERM)
        for slot in list(self.nodes):
            code = self.nodes[slot].wait(timeout=self.grace + 20)
            self._record(slot, signal.SIGTERM, code)
            if code != 0:
                self.crashes.append(
                    f"node {self.names[slot]} exited with {code} on the final SIGTERM:\n"
                    + self.nodes[slot].output()[-3000:]
                )
        self.nodes.clear()

    def kill_all(self) -> None:
        """Clean-up after a failed test: nothing may outlive it."""
        for node in self.nodes.values():
            node.kill()
        self.nodes.clear()

    # ----- reading the runs -----------------------------------------------------------------
    def logs(self) -> dict[str, str]:
        return {p.stem: p.read_text(errors="replace") for p in sorted(self.log_dir.glob("*.log"))}
