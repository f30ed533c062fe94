"""The connections benchmark runs and reports its figures (no figure is asserted here)."""

import json
import subprocess
import sys


def test_quick_run_reports_both_kinds_of_connection():
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.connections", "--quick", "--json"],
        capture_output=True, text=True, timeout=300, check=True,
    )
    figures = json.loads(result.stdout)
    assert figures["connections"] == 400
    assert set(figures["kib_per_connection"]) == {"closed at once", "held past a freeze"}
    assert set(figures["rss_mib"]) == {"warm", "closed at once", "held past a freeze"}
