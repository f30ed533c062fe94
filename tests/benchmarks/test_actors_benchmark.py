"""The actor benchmark runs and reports every figure (no timing is asserted here)."""

import json
import subprocess
import sys


def test_quick_run_prints_one_json_object_with_every_figure():
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.actors", "--quick", "--json"],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    figures = json.loads(result.stdout)
    for key in (
        "tell_per_second",
        "bare_tell_per_second",
        "tell_ratio",
        "ask_per_second",
        "bare_ask_per_second",
        "ask_ratio",
        "spawn_per_second",
        "idle_actor_bytes",
        "idle_actors_alive",
        "restart_median_us",
        "restart_p99_us",
    ):
        assert figures[key] > 0, key
