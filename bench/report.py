# ruff: noqa: E501  (markdown lines read better unbroken)
"""The benchmark's report: a markdown table (standard library) and a PNG chart (matplotlib).

`markdown(results)` is imported by run.py. Run as a script with the bench's `report`
environment to draw the chart:  python report.py results.json chart.png
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

X = "\u00d7"  # the multiplication sign of ratios
LABELS = {
    "burndown": "Burn-down (no-op jobs/s, one node)",
    "latency": "Insert-to-start latency (ms)",
    "enqueue_bulk": "Bulk enqueue (jobs/s)",
    "enqueue_single": "Single enqueue (jobs/s, one insert per call)",
}


def _fmt(value: Any, digits: int = 0) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return str(value)


def _ratio(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}{X}"


def markdown(results: dict[str, Any]) -> str:
    m = results["machine"]
    c = results["config"]
    s = results["summary"]
    lines = [
        "# koban benchmark results",
        "",
        f"`{results['command']}` — started {results['started_at']}, finished {results.get('finished_at', '?')}",
        "",
        f"Machine: {m.get('cores')} cores ({m.get('cpu', '?')}), {m.get('memory_gib', '?')} GiB memory, "
        f"PostgreSQL {m.get('postgresql')}, Python {m.get('python')}, {m.get('platform')}; "
        f"load average at start {m.get('load_average_at_start')}; koban {m.get('koban_commit', '?')}.",
        f"PostgreSQL settings: {', '.join(f'{k}={v}' for k, v in m.get('postgresql_settings', {}).items())}.",
        "",
        f"Medians of {c['rounds']} interleaved round(s). Ratios are koban's, taken within each round "
        f"and then the median: above 1{X} koban is better (faster, or lower latency).",
        "",
    ]
    for workload, label in LABELS.items():
        if workload not in s:
            continue
        w = s[workload]
        lines += [f"## {label}", ""]
        if workload == "latency":
            lines += [
                f"{c['latency_rate']:.0f} jobs/s inserted one at a time for {c['latency_seconds']:.0f} s "
                "from a separate process; time from just before the insert call to the job starting.",
                "",
                "| system | p50 ms | p95 ms | p99 ms | max ms | koban's ratio (p50) |",
                "|---|---:|---:|---:|---:|---:|",
            ]
            for system, row in w["systems"].items():
                lines.append(
                    f"| {system} | {_fmt(row.get('p50_ms'), 1)} | {_fmt(row.get('p95_ms'), 1)} | "
                    f"{_fmt(row.get('p99_ms'), 1)} | {_fmt(row.get('max_ms'), 1)} | "
                    f"{_ratio(w['koban_ratio'].get(system)) if system != 'koban' else ''} |"
                )
            ceil = w["systems"].get("ceiling")
            if ceil:
                lines += [
                    "",
                    f"Ceiling: raw INSERT+NOTIFY, LISTEN, one fetch. Its parts: NOTIFY round trip p50 "
                    f"{_fmt(ceil.get('notify_p50_ms'), 2)} ms, one fetch p50 {_fmt(ceil.get('fetch_p50_ms'), 2)} ms.",
                ]
                if ceil.get("unflushed_p50_ms") is not None:
                    lines[-1] += (
                        " The same path with commits that do not wait for the WAL flush "
                        "(`synchronous_commit = off`, which koban does not use): p50 "
                        f"{_fmt(ceil.get('unflushed_p50_ms'), 2)} ms; the difference is the "
                        "insert's and the claim's flushes to disk."
                    )
        else:
            count = {"burndown": c["burndown_jobs"], "enqueue_bulk": c["enqueue_bulk_jobs"],
                     "enqueue_single": c["enqueue_single_jobs"]}[workload]  # fmt: skip
            per_run = f"{count:,} jobs per run."
            if workload == "burndown" and c.get("koban_slots") is not None:
                per_run += (
                    f" koban: one queue of {c['koban_slots']} slots;"
                    f" the ceiling claims {c.get('ceiling_batch', c['koban_slots'])} per batch."
                )
            lines += [
                per_run,
                "",
                "| system | jobs/s | seconds | koban's ratio |",
                "|---|---:|---:|---:|",
            ]
            capped = []
            for system, row in w["systems"].items():
                mark = ""
                if row.get("timed_out_rounds"):
                    mark = " *"
                    capped.append(
                        f"\\* {system} did not finish within the cap in {row['timed_out_rounds']} of "
                        f"{row['rounds']} round(s) (median {_fmt(row.get('started'))} jobs started in "
                        f"{_fmt(row.get('seconds'))} s): its figure is the rate reached before the cap, "
                        "an upper bound on its burn-down rate."
                    )
                lines.append(
                    f"| {system}{mark} | {_fmt(row.get('jobs_per_s'))} | {_fmt(row.get('seconds'), 2)} | "
                    f"{_ratio(w['koban_ratio'].get(system)) if system != 'koban' else ''} |"
                )
            if capped:
                lines += ["", *capped]
        errors = [(name, row["errors"]) for name, row in w["systems"].items() if row.get("errors")]
        for name, errs in errors:
            lines.append(f"\n{name}: {len(errs)} failed run(s): {errs[0]}")
        lines.append("")
    if "history" in results:
        h = results["history"]
        lines += [
            "## History (d)",
            "",
            f"Burn-down of {h['jobs']:,} jobs on an empty table and with {h['history_rows']:,} completed "
            f"jobs kept: {', '.join(_fmt(x) for x in h['empty_jobs_per_s'])} vs "
            f"{', '.join(_fmt(x) for x in h['history_jobs_per_s'])} jobs/s; median ratio {_ratio(h['ratio'])}.",
            "",
        ]
    if "xmin" in results:
        x = results["xmin"]
        lines += [
            "## xmin horizon held (e)",
            "",
            f"{x['rate']:.0f} jobs/s inserted one at a time; a REPEATABLE READ snapshot held from "
            f"{x['held_from_s']} s to {x['held_to_s']} s.",
            "",
            "| phase | seconds | p50 ms (median of per-second p50) | p99 ms (median of per-second p99) | worst per-second p99 |",
            "|---|---:|---:|---:|---:|",
        ]
        for phase in ("before", "during", "during_last_10s", "after", "after_from_10s"):
            p = x[phase]
            lines.append(
                f"| {phase.replace('_', ' ')} | {p['seconds']} | {_fmt(p['p50_ms'], 1)} | "
                f"{_fmt(p['p99_ms'], 1)} | {_fmt(p['worst_p99_ms'], 1)} |"
            )
        lines.append("")
    if "cpu" in results:
        cpu = results["cpu"]
        lines += [
            "## CPU-bound jobs: thread pool vs process pool",
            "",
            f"{cpu['jobs']:,} jobs of ~{_fmt(cpu['job_ms'])} ms of pure Python each, {cpu['slots']} slots; "
            f"sync workers in the thread pool: {', '.join(_fmt(x, 1) for x in cpu['thread_jobs_per_s'])} "
            f'jobs/s; executor="process" with {cpu["processes"]} worker processes: '
            f"{', '.join(_fmt(x, 1) for x in cpu['process_jobs_per_s'])} jobs/s; median ratio "
            f"{_ratio(cpu['ratio'])}.",
            "",
        ]
    if "memory" in results:
        mem = results["memory"]
        lines += [
            "## Memory across a long burn-down",
            "",
            f"{mem['jobs']:,} jobs at {_fmt(mem['jobs_per_s'])} jobs/s; node RSS after 5% of jobs "
            f"{_fmt(mem['rss_after_5pct_mb'], 1)} MiB, min {_fmt(mem['rss_min_mb'], 1)}, max "
            f"{_fmt(mem['rss_max_mb'], 1)}, at the end {_fmt(mem['rss_end_mb'], 1)} "
            f"(spread {_fmt(mem['spread_pct'], 1)}%).",
            "",
        ]
    if s.get("targets"):
        lines += [
            "## Targets (issue 7)",
            "",
            "| target | measured | goal | holds |",
            "|---|---:|---:|---|",
        ]
        for t in s["targets"]:
            unit = t["unit"]
            measured = (
                "—"
                if t["measured"] is None
                else (f"{t['measured']:.2f}{X if unit == 'x' else unit}")
            )
            goal = f"≥ {t['goal']:.2f}{X}" if unit == "x" else f"≤ {t['goal']:.0f}{unit}"
            holds = {True: "yes", False: "**no**", None: "—"}[t["holds"]]
            lines.append(f"| {t['target']} | {measured} | {goal} | {holds} |")
        lines.append("")
    if results.get("notes"):
        lines += ["## Notes", "", *(f"- {n}" for n in results["notes"]), ""]
    versions = results.get("versions", {})
    if versions:
        lines += ["## Versions", ""]
        for system, v in versions.items():
            lines.append(f"- {system}: {', '.join(f'{k} {ver}' for k, ver in v.items())}")
        lines.append("")
    return "\n".join(lines)


def chart(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = results["summary"]
    panels = [w for w in LABELS if w in s]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 4.2), squeeze=False)
    for ax, workload in zip(axes[0], panels, strict=True):
        systems = s[workload]["systems"]
        names = list(systems)
        if workload == "latency":
            p50 = [systems[n].get("p50_ms") or 0 for n in names]
            p99 = [systems[n].get("p99_ms") or 0 for n in names]
            xs = range(len(names))
            ax.bar([x - 0.2 for x in xs], p50, width=0.4, label="p50", color="#3b7dd8")
            ax.bar([x + 0.2 for x in xs], p99, width=0.4, label="p99", color="#a6c4ef")
            ax.set_yscale("log")  # SQLite's cross-process polling would flatten the rest
            ax.set_ylabel("ms, log scale (lower is better)")
            ax.legend()
        else:
            values = [systems[n].get("jobs_per_s") or 0 for n in names]
            colors = [
                "#d8643b" if n.startswith("koban") else "#888888" if n == "ceiling" else "#3b7dd8"
                for n in names
            ]
            ax.bar(range(len(names)), values, color=colors)
            ax.set_ylabel("jobs/s (higher is better)")
            for x, v in enumerate(values):
                ax.text(x, v, f"{v:,.0f}", ha="center", va="bottom", fontsize=7)
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names, rotation=35, ha="right", fontsize=8)
        ax.set_title(LABELS[workload], fontsize=9)
    m = results["machine"]
    fig.suptitle(
        f"koban benchmark — {m.get('cores')} cores, PostgreSQL {m.get('postgresql')}, "
        f"medians of {results['config']['rounds']} round(s)",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    data = json.loads(Path(sys.argv[1]).read_text())
    chart(data, Path(sys.argv[2]))
