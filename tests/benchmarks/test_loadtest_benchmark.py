"""The load-test benchmark runs and reports its figures (no timing is asserted here)."""

import json
import subprocess
import sys


def run(*arguments: str) -> dict:
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.loadtest", "--quick", "--json", *arguments],
        capture_output=True, text=True, timeout=300, check=True,
    )
    return json.loads(result.stdout)


def test_quick_run_reports_the_floor_and_the_broker_side_by_side():
    [level] = run()["levels"]
    for name in ("floor", "broker"):
        figures = level[name]
        assert figures["connected"] == figures["sessions"] == 50, figures
        assert figures["rtt_p50_ms"] > 0 and figures["echoed_per_second"] > 0
        assert figures["kib_per_session"] is not None


def test_quick_chaos_run_repairs_the_sessions_of_the_killed_tower():
    results = run("--chaos")
    assert results["chaos"]["killed"] in ("tower-1", "tower-2")
    assert results["sessions"]["lost"] == 0
    assert results["repairs"]["count"] > 0
