"""The ceiling: what PostgreSQL itself does for the same work, with no job system around it.

- burn-down: koban's own fetch and complete statements, run by pgbench on koban's schema,
  batched as koban batches (each fetch claims as many jobs as one koban fetch at most claims,
  `MAX_FETCH`; each complete finishes the whole claimed batch in one statement);
- enqueue: `COPY` into koban_jobs (bulk) and one plain `INSERT` per statement (single);
- latency: a raw insert-plus-NOTIFY, received on a LISTEN connection, followed by one fetch
  of the row; also the bare NOTIFY round trip and the bare fetch, reported separately, and
  the same path with commits that do not wait for the WAL flush (`synchronous_commit = off`),
  to show what the two flushes cost.

Runs in the main virtualenv (psycopg) plus the `pgbench` program of the PostgreSQL client.
"""

from __future__ import annotations

import asyncio
import json
import math
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import psycopg
from psycopg.conninfo import conninfo_to_dict

PGBENCH_SCRIPT = """\
-- Claim a batch exactly as koban's fetch_jobs does, then complete it as complete_jobs does.
WITH picked AS (
    SELECT id FROM koban_jobs
    WHERE state = 'available' AND queue = 'default' AND attempt < max_attempts
    ORDER BY priority, scheduled_at, id
    LIMIT :limit
    FOR UPDATE SKIP LOCKED
), claimed AS (
    UPDATE koban_jobs AS j
    SET state = 'executing', attempt = j.attempt + 1, attempted_at = now(),
        attempted_by = ARRAY['pgbench', 'default.pgbench']
    FROM picked WHERE j.id = picked.id
    RETURNING j.*
)
SELECT count(*) AS n, coalesce(string_agg(id::text, ','), '0') AS ids,
       coalesce(string_agg(attempt::text, ','), '0') AS attempts
FROM claimed
\\gset
\\if :n > 0
UPDATE koban_jobs AS j
SET state = 'completed', completed_at = now()
FROM unnest(ARRAY[:ids]::bigint[], ARRAY[:attempts]::integer[]) AS x(id, attempt)
WHERE j.id = x.id AND j.state = 'executing' AND j.attempt = x.attempt;
\\endif
"""

WORKER = "bench.noop"


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    pos = (len(ordered) - 1) * q / 100.0
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def reset(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("TRUNCATE koban_jobs, koban_nodes, koban_leader, koban_queues")


def copy_jobs(dsn: str, count: int, batch: int) -> float:
    """COPY `count` no-op jobs into koban_jobs, `batch` rows per COPY; returns seconds."""
    t0 = time.perf_counter()
    with psycopg.connect(dsn, autocommit=True) as conn:
        for start in range(0, count, batch):
            with (
                conn.cursor() as cur,
                cur.copy("COPY koban_jobs (worker, args) FROM STDIN") as copy,
            ):
                for i in range(start, min(count, start + batch)):
                    copy.write_row((WORKER, json.dumps({"i": i})))
    return time.perf_counter() - t0


def insert_single(dsn: str, count: int) -> float:
    """One plain INSERT statement (its own transaction) per job; returns seconds."""
    t0 = time.perf_counter()
    with psycopg.connect(dsn, autocommit=True) as conn:
        for i in range(count):
            conn.execute(
                "INSERT INTO koban_jobs (worker, args) VALUES (%s, %s) RETURNING id",
                (WORKER, json.dumps({"i": i})),
            )
    return time.perf_counter() - t0


def burndown(dsn: str, count: int, limit: int, timeout: float = 600) -> dict[str, Any]:
    """pgbench claims and completes `count` jobs, `limit` per batch, on one connection."""
    pgbench = shutil.which("pgbench")
    if pgbench is None:
        raise RuntimeError("pgbench is not installed; install the PostgreSQL client tools")
    reset(dsn)
    copy_jobs(dsn, count, 10_000)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("ANALYZE koban_jobs")  # as every system's burn-down does
    params = conninfo_to_dict(dsn)
    batches = math.ceil(count / limit)
    with tempfile.TemporaryDirectory() as tmp:
        script = Path(tmp) / "claim_complete.sql"
        script.write_text(PGBENCH_SCRIPT)
        cmd = [
            pgbench,
            "-n",
            "-c",
            "1",
            "-t",
            str(batches),
            "-M",
            "simple",
            "-D",
            f"limit={limit}",
            "-f",
            str(script),
        ]
        for flag, key in (("-h", "host"), ("-p", "port"), ("-U", "user")):
            if params.get(key):
                cmd += [flag, str(params[key])]
        cmd.append(str(params.get("dbname", "")))
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"pgbench failed: {proc.stderr.strip() or proc.stdout.strip()}")
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute("SELECT count(*) FROM koban_jobs WHERE state = 'completed'").fetchone()
    done = int(row[0]) if row else 0
    if done != count:
        raise RuntimeError(f"pgbench completed {done} of {count} jobs")
    return {"jobs": count, "seconds": seconds, "jobs_per_s": count / seconds, "batch": limit}


def enqueue(dsn: str, count: int, mode: str, batch: int) -> dict[str, Any]:
    reset(dsn)
    seconds = copy_jobs(dsn, count, batch) if mode == "bulk" else insert_single(dsn, count)
    return {"jobs": count, "mode": mode, "seconds": seconds, "jobs_per_s": count / seconds}


FETCH_ONE = """
WITH picked AS (
    SELECT id FROM koban_jobs
    WHERE state = 'available' AND queue = 'default' AND attempt < max_attempts
    ORDER BY priority, scheduled_at, id LIMIT 100 FOR UPDATE SKIP LOCKED
)
UPDATE koban_jobs AS j SET state = 'executing', attempt = j.attempt + 1, attempted_at = now(),
    attempted_by = ARRAY['raw', 'default.raw']
FROM picked WHERE j.id = picked.id RETURNING j.*
"""

INSERT_NOTIFY = """
WITH inserted AS (
    INSERT INTO koban_jobs (worker, args) VALUES (%s, %s) RETURNING queue
)
SELECT pg_notify('bench_insert', queue) FROM inserted
"""


async def _latency(dsn: str, rate: float, count: int, flush: bool = True) -> dict[str, Any]:
    listener = await psycopg.AsyncConnection.connect(dsn, autocommit=True)
    sender = await psycopg.AsyncConnection.connect(dsn, autocommit=True)
    fetcher = await psycopg.AsyncConnection.connect(dsn, autocommit=True)
    await listener.execute("LISTEN bench_insert")
    if not flush:
        # Commits return before their WAL reaches the disk: what the same path costs without
        # the two flushes (the insert's and the claim's). Measured only to show their share.
        for conn in (sender, fetcher):
            await conn.execute("SET synchronous_commit = off")
    sent: dict[int, float] = {}
    started: list[float] = []
    notify_rtt: list[float] = []
    fetch_times: list[float] = []
    done = asyncio.Event()

    async def receive() -> None:
        async for _note in listener.notifies():
            t_note = time.perf_counter()
            rows = await (await fetcher.execute(FETCH_ONE)).fetchall()
            t_fetched = time.perf_counter()
            fetch_times.append(t_fetched - t_note)
            for row in rows:
                i = row[4]["i"]  # args
                started.append(t_fetched - sent[i])
                notify_rtt.append(t_note - sent[i])
            if len(started) >= count:
                done.set()
                return

    receiver = asyncio.create_task(receive())
    t0 = time.perf_counter()
    for i in range(count):
        delay = t0 + i / rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        sent[i] = time.perf_counter()
        await sender.execute(INSERT_NOTIFY, (WORKER, json.dumps({"i": i})))
    try:
        await asyncio.wait_for(done.wait(), 30)
    finally:
        receiver.cancel()
        await asyncio.gather(receiver, return_exceptions=True)
        for conn in (listener, sender, fetcher):
            await conn.close()
    ms = [x * 1000 for x in started]
    return {
        "jobs": count,
        "rate": rate,
        "p50_ms": _percentile(ms, 50),
        "p95_ms": _percentile(ms, 95),
        "p99_ms": _percentile(ms, 99),
        "max_ms": max(ms),
        "notify_p50_ms": _percentile([x * 1000 for x in notify_rtt], 50),
        "fetch_p50_ms": _percentile([x * 1000 for x in fetch_times], 50),
    }


def latency(dsn: str, rate: float, seconds: float) -> dict[str, Any]:
    """Insert-to-claim latency of raw SQL: INSERT+NOTIFY, LISTEN, then one fetch; then, for a
    third as long, the same with `synchronous_commit = off` (`unflushed_p50_ms`)."""
    reset(dsn)
    out = asyncio.run(_latency(dsn, rate, max(1, int(rate * seconds))))
    reset(dsn)
    unflushed = asyncio.run(_latency(dsn, rate, max(1, int(rate * seconds / 3)), flush=False))
    out["unflushed_p50_ms"] = unflushed["p50_ms"]
    return out
