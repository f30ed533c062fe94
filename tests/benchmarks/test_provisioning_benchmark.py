"""The provisioning benchmark runs and reports its figures (no timing is asserted here)."""

from tests.e2e.hosts import require_nginx, require_sshd

from . import quick_run


def test_quick_run_reports_one_and_three_hosts_with_their_steps():
    require_sshd()
    require_nginx()
    runs = quick_run("provisioning")["runs"]
    assert [run["hosts"] for run in runs] == [1, 3]
    for run in runs:
        assert 0 < run["p50_seconds"] <= run["max_seconds"] <= run["wall_seconds"]
        assert all(seconds > 0 for seconds in run["step_p50_seconds"].values())
