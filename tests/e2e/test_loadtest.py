"""``broker loadtest`` against a running broker: the report, the JSON, the plot."""

from __future__ import annotations

import json
import os
import signal
import ssl
import subprocess
import sys
import urllib.request

import pytest

from broker.pki import CertificateAuthority

from .conftest import start_broker, stop_broker, wait_for_towers, wait_until


def loadtest(broker, *arguments: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "broker", "loadtest", broker.url, "--api-key", broker.api_key,
         "--certificate", broker.certificate, *arguments],
        capture_output=True, text=True, timeout=180,
    )


def long_load_test(broker) -> subprocess.Popen:
    """A load test of 4 sessions for 10 minutes, in a session of its own (as a terminal
    runs it: Ctrl-C goes to its process group)."""
    return subprocess.Popen(
        [sys.executable, "-m", "broker", "loadtest", broker.url, "--api-key", broker.api_key,
         "--certificate", broker.certificate, "--sessions", "4", "--rate", "4",
         "--duration", "600", "--json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def live_sessions(broker) -> int:
    context = ssl.create_default_context(cafile=broker.certificate)
    with urllib.request.urlopen(broker.url + "/metrics", context=context) as response:
        page = response.read().decode()
    return sum(int(float(line.rsplit(" ", 1)[1])) for line in page.splitlines()
               if line.startswith("broker_sessions{"))


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

        # Refused before any session starts: a wrong key, a plot that cannot be written.
        wrong = subprocess.run(
            [sys.executable, "-m", "broker", "loadtest", broker.url, "--api-key", "wrong",
             "--certificate", broker.certificate], capture_output=True, text=True, timeout=60)
        assert wrong.returncode == 2 and "refused the API key (401)" in wrong.stderr
        unwritable = loadtest(broker, "--plot", str(tmp_path / "none" / "load.png"))
        assert unwritable.returncode == 2 and "--plot: cannot write" in unwritable.stderr

        # Ctrl-C (to the whole process group, as a terminal sends it): the figures until
        # then, and no traceback from the workers.
        interrupted = long_load_test(broker)
        wait_until(lambda: live_sessions(broker) == 4, 60, "the load test's sessions up")
        os.killpg(interrupted.pid, signal.SIGINT)
        out, errors = interrupted.communicate(timeout=120)
        assert interrupted.returncode == 130, errors
        report = json.loads(out)
        assert report["interrupted"] is True and report["sessions"]["not_closed"] == 0
        assert "Traceback" not in errors
        # Its sessions were deleted, not left for the broker to find gone (its metrics
        # page is kept for half a second).
        wait_until(lambda: live_sessions(broker) == 0, 2, "the load test's sessions deleted")

    finally:
        stop_broker(broker)


@pytest.mark.parametrize(("arguments", "refused"), [
    (["--sessions", "0"], "--sessions must be at least 1"),
    (["--rate", "-1"], "--rate must be above 0"),
    (["--message-size", "0"], "--message-size must be at least 1"),
    (["--duration", "-1"], "--duration must be 0 or more"),
    (["--message-rate", "300"], "--message-rate is at most 256 for messages of 100 bytes"),
    (["--message-rate", "20", "--message-size", "262144"],
     "--message-rate is at most 15 for messages of 262144 bytes"),
    (["--rate", "1e-320"], "--rate is too small for --sessions ever to arrive"),
    # A URL without its scheme lost its port (443 was used), and http:// meant https.
    (["--url", "127.0.0.1:8443"], "'127.0.0.1:8443' is not a broker's HTTPS URL"),
    (["--url", "http://127.0.0.1:8443"], "is not a broker's HTTPS URL"),
    (["--url", "https://127.0.0.1:port"], "'https://127.0.0.1:port' is not a URL"),
    (["--certificate", "/nonexistent.pem"], "cannot use the certificate /nonexistent.pem"),
    # Nothing listens there: said at once, rather than a report of every session failed.
    ([], "cannot reach a broker at https://127.0.0.1:9"),
])
def test_bad_arguments_are_refused_before_anything_starts(tmp_path, arguments, refused):
    certificate = tmp_path / "ca.pem"
    certificate.write_bytes(CertificateAuthority.load_or_create(tmp_path / "ca")
                            .certificate_pem)
    url = "https://127.0.0.1:9"
    if arguments[:1] == ["--url"]:
        url, arguments = arguments[1], arguments[2:]
    result = subprocess.run(
        [sys.executable, "-m", "broker", "loadtest", url, "--api-key", "k",
         "--certificate", str(certificate), *arguments],
        capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, (arguments, result.stderr)
    assert refused in result.stderr
    assert "Traceback" not in result.stderr
