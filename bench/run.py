"""koban's benchmark: koban beside its peers and beside the database's own limit, one command.

    .venv/bin/python bench/run.py [--quick] [--rounds N] [--jobs N] [--only koban,pgqueuer,...]
    .venv/bin/python bench/run.py --only koban --workloads '' --cpu   # threads vs processes

Each peer runs from its own virtualenv under bench/.envs/ (created here from PyPI on first
use); each system gets its own database on the same PostgreSQL server. Rounds are
interleaved (every system runs once per round, in a rotating order) and koban's ratio to
each peer is taken within a round, then the median over rounds is reported. Results go to
bench/results/ (bench/results/tmp/ for --quick): results.json, results.md, chart.png.

See bench/README.md for the workloads, each system's configuration and how to read the table.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
SYSTEMS_DIR = BENCH / "systems"
ENVS = BENCH / ".envs"
LOGS = BENCH / "results" / "tmp" / "logs"

sys.path.insert(0, str(BENCH))

import ceiling  # noqa: E402
import psycopg  # noqa: E402
from psycopg.conninfo import conninfo_to_dict, make_conninfo  # noqa: E402

from koban.runtime.producer import MAX_FETCH  # noqa: E402

# Pinned so a re-run measures the same peers; bump deliberately and say so in the README.
PEER_PACKAGES: dict[str, list[str]] = {
    "procrastinate": ["procrastinate==3.10.0", "psycopg[binary]>=3.2"],
    "pgqueuer": ["pgqueuer==1.6.0", "asyncpg==0.32.0"],
    "oban": ["oban==0.7.0"],
    "celery": ["celery[redis]==5.7.0", "hiredis==3.5.0"],
    "report": ["matplotlib==3.11.2"],
    # Not a peer: the sampling profiler that bench/profile.py runs the node under.
    "profile": ["py-spy==0.4.3"],
}
#: The peers that need a newer Python than koban's virtualenv.
NEEDS_PY312 = {"oban"}
PEERS = ["procrastinate", "pgqueuer", "oban", "celery"]
#: Every system the table can show; "ceiling" is raw SQL by pgbench, COPY and LISTEN/NOTIFY.
ALL_SYSTEMS = ["koban", "koban-sync", "koban-sqlite", *PEERS, "ceiling"]


# ----- environments -------------------------------------------------------------------------
def find_python312(explicit: str | None) -> str | None:
    """An interpreter of Python 3.12 or newer: --python312, $BENCH_PYTHON312, PATH, pyenv."""
    candidates: list[str] = []
    if explicit:
        candidates.append(explicit)
    if os.environ.get("BENCH_PYTHON312"):
        candidates.append(os.environ["BENCH_PYTHON312"])
    if sys.version_info >= (3, 12):
        candidates.append(sys.executable)
    for name in ("python3.13", "python3.12", "python3.14"):
        found = shutil.which(name)
        if found:
            candidates.append(found)
    pyenv_root = os.environ.get("PYENV_ROOT") or os.path.expanduser("~/.pyenv")
    versions = sorted(
        glob.glob(os.path.join(pyenv_root, "versions", "3.1[2-9]*", "bin", "python")), reverse=True
    )
    candidates += versions
    for candidate in candidates:
        try:
            out = subprocess.run(
                [candidate, "-c", "import sys; print(sys.version_info >= (3, 12))"],
                capture_output=True,
                text=True,
                timeout=20,
            )
        except (OSError, subprocess.TimeoutExpired):
            continue
        if out.stdout.strip() == "True":
            return candidate
    return None


def ensure_env(name: str, python: str) -> Path:
    """bench/.envs/NAME with the pinned packages installed; returns its interpreter."""
    env = ENVS / name
    interpreter = env / "bin" / "python"
    wanted = "\n".join(PEER_PACKAGES[name])
    stamp = env / ".bench-installed"
    if interpreter.exists() and stamp.exists() and stamp.read_text() == wanted:
        return interpreter
    log(f"setting up bench/.envs/{name} ({', '.join(PEER_PACKAGES[name])})")
    if not interpreter.exists():
        subprocess.run([python, "-m", "venv", str(env)], check=True)
    subprocess.run(
        [
            str(interpreter),
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            *PEER_PACKAGES[name],
        ],
        check=True,
    )
    stamp.write_text(wanted)
    return interpreter


def package_versions(interpreter: Path | str, names: list[str]) -> dict[str, str]:
    code = (
        "import importlib.metadata as m, json, sys\n"
        "out = {}\n"
        f"for n in {names!r}:\n"
        "    try: out[n] = m.version(n)\n"
        "    except m.PackageNotFoundError: pass\n"
        "print(json.dumps(out))"
    )
    out = subprocess.run([str(interpreter), "-c", code], capture_output=True, text=True)
    try:
        return json.loads(out.stdout)
    except ValueError:
        return {}


# ----- databases ----------------------------------------------------------------------------
def database_url(base: str, name: str) -> str:
    return make_conninfo(base, dbname=name) if "://" not in base else _replace_db(base, name)


def _replace_db(url: str, name: str) -> str:
    head, _, tail = url.rpartition("/")
    query = ""
    if "?" in tail:
        query = "?" + tail.split("?", 1)[1]
    return f"{head}/{name}{query}"


def ensure_database(url: str) -> None:
    params = conninfo_to_dict(url)
    admin = make_conninfo(url, dbname="postgres")
    with psycopg.connect(admin, autocommit=True) as conn:
        exists = conn.execute(
            "SELECT 1 FROM pg_database WHERE datname = %s", (params["dbname"],)
        ).fetchone()
        if not exists:
            conn.execute(f'CREATE DATABASE "{params["dbname"]}"')


def redis_up(host: str = "127.0.0.1", port: int = 6379) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False


# ----- machine ------------------------------------------------------------------------------
def machine(pg_url: str) -> dict[str, Any]:
    info: dict[str, Any] = {
        "cores": os.cpu_count(),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
    }
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                info["memory_gib"] = round(int(line.split()[1]) / 2**20, 1)
    with psycopg.connect(pg_url, autocommit=True) as conn:
        info["postgresql"] = conn.execute("SHOW server_version").fetchone()[0]  # type: ignore[index]
        settings = {}
        for name in (
            "shared_buffers",
            "synchronous_commit",
            "fsync",
            "max_connections",
            "work_mem",
        ):
            settings[name] = conn.execute(f"SHOW {name}").fetchone()[0]  # type: ignore[index]
        info["postgresql_settings"] = settings
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        )
        info["koban_commit"] = commit.stdout.strip()
    with contextlib.suppress(OSError, ValueError):
        info["load_average_at_start"] = [round(x, 2) for x in os.getloadavg()]
    return info


# ----- running one measurement --------------------------------------------------------------
def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


@dataclass
class Target:
    """One system as the harness runs it: interpreter, driver script, database, options."""

    name: str
    python: str
    driver: Path
    dsn: str
    options: list[str] = field(default_factory=list)

    def run(self, workload: str, *args: str, timeout: float = 1800) -> dict[str, Any]:
        cmd = [self.python, str(self.driver), workload, "--dsn", self.dsn, *args]
        for opt in self.options:
            cmd += ["--option", opt]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
        lines = [ln for ln in proc.stdout.strip().splitlines() if ln.startswith("{")]
        if proc.returncode != 0 or not lines:
            LOGS.mkdir(parents=True, exist_ok=True)
            saved = LOGS / f"{self.name}-{workload}-{time.strftime('%Y%m%dT%H%M%S')}.log"
            saved.write_text(
                f"$ {' '.join(cmd)}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}\n"
            )
            tail = "\n".join(
                (proc.stderr.strip() + "\n" + proc.stdout.strip()).strip().splitlines()[-15:]
            )
            raise RuntimeError(
                f"{self.name} {workload} failed (exit {proc.returncode}); "
                f"full output in {saved}:\n{tail}"
            )
        return json.loads(lines[-1])


class XminHolder:
    """Holds one REPEATABLE READ snapshot open (pinning the xmin horizon) from `start` s for
    `hold` s, in a thread, so vacuum cannot remove the dead rows a run leaves behind."""

    def __init__(self, dsn: str, start: float, hold: float) -> None:
        self.dsn, self.start, self.hold = dsn, start, hold
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.held: tuple[float, float] | None = None

    def _run(self) -> None:
        time.sleep(self.start)
        with psycopg.connect(self.dsn) as conn:
            conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
            conn.execute("SELECT count(*) FROM koban_jobs")  # takes the snapshot
            began = time.time()
            time.sleep(self.hold)
            conn.rollback()
            self.held = (began, time.time())


# ----- the benchmark ------------------------------------------------------------------------
def median(values: list[float]) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="small counts and 1 round; results to bench/results/tmp/",
    )
    p.add_argument(
        "--rounds", type=int, default=None, help="interleaved rounds (default 3, --quick 1)"
    )
    p.add_argument(
        "--jobs", type=int, default=None, help="burn-down jobs (default 50000, --quick 5000)"
    )
    p.add_argument(
        "--only", default=None, help=f"comma-separated systems from: {','.join(ALL_SYSTEMS)}"
    )
    p.add_argument(
        "--workloads", default="burndown,latency,enqueue", help="burndown,latency,enqueue"
    )
    p.add_argument(
        "--burndown-cap",
        type=float,
        default=120.0,
        help="seconds a burn-down may take; a slower system is reported with the rate it reached",
    )
    p.add_argument(
        "--slots",
        type=int,
        default=900,
        help="koban's queue slots; the ceiling's batch is the most one koban fetch claims (300)",
    )
    p.add_argument("--rate", type=float, default=100.0, help="steady-state inserts per second")
    p.add_argument(
        "--latency-seconds", type=float, default=None, help="steady-state duration (default 15)"
    )
    p.add_argument("--enqueue-jobs", type=int, default=None, help="jobs for the enqueue workload")
    p.add_argument(
        "--history", action="store_true", help="(d): koban burn-down over 1,000,000 completed jobs"
    )
    p.add_argument("--history-rows", type=int, default=1_000_000)
    p.add_argument(
        "--xmin", action="store_true", help="(e): hold the xmin horizon 60 s during a koban run"
    )
    p.add_argument("--xmin-hold", type=float, default=60.0)
    p.add_argument(
        "--memory", action="store_true", help="koban's memory across a 1,000,000-job burn-down"
    )
    p.add_argument("--memory-jobs", type=int, default=1_000_000)
    p.add_argument(
        "--cpu",
        action="store_true",
        help="CPU-bound jobs: koban's thread pool vs its process pool, once per round",
    )
    p.add_argument("--cpu-jobs", type=int, default=200, help="jobs for --cpu (each ~20 ms of CPU)")
    p.add_argument(
        "--database",
        default=os.environ.get(
            "BENCH_DATABASE_URL", "postgresql://root@127.0.0.1:5432/koban_bench"
        ),
        help="koban's benchmark database; peers get NAME_<peer> beside it",
    )
    p.add_argument(
        "--python312",
        default=None,
        help="a Python >= 3.12 for oban (default: found on PATH or pyenv)",
    )
    p.add_argument("--out", default=None, help="results directory")
    ns = p.parse_args(argv)

    rounds = ns.rounds or (1 if ns.quick else 3)
    jobs = ns.jobs or (5_000 if ns.quick else 50_000)
    enqueue_jobs = ns.enqueue_jobs or (2_000 if ns.quick else 10_000)
    single_jobs = max(500, enqueue_jobs // 5)
    latency_seconds = ns.latency_seconds or (5.0 if ns.quick else 15.0)
    workloads = [w.strip() for w in ns.workloads.split(",") if w.strip()]
    out_dir = Path(ns.out) if ns.out else BENCH / "results" / ("tmp" if ns.quick else "")
    out_dir.mkdir(parents=True, exist_ok=True)
    wanted = [s.strip() for s in (ns.only or ",".join(ALL_SYSTEMS)).split(",") if s.strip()]
    unknown = [s for s in wanted if s not in ALL_SYSTEMS]
    if unknown:
        p.error(f"unknown system(s) {', '.join(unknown)}; choose from {', '.join(ALL_SYSTEMS)}")

    base_db = conninfo_to_dict(ns.database)["dbname"]
    koban_dsn = ns.database
    ensure_database(koban_dsn)
    from koban.engines.base import create_engine

    create_engine(koban_dsn).migrate()

    notes: list[str] = []
    targets: dict[str, Target] = {}
    versions: dict[str, dict[str, str]] = {
        "koban": package_versions(sys.executable, ["koban", "psycopg", "psycopg-pool"])
    }
    koban_driver = SYSTEMS_DIR / "koban_driver.py"
    slots = f"slots={ns.slots}"
    if "koban" in wanted:
        targets["koban"] = Target("koban", sys.executable, koban_driver, koban_dsn, [slots])
    if "koban-sync" in wanted:
        targets["koban-sync"] = Target(
            "koban-sync", sys.executable, koban_driver, koban_dsn, [slots, "sync=1"]
        )
    sqlite_dir = Path(tempfile.mkdtemp(prefix="koban-bench-"))
    if "koban-sqlite" in wanted:
        try:
            import koban.engines.sqlite  # noqa: F401

            targets["koban-sqlite"] = Target(
                "koban-sqlite",
                sys.executable,
                koban_driver,
                f"sqlite:///{sqlite_dir / 'bench.db'}",
                [slots],
            )
        except ImportError:
            notes.append("koban-sqlite skipped: this checkout has no SQLite engine yet")
    for peer in PEERS:
        if peer not in wanted:
            continue
        python: str | None = sys.executable
        if peer in NEEDS_PY312 and sys.version_info < (3, 12):
            python = find_python312(ns.python312)
            if python is None:
                notes.append(f"{peer} skipped: it needs Python >= 3.12; pass --python312 PATH")
                continue
        if peer == "celery" and not redis_up():
            notes.append("celery skipped: no Redis answering at 127.0.0.1:6379")
            continue
        try:
            interpreter = ensure_env(peer, python or sys.executable)
        except subprocess.CalledProcessError as exc:
            notes.append(f"{peer} skipped: installing its environment failed ({exc})")
            continue
        dsn = database_url(koban_dsn, f"{base_db}_{peer}")
        if peer != "celery":
            ensure_database(dsn)
        targets[peer] = Target(peer, str(interpreter), SYSTEMS_DIR / f"{peer}_driver.py", dsn)
        versions[peer] = package_versions(
            interpreter,
            [peer if peer != "celery" else "celery", "psycopg", "asyncpg", "redis", "kombu"],
        )
    for note in notes:
        log(note)

    results: dict[str, Any] = {
        "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": " ".join(["bench/run.py", *(argv if argv is not None else sys.argv[1:])]),
        "machine": machine(koban_dsn),
        "versions": versions,
        "config": {
            "rounds": rounds,
            "burndown_jobs": jobs,
            "koban_slots": ns.slots,
            "ceiling_batch": min(ns.slots, MAX_FETCH),
            "latency_rate": ns.rate,
            "latency_seconds": latency_seconds,
            "enqueue_bulk_jobs": enqueue_jobs,
            "enqueue_single_jobs": single_jobs,
            "bulk_batch": 5000,
        },
        "notes": notes,
        "rounds": [],
    }
    order = [s for s in ALL_SYSTEMS if s in targets or (s == "ceiling" and "ceiling" in wanted)]

    def measure(system: str, workload: str) -> dict[str, Any] | None:
        if system == "koban-sync" and workload != "burndown":
            return None  # the sync worker only matters for throughput
        t0 = time.perf_counter()
        try:
            if system == "ceiling":
                if workload == "burndown":
                    # Batched as koban batches: one fetch claims at most MAX_FETCH jobs.
                    r = ceiling.burndown(koban_dsn, jobs, min(ns.slots, MAX_FETCH))
                elif workload == "latency":
                    r = ceiling.latency(koban_dsn, ns.rate, latency_seconds)
                elif workload == "enqueue_bulk":
                    r = ceiling.enqueue(koban_dsn, enqueue_jobs, "bulk", 5000)
                else:
                    r = ceiling.enqueue(koban_dsn, single_jobs, "single", 1)
            else:
                target = targets[system]
                if workload == "burndown":
                    cap = str(ns.burndown_cap)
                    r = target.run("burndown", "--jobs", str(jobs), "--timeout", cap)
                elif workload == "latency":
                    r = target.run(
                        "latency", "--rate", str(ns.rate), "--seconds", str(latency_seconds)
                    )
                    r.pop("timeline", None)
                elif workload == "enqueue_bulk":
                    r = target.run(
                        "enqueue", "--mode", "bulk", "--jobs", str(enqueue_jobs), "--batch", "5000"
                    )
                else:
                    r = target.run("enqueue", "--mode", "single", "--jobs", str(single_jobs))
        except Exception as exc:
            log(f"{system} {workload}: FAILED: {exc}")
            return {"error": str(exc)}
        r.pop("rss_mb", None)
        summary = ", ".join(
            f"{k}={v:.1f}"
            for k, v in r.items()
            if isinstance(v, float) and k.endswith(("_per_s", "_ms"))
        )
        log(f"{system} {workload}: {summary} ({time.perf_counter() - t0:.0f} s)")
        return r

    expanded: list[str] = []
    for w in workloads:
        expanded += ["enqueue_bulk", "enqueue_single"] if w == "enqueue" else [w]
    for rnd in range(rounds):
        this_round: dict[str, dict[str, Any]] = {}
        shift = rnd % max(1, len(order))
        rotated = order[shift:] + order[:shift]
        log(f"round {rnd + 1}/{rounds}: {', '.join(rotated)}")
        for workload in expanded:
            for system in rotated:
                r = measure(system, workload)
                if r is not None:
                    this_round.setdefault(workload, {})[system] = r
        results["rounds"].append(this_round)

    if ns.history and "koban" in targets:
        results["history"] = run_history(targets["koban"], koban_dsn, jobs, ns.history_rows, rounds)
    if ns.xmin and "koban" in targets:
        results["xmin"] = run_xmin(targets["koban"], koban_dsn, ns.rate * 2.5, ns.xmin_hold)
    if ns.cpu and "koban" in targets:
        results["cpu"] = run_cpu(targets["koban"], ns.cpu_jobs, rounds)
    if ns.memory and "koban" in targets:
        log(f"memory: koban burn-down of {ns.memory_jobs:,} jobs")
        r = targets["koban"].run(
            "burndown", "--jobs", str(ns.memory_jobs), "--batch", "10000", timeout=7200
        )
        results["memory"] = summarize_memory(r)
    shutil.rmtree(sqlite_dir, ignore_errors=True)

    results["summary"] = summarize(results)
    results["finished_at"] = datetime.now(UTC).isoformat(timespec="seconds")
    json_path = out_dir / "results.json"
    json_path.write_text(json.dumps(results, indent=2, default=str) + "\n")
    import report

    (out_dir / "results.md").write_text(report.markdown(results))
    shown = json_path.relative_to(ROOT) if json_path.is_relative_to(ROOT) else json_path
    if any(results["rounds"]):
        chart = draw_chart(json_path, out_dir / "chart.png")
        drawn = ", chart.png" if chart else " (no chart: matplotlib environment unavailable)"
    else:
        drawn = " (no chart: no burn-down, latency or enqueue workload ran)"
    log(f"wrote {shown}, results.md{drawn}")
    print((out_dir / "results.md").read_text())
    return 0


def run_history(target: Target, dsn: str, jobs: int, rows: int, rounds: int) -> dict[str, Any]:
    """Burn-down on an empty table and over `rows` completed jobs, interleaved."""
    empty: list[float] = []
    full: list[float] = []
    for rnd in range(rounds):
        log(f"history round {rnd + 1}/{rounds}: empty table")
        empty.append(target.run("burndown", "--jobs", str(jobs))["jobs_per_s"])
        log(f"history round {rnd + 1}/{rounds}: seeding {rows:,} completed jobs")
        r = target.run("burndown", "--jobs", str(jobs), "--option", f"history={rows}", timeout=3600)
        full.append(r["jobs_per_s"])
        log(f"history: empty {empty[-1]:.0f} jobs/s, with history {full[-1]:.0f} jobs/s")
    ratios = [f / e for f, e in zip(full, empty, strict=True)]
    return {
        "history_rows": rows,
        "jobs": jobs,
        "empty_jobs_per_s": empty,
        "history_jobs_per_s": full,
        "ratio": median(ratios),
    }


def run_cpu(target: Target, jobs: int, rounds: int) -> dict[str, Any]:
    """CPU-bound jobs burned down by sync workers in threads, then in worker processes."""
    runs = []
    for rnd in range(rounds):
        log(f"cpu round {rnd + 1}/{rounds}: {jobs} CPU-bound jobs, threads then processes")
        r = target.run("cpu", "--jobs", str(jobs))
        runs.append(r)
        log(
            f"cpu: threads {r['thread_jobs_per_s']:.1f} jobs/s, processes "
            f"{r['process_jobs_per_s']:.1f} jobs/s ({r['processes']} processes): "
            f"{r['process_vs_thread']:.2f}x"
        )
    return {
        "jobs": jobs,
        "processes": runs[0]["processes"],
        "slots": runs[0]["slots"],
        "job_ms": median([r["job_ms"] for r in runs]),
        "thread_jobs_per_s": [r["thread_jobs_per_s"] for r in runs],
        "process_jobs_per_s": [r["process_jobs_per_s"] for r in runs],
        "ratio": median([r["process_vs_thread"] for r in runs]),
    }


def run_xmin(target: Target, dsn: str, rate: float, hold: float) -> dict[str, Any]:
    """Steady inserts at `rate`/s; a snapshot pins xmin from 15 s for `hold` s; 30 s after."""
    before, after = 15.0, 30.0
    seconds = before + hold + after
    log(
        f"xmin: {seconds:.0f} s at {rate:.0f} jobs/s, "
        f"xmin held from {before:.0f} s for {hold:.0f} s"
    )
    holder = XminHolder(dsn, start=before + 1.0, hold=hold)  # +1: the driver's start-up second
    holder.thread.start()
    r = target.run("latency", "--rate", str(rate), "--seconds", str(seconds), timeout=seconds + 600)
    holder.thread.join(timeout=hold + 60)
    timeline = r.pop("timeline")
    start = r["sent_wall_start"]
    phases: dict[str, list[list[float]]] = {"before": [], "during": [], "after": []}
    if holder.held:
        began, ended = holder.held[0] - start, holder.held[1] - start
    else:
        began, ended = before, before + hold
    for sec, count, p50, p99 in timeline:
        phase = "before" if sec < began else "during" if sec < ended else "after"
        phases[phase].append([sec, count, p50, p99])

    def phase_summary(rows: list[list[float]]) -> dict[str, Any]:
        return {
            "seconds": len(rows),
            "p50_ms": median([row[2] for row in rows]),
            "p99_ms": median([row[3] for row in rows]),
            "worst_p99_ms": max((row[3] for row in rows), default=None),
        }

    last_30 = [row for row in phases["during"] if row[0] >= ended - 10]
    recovered = [row for row in phases["after"] if row[0] >= ended + 10]
    return {
        "rate": rate,
        "hold_s": hold,
        "held_from_s": round(began, 1),
        "held_to_s": round(ended, 1),
        "overall": {k: v for k, v in r.items() if k.endswith("_ms")},
        "before": phase_summary(phases["before"]),
        "during": phase_summary(phases["during"]),
        "during_last_10s": phase_summary(last_30),
        "after": phase_summary(phases["after"]),
        "after_from_10s": phase_summary(recovered),
        "timeline": timeline,
    }


def summarize_memory(r: dict[str, Any]) -> dict[str, Any]:
    samples = r.get("rss_mb", [])
    warm = [s for s in samples if s[1] >= r["jobs"] * 0.05] or samples
    values = [s[2] for s in warm]
    return {
        "jobs": r["jobs"],
        "jobs_per_s": r["jobs_per_s"],
        "rss_after_5pct_mb": values[0] if values else None,
        "rss_min_mb": min(values) if values else None,
        "rss_max_mb": max(values) if values else None,
        "rss_end_mb": values[-1] if values else None,
        "spread_pct": (max(values) - min(values)) / min(values) * 100 if values else None,
        "samples": samples,
    }


# ----- summary ------------------------------------------------------------------------------
METRICS = {
    "burndown": ("jobs_per_s", True),
    "latency": ("p50_ms", False),
    "enqueue_bulk": ("jobs_per_s", True),
    "enqueue_single": ("jobs_per_s", True),
}


def summarize(results: dict[str, Any]) -> dict[str, Any]:
    """Medians per system and workload, and koban's same-round ratios to every other row."""
    rounds = results["rounds"]
    out: dict[str, Any] = {}
    workloads = sorted({w for r in rounds for w in r}, key=list(METRICS).index)
    for workload in workloads:
        systems = sorted({s for r in rounds for s in r.get(workload, {})}, key=ALL_SYSTEMS.index)
        table: dict[str, Any] = {}
        for system in systems:
            runs = [r[workload][system] for r in rounds if system in r.get(workload, {})]
            good = [x for x in runs if "error" not in x]
            keys = sorted(
                {
                    k
                    for x in good
                    for k, v in x.items()
                    if isinstance(v, int | float) and not isinstance(v, bool)
                }
            )
            row: dict[str, Any] = {k: median([x[k] for x in good if k in x]) for k in keys}
            row["rounds"] = len(good)
            row["timed_out_rounds"] = sum(1 for x in good if x.get("timed_out"))
            if len(good) < len(runs):
                row["errors"] = [x["error"].splitlines()[0] for x in runs if "error" in x]
            table[system] = row
        metric, higher_better = METRICS[workload]
        ratios: dict[str, Any] = {}
        for other in systems:
            if other == "koban":
                continue
            per_round = []
            for r in rounds:
                k = r.get(workload, {}).get("koban", {})
                o = r.get(workload, {}).get(other, {})
                if metric in k and metric in o and o[metric] and k[metric]:
                    per_round.append(
                        k[metric] / o[metric] if higher_better else o[metric] / k[metric]
                    )
            if per_round:
                ratios[other] = median(per_round)
        out[workload] = {
            "metric": metric,
            "higher_is_better": higher_better,
            "systems": table,
            "koban_ratio": ratios,
        }
    out["targets"] = targets(results, out)
    return out


def targets(results: dict[str, Any], s: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets, each with the measured figure and whether it holds."""
    rows: list[dict[str, Any]] = []

    def add(name: str, measured: float | None, goal: float, unit: str = "x") -> None:
        rows.append(
            {
                "target": name,
                "measured": measured,
                "goal": goal,
                "unit": unit,
                "holds": None if measured is None else measured >= goal,
            }
        )

    bd = s.get("burndown", {})
    peers = [p for p in PEERS if p in bd.get("koban_ratio", {})]
    if peers:
        fastest = max(peers, key=lambda p: bd["systems"][p].get("jobs_per_s") or 0)
        add(f"burn-down vs fastest peer ({fastest})", bd["koban_ratio"][fastest], 2.0)
    if "ceiling" in bd.get("koban_ratio", {}):
        add("burn-down vs raw-SQL ceiling (pgbench)", bd["koban_ratio"]["ceiling"], 0.5)
    if "koban-sync" in bd.get("koban_ratio", {}):
        # koban_ratio is koban / sync; the target is sync / async.
        r = bd["koban_ratio"]["koban-sync"]
        add("sync (thread-pool) jobs vs async jobs", 1 / r if r else None, 0.8)
    lat = s.get("latency", {})
    lpeers = [p for p in PEERS if p in lat.get("koban_ratio", {})]
    if lpeers:
        best = min(lpeers, key=lambda p: lat["systems"][p].get("p50_ms") or float("inf"))
        add(f"latency p50: best peer's ({best}) / koban's", lat["koban_ratio"][best], 2.0)
    if "ceiling" in lat.get("systems", {}) and "koban" in lat.get("systems", {}):
        c = lat["systems"]["ceiling"]
        k = lat["systems"]["koban"]
        if c.get("p50_ms") and k.get("p50_ms"):
            add(
                "latency p50: 3x (NOTIFY round trip + one fetch) / koban's",
                3 * c["p50_ms"] / k["p50_ms"],
                1.0,
            )
    bulk = s.get("enqueue_bulk", {})
    if "ceiling" in bulk.get("koban_ratio", {}):
        add("bulk enqueue vs raw COPY", bulk["koban_ratio"]["ceiling"], 0.5)
    if "history" in results:
        rows_kept = results["history"]["history_rows"]
        add(
            f"burn-down with {rows_kept:,} completed jobs vs empty table",
            results["history"]["ratio"],
            0.8,
        )
    if "memory" in results and results["memory"].get("spread_pct") is not None:
        spread = results["memory"]["spread_pct"]
        rows.append(
            {
                "target": "node memory spread across the run (RSS, after warm-up)",
                "measured": spread,
                "goal": 10.0,
                "unit": "%",
                "holds": spread <= 10.0,
            }
        )
    return rows


def draw_chart(json_path: Path, png_path: Path) -> bool:
    """Draw the PNG with matplotlib from the bench's own `report` environment."""
    try:
        interpreter = ensure_env("report", sys.executable)
    except (subprocess.CalledProcessError, OSError) as exc:
        log(f"chart skipped: {exc}")
        return False
    proc = subprocess.run(
        [str(interpreter), str(BENCH / "report.py"), str(json_path), str(png_path)],
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        log(f"chart failed: {proc.stderr.strip()[-500:]}")
        return False
    return True


if __name__ == "__main__":
    sys.exit(main())
