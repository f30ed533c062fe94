"""The shell benchmark runs and reports its figures (no timing is asserted here)."""

from . import quick_run


def test_quick_run_reports_session_setup_with_and_without_operators():
    results = quick_run("shell")
    assert results["operators"] == 10
    for concurrency in ("1", "10"):
        figure = results["figures"][concurrency]
        assert figure["without_operators_p50_ms"] > 0 and figure["with_operators_p50_ms"] > 0
        assert figure["ratio"] > 0 and figure["samples"] > 0
