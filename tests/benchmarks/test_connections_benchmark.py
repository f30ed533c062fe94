"""The connections benchmark runs and reports its figures (no figure is asserted here)."""

from . import quick_run


def test_quick_run_reports_both_kinds_of_connection():
    figures = quick_run("connections")
    assert figures["connections"] == 400
    assert set(figures["kib_per_connection"]) == {"closed at once", "held past a freeze"}
    assert set(figures["rss_mib"]) == {"warm", "closed at once", "held past a freeze"}
