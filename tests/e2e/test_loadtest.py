"""``broker loadtest`` against a running broker: the report, the JSON, the plot."""

from __future__ import annotations

import json
import subprocess
import sys

from .conftest import start_broker, stop_broker, wait_for_towers


def loadtest(broker, *arguments: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "broker", "loadtest", broker.url, "--api-key", broker.api_key,
         "--certificate", broker.certificate, *arguments],
        capture_output=True, text=True, timeout=180,
    )


def test_a_load_test_reports_sessions_latency_cpu_and_draws_them(tmp_path):
    broker = start_broker(tmp_path, towers=2, max_sessions_per_key=100)
    try:
        wait_for_towers(broker, 2)
        plot = tmp_path / "load.png"
        result = loadtest(broker, "--sessions", "20", "--rate", "20", "--duration", "3",
                          "--message-size", "500", "--json", "--plot", str(plot))
        assert result.returncode == 0, result.stderr
        report = json.loads(result.stdout)
        assert report["sessions"]["connected"] == 20 and report["sessions"]["failed"] == 0
        assert report["plan"]["api_key"] == "(hidden)"
        assert broker.api_key not in result.stdout
        assert report["setup_ms"]["p50"] > 0 and report["round_trip_ms"]["p99"] > 0
        assert report["messages"]["echoed"] > 0
        assert report["messages"]["bytes_per_second_steady"] >= 500
        # From the broker's metrics page: its own process and what each tower reports.
        assert report["rss_mib_peak"]["broker"] > 0 and report["rss_mib_peak"]["towers"] > 0
        assert report["cpu_share_of_a_core_steady"]["towers"] > 0
        assert any((second["broker_cpu"] or 0) > 0 for second in report["series"])
        assert plot.read_bytes().startswith(b"\x89PNG")

        text = loadtest(broker, "--sessions", "4", "--rate", "10", "--duration", "1")
        assert text.returncode == 0, text.stderr
        assert "connected 4" in text.stdout and "round trip" in text.stdout

        # With media: the tower's video arrives (the demo application draws it), counted
        # as frames, RTP packets and their loss, bitrate and jitter.
        media = loadtest(broker, "--sessions", "3", "--rate", "10", "--duration", "3",
                         "--media", "--json", "--plot", str(plot))
        assert media.returncode == 0, media.stderr
        report = json.loads(media.stdout)
        assert report["sessions"]["connected"] == 3
        video = report["video"]
        assert video["frames"] > 0 and video["packets"] >= video["frames"]
        assert 0 <= video["loss_percent"] < 100
        assert video["kbit_per_second_per_session_steady"] > 0
        assert video["jitter_ms"]["p50"] is not None
        assert plot.read_bytes().startswith(b"\x89PNG")
        text = loadtest(broker, "--sessions", "2", "--rate", "10", "--duration", "2", "--media")
        assert text.returncode == 0, text.stderr
        assert "RTP packets" in text.stdout and "kbit/s per session" in text.stdout
    finally:
        stop_broker(broker)


def test_bad_arguments_are_refused_before_anything_starts(tmp_path):
    for arguments in (["--sessions", "0"], ["--rate", "-1"], ["--message-size", "0"]):
        result = subprocess.run(
            [sys.executable, "-m", "broker", "loadtest", "https://127.0.0.1:9",
             "--api-key", "k", *arguments], capture_output=True, text=True, timeout=60)
        assert result.returncode == 2, (arguments, result.stderr)
        assert "must be positive" in result.stderr
