"""The load-test benchmark runs and reports its figures (no timing is asserted here)."""

import contextlib
import signal
import subprocess
import sys
import time

import psutil

from benchmarks import loadtest

from . import ROOT, quick_run


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


def test_a_run_stopped_with_sigterm_stops_the_servers_it_started():
    # They run in sessions of their own: left behind, a broker and its towers ran on.
    benchmark = subprocess.Popen(
        [sys.executable, "-m", "benchmarks.loadtest", "--quick", "--json"], cwd=ROOT,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    servers: list[psutil.Process] = []
    try:
        deadline = time.monotonic() + 60
        while not servers and time.monotonic() < deadline:
            # Once it listens: it has said so, and a write to a closed pipe can no
            # longer end it.
            servers = [child for child in psutil.Process(benchmark.pid).children()
                       if "benchmarks.echo_floor" in " ".join(child.cmdline())
                       and any(connection.status == psutil.CONN_LISTEN
                               for connection in child.net_connections("tcp"))]
            time.sleep(0.1)
        assert servers, "the floor never started"
        time.sleep(1)  # the load test under way
        benchmark.send_signal(signal.SIGTERM)
        benchmark.wait(60)
        _gone, alive = psutil.wait_procs(servers, timeout=10)
        assert alive == []
    finally:
        if benchmark.poll() is None:
            benchmark.kill()
            benchmark.wait()
        for server in servers:
            with contextlib.suppress(psutil.Error):
                server.kill()


def test_a_chaos_run_takes_the_sessions_and_duration_it_is_given(monkeypatch, capsys):
    # It ran 200 sessions for 20 s whatever it was asked, unless --quick.
    runs = []
    monkeypatch.setattr(loadtest, "chaos", lambda *arguments: runs.append(arguments) or {})
    loadtest.main(["--chaos", "--sessions", "1000", "--rate", "50", "--duration", "40"])
    loadtest.main(["--chaos"])
    assert runs == [(1000, 50.0, 40.0), (200, 20.0, 20.0)]
