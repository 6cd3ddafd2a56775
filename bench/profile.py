"""Where koban's time goes: a py-spy profile of a burn-down node, and the insert-to-start
latency split into its parts.

    .venv/bin/python bench/profile.py                      # both, into bench/results/profile/
    .venv/bin/python bench/profile.py --jobs 20000 --latency-jobs 500 --out /tmp/profile
    .venv/bin/python bench/profile.py --only latency

The jobs are enqueued in bulk and the table analyzed first, in this process, as the burn-down
workload does (untimed). Then a node, in a process of its own, runs until every job has an
outcome, while py-spy samples it, idle time included: a thread waiting on the database shows as
its wait. Written to --out:

- `burndown.collapsed`: every sampled stack with its count, one per line (the "collapsed"
  format that speedscope and flamegraph tools read);
- `burndown.md`: the node's wall time split into what it waited on and what it computed, and
  the frames with the most samples, inclusive and self.

Latency: a node runs in this process while a second process inserts jobs one at a time with
koban's client at 100 per second, each carrying the wall time just before its insert call.
The node records when each insert notification arrives, when each fetch is sent and returns,
and when each job starts (by wrapping `Node._on_notification` and `engine.claim`: this is a
measurement harness, not an API). `latency.md` gives p50 and p95 of each part: the insert call
(as the client sees it), commit to notification, notification to fetch, the fetch, and fetch to
the job's start. Both processes read one clock, as the benchmark's latency workload does.

py-spy comes from PyPI into bench/.envs/profile (pinned in run.py, `PEER_PACKAGES`). It reads
another process's memory: as root, or with ptrace allowed.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import collections
import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

import psycopg  # noqa: E402
from run import PEER_PACKAGES, ensure_database, ensure_env, log  # noqa: E402

import koban  # noqa: E402

#: The node's queue and slots, as the burn-down workload runs koban (run.py --slots).
SLOTS = 900

#: Buckets for the wall-time split, first match wins: (label, a frame's text contains any of).
BUCKETS: list[tuple[str, tuple[str, ...]]] = [
    ("waiting: event loop idle (select), nothing ready", ("select (selectors.py",)),
    ("waiting: other threads (pool workers, timers) asleep", ("wait (threading.py",)),
    ("fetch: claim statement and its rows", ("PostgresEngine.claim",)),
    ("ack: outcome statements (Acker)", ("Acker.",)),
    ("running jobs (tasks, Executor, telemetry)", ("Producer._execute", "Producer._start")),
    ("node plugins (heartbeat, stager, leadership, ...)", ("koban/plugins/", "runtime/node.py")),
]


def app(dsn: str) -> tuple[koban.Koban, koban.Worker]:
    node = koban.Koban(dsn, queues={"default": SLOTS}, shutdown_grace=5.0)

    async def noop(job: koban.Job) -> None:
        return None

    noop.__qualname__ = "noop"
    return node, node.worker(queue="default", max_attempts=3)(noop)


async def prepare(dsn: str, jobs: int) -> None:
    node, worker = app(dsn)
    try:
        await asyncio.to_thread(node.migrate)
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
            await conn.execute("TRUNCATE koban_jobs, koban_nodes, koban_leader, koban_queues")
        for start in range(0, jobs, 5000):
            await node.aenqueue_many(
                worker.new({"i": i}) for i in range(start, min(jobs, start + 5000))
            )
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
            await conn.execute("ANALYZE koban_jobs")
    finally:
        await node.close()


async def run_node(dsn: str) -> None:
    """The profiled process: one node, until no job is left unfinished."""
    node, _worker = app(dsn)
    t0 = time.perf_counter()
    await node.start()
    try:
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
            while True:
                await asyncio.sleep(0.05)
                cur = await conn.execute(
                    "SELECT (SELECT count(*) FROM koban_jobs WHERE state IN "
                    "('available', 'scheduled', 'retryable')) + (SELECT count(*) FROM koban_jobs "
                    "WHERE state = 'executing')"
                )
                row = await cur.fetchone()
                if row and row[0] == 0:
                    break
    finally:
        await node.stop()
        await node.close()
    print(f"node: {time.perf_counter() - t0:.2f} s", flush=True)


def frame_name(frame: str) -> str:
    """`func (path/file.py:12)` -> `func (file.py)`: lines merged, paths shortened."""
    name, _, where = frame.partition(" (")
    file = where.rsplit(":", 1)[0].rsplit("/", 1)[-1] if where else ""
    return f"{name} ({file})" if file else name


def summarize(collapsed: Path, jobs: int, seconds: float, command: str) -> str:
    stacks: list[tuple[list[str], int]] = []
    for line in collapsed.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if stack and count.isdigit():
            stacks.append((stack.split(";"), int(count)))
    total = sum(n for _, n in stacks) or 1
    buckets: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    own: collections.Counter[str] = collections.Counter()
    for frames, n in stacks:
        text = ";".join(frames)
        label = next(
            (lb for lb, needles in BUCKETS if any(x in text for x in needles)),
            "other (start-up imports, shutdown, …)",
        )
        buckets[label] += n
        frames = [f for f in frames if not f.startswith(("thread (", "process ("))] or frames
        for name in {frame_name(f) for f in frames}:
            inclusive[name] += n
        own[frame_name(frames[-1])] += n
    lines = [
        "# Where a koban node's time goes in the burn-down (py-spy, idle included)",
        "",
        f"`{command}`: {jobs:,} no-op jobs, one node, {SLOTS} slots; the node ran {seconds:.2f} s "
        f"({jobs / seconds:,.0f} jobs/s under the profiler, which slows it). {total:,} samples "
        "of every thread of the node's process, idle ones included.",
        "",
        "| share of samples | what |",
        "|---:|---|",
        *(f"| {100 * n / total:.1f}% | {label} |" for label, n in buckets.most_common()),
        "",
        "## Frames with the most samples, inclusive",
        "",
        *(f"- {100 * n / total:.1f}% `{name}`" for name, n in inclusive.most_common(40)),
        "",
        "## Frames with the most samples, self",
        "",
        *(f"- {100 * n / total:.1f}% `{name}`" for name, n in own.most_common(20)),
        "",
    ]
    return "\n".join(lines)


# ----- latency, split into its parts ------------------------------------------------------------
PROBE = "bench.latency_probe"


async def send(dsn: str, count: int, rate: float) -> None:
    """The inserting process: `count` jobs, one insert call each, at `rate` per second; prints
    (i, wall time before the call, wall time after it) for each as one JSON line."""
    client = koban.Koban(dsn)
    try:
        await client.aenqueue(koban.Job(worker=PROBE, args={"warm-up": True}))
        sent: list[tuple[int, float, float]] = []
        t0 = time.perf_counter()
        for i in range(count):
            await asyncio.sleep(max(0.0, t0 + i / rate - time.perf_counter()))
            before = time.time()
            await client.aenqueue(koban.Job(worker=PROBE, args={"i": i}))
            sent.append((i, before, time.time()))
    finally:
        await client.close()
    print(json.dumps(sent), flush=True)


LATENCY_PARTS = [
    "insert call (client)",
    "commit to notification at the node",
    "notification to fetch sent",
    "fetch (claim round trip)",
    "fetch returned to job start",
    "total: insert call to job start",
]


async def measure_latency(dsn: str, count: int, rate: float) -> dict[str, list[float]]:
    from koban.runtime.node import Node

    node = koban.Koban(dsn, queues={"default": 10}, shutdown_grace=5.0)
    starts: dict[int, float] = {}
    done = asyncio.Event()

    async def probe(job: koban.Job) -> None:
        if "i" in job.args:
            starts[int(job.args["i"])] = time.time()
            if len(starts) >= count:
                done.set()

    probe.__qualname__ = probe.__name__ = "latency_probe"
    probe.__module__ = "bench"
    node.worker(queue="default")(probe)
    await asyncio.to_thread(node.migrate)
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        await conn.execute("TRUNCATE koban_jobs, koban_nodes, koban_leader, koban_queues")

    notified: list[float] = []
    fetches: list[tuple[float, float, list[int]]] = []
    on_notification = Node._on_notification

    def record_notification(self: Node, channel: str, payload: dict[str, object]) -> None:
        notified.append(time.time())
        on_notification(self, channel, payload)

    Node._on_notification = record_notification
    claim = node.engine.claim

    async def record_claim(*args: object, **kwargs: object) -> Sequence[object]:
        sent = time.time()
        rows = await claim(*args, **kwargs)
        if rows:
            jobs = node.engine.claimed_jobs(rows)  # again, for the ids; the producer builds its own
            fetches.append((sent, time.time(), [int(j.args.get("i", -1)) for j in jobs]))
        return rows

    node.engine.claim = record_claim
    try:
        await node.start()
        await asyncio.sleep(1.0)  # connected and listening
        sender = await asyncio.create_subprocess_exec(
            sys.executable, __file__, "--send", "--database", dsn,
            "--latency-jobs", str(count), stdout=subprocess.PIPE,
        )  # fmt: skip
        out, _ = await sender.communicate()
        await asyncio.wait_for(done.wait(), 30)
    finally:
        Node._on_notification = on_notification
        await node.stop()
        await node.close()
    sent = {i: (before, after) for i, before, after in json.loads(out.decode().splitlines()[-1])}
    parts: dict[str, list[float]] = {name: [] for name in LATENCY_PARTS}
    for fetch_sent, fetched, ids in fetches:
        # The notification that woke this fetch: the last one before it was sent.
        k = bisect.bisect_right(notified, fetch_sent) - 1
        for i in ids:
            if i not in sent or i not in starts or k < 0 or notified[k] < sent[i][0]:
                continue
            before, after = sent[i]
            values = [
                after - before,
                notified[k] - after,
                fetch_sent - notified[k],
                fetched - fetch_sent,
                starts[i] - fetched,
                starts[i] - before,
            ]
            for name, value in zip(LATENCY_PARTS, values, strict=True):
                parts[name].append(value * 1000)
    return parts


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q / 100))] if ordered else float("nan")


def summarize_latency(parts: dict[str, list[float]], count: int, command: str) -> str:
    matched = len(parts[LATENCY_PARTS[-1]])
    return "\n".join(
        [
            "# koban's insert-to-start latency, part by part",
            "",
            f"`{command}`: {count:,} jobs inserted one at a time at 100 per second by a second "
            f"process; {matched:,} of them were started by a fetch that a notification woke "
            "(the rest, by a fetch already under way). Parts are measured per job, so they do "
            "not add up exactly to the total's percentiles. A negative commit-to-notification "
            "time means the notification reached the node before the insert call returned to "
            "its caller.",
            "",
            "| part | p50 ms | p95 ms |",
            "|---|---:|---:|",
            *(
                f"| {name} | {percentile(v, 50):.3f} | {percentile(v, 95):.3f} |"
                for name, v in parts.items()
            ),
            "",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--jobs", type=int, default=100_000)
    p.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    p.add_argument(
        "--database",
        default=os.environ.get(
            "BENCH_DATABASE_URL", "postgresql://root@127.0.0.1:5432/koban_bench"
        ),
    )
    p.add_argument("--out", default=str(BENCH / "results" / "profile"))
    p.add_argument("--latency-jobs", type=int, default=1000)
    p.add_argument("--only", choices=["burndown", "latency"], default=None)
    p.add_argument("--node", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--send", action="store_true", help=argparse.SUPPRESS)
    ns = p.parse_args(argv)
    if ns.node:
        asyncio.run(run_node(ns.database))
        return 0
    if ns.send:
        asyncio.run(send(ns.database, ns.latency_jobs, 100.0))
        return 0

    out = Path(ns.out)
    out.mkdir(parents=True, exist_ok=True)
    ensure_database(ns.database)
    command = " ".join(["bench/profile.py", *(argv if argv is not None else sys.argv[1:])])
    if ns.only in (None, "burndown"):
        code = profile_burndown(ns, out, command)
        if code:
            return code
    if ns.only in (None, "latency"):
        log(f"latency: {ns.latency_jobs:,} jobs at 100 per second")
        parts = asyncio.run(measure_latency(ns.database, ns.latency_jobs, 100.0))
        (out / "latency.md").write_text(summarize_latency(parts, ns.latency_jobs, command))
        log(f"wrote {out / 'latency.md'}")
    return 0


def profile_burndown(ns: argparse.Namespace, out: Path, command: str) -> int:
    assert "profile" in PEER_PACKAGES
    spy = ensure_env("profile", sys.executable).parent / "py-spy"
    log(f"enqueueing {ns.jobs:,} jobs")
    asyncio.run(prepare(ns.database, ns.jobs))
    collapsed = out / "burndown.collapsed"
    cmd = [
        str(spy), "record", "--idle", "--rate", str(ns.rate), "--format", "raw",
        "--output", str(collapsed), "--",
        sys.executable, __file__, "--node", "--database", ns.database,
    ]  # fmt: skip
    log("running the node under py-spy")
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout + proc.stderr)
        return proc.returncode
    reported = [ln for ln in proc.stdout.splitlines() if ln.startswith("node: ")]
    if reported:
        seconds = float(reported[-1].split()[1])
    (out / "burndown.md").write_text(summarize(collapsed, ns.jobs, seconds, command))
    log(f"wrote {collapsed} and {out / 'burndown.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
