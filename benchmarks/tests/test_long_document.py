"""The long-document benchmark runs end to end on a small line and reports every key. No memory
or time bound is asserted here: the figure is read from the benchmark's own run."""

from __future__ import annotations

import json
import subprocess
import sys

from benchmarks.long_document import REPO_ROOT

KEYS = {
    "line_mb", "import_rows", "import_peak_above_idle_mb", "idle_rss_mb", "peak_rss_mb",
    "peak_above_idle_mb", "status", "error", "n_tokens", "seconds",
}  # fmt: skip


def test_it_runs_the_workers_job_and_reports_every_key():
    cmd = [sys.executable, "-m", "benchmarks.long_document", "--mb", "2", "--max-samples", "4"]
    done = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert set(result) == KEYS
    assert result["status"] == "completed" and result["n_tokens"] == 4 * 64
    assert result["line_mb"] >= 1.5 and result["import_rows"] == 1
