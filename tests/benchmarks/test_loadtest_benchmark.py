"""The load-test benchmark runs and reports its figures (no timing is asserted here)."""

from . import quick_run


def test_quick_run_reports_the_floor_and_the_broker_side_by_side():
    [level] = quick_run("loadtest")["levels"]
    for name in ("floor", "broker"):
        figures = level[name]
        assert figures["connected"] == figures["sessions"] == 50, figures
        assert figures["rtt_p50_ms"] > 0 and figures["echoed_per_second"] > 0
        assert figures["kib_per_session"] is not None


def test_quick_chaos_run_repairs_the_sessions_of_the_killed_tower():
    results = quick_run("loadtest", "--chaos")
    assert results["chaos"]["killed"] in ("tower-1", "tower-2")
    assert results["sessions"]["lost"] == 0
    assert results["repairs"]["count"] > 0
