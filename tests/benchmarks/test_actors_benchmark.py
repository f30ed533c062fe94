"""The actor benchmark runs and reports every figure (no timing is asserted here)."""

from . import quick_run


def test_quick_run_prints_one_json_object_with_every_figure():
    figures = quick_run("actors")
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
        "snapshot_whole_tree_ms",
        "shell_ps_ms",
    ):
        assert figures[key] > 0, key
