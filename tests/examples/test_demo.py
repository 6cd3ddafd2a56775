"""`koban demo`, run as a user runs it: a subprocess on the default embedded SQLite database."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path


def test_koban_demo_syncs_everything_and_prints_a_summary(tmp_path: Path) -> None:
    # TMPDIR: the demo's fresh database directory goes under this test's own tmp_path.
    env = {**os.environ, "TMPDIR": str(tmp_path), "COLUMNS": "160"}
    env.pop("KOBAN_DATABASE_URL", None)

    result = subprocess.run(
        [sys.executable, "-m", "koban.cli", "demo", "--athletes", "6"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=90,
    )

    out = result.stdout
    assert result.returncode == 0, out + result.stderr
    assert "Summary" in out
    assert re.search(r"jobs by state\s+│ completed 7\b", out), out
    synced = re.search(r"activities synced\s+│ (\d+) of (\d+)", out)
    assert synced and synced.group(1) == synced.group(2) and int(synced.group(1)) > 0, out
    assert re.search(r"failed attempts retried\s+│ 1\b", out), out
    assert "StravaUnavailable" in out  # the failing sync was shown, then recovered
    assert re.search(r"elapsed\s+│ [\d.]+ s", out), out
    assert "every athlete synced" in out
    databases = list(tmp_path.glob("koban-demo-*/koban-demo.db"))
    assert len(databases) == 1
    assert f"sqlite:///{databases[0]}" in out  # where to look next names the file
    assert "koban start --app koban.examples.summer_challenge.jobs:app" in out
