"""``broker serve`` as an operator sees it: state kept, metrics, HTTP/2, a clean Ctrl-C."""

from __future__ import annotations

import json
import os
import signal
import ssl
import stat
import subprocess
import time
import urllib.request
import warnings

import h2.config
import h2.connection
import h2.events
import h2.settings
import psutil
import pytest
import trio
from trio_websocket import ConnectionClosed, open_websocket_url

from actors import bridge
from broker.client import trusting

from .conftest import start_broker, stop_broker, wait_for_towers


def test_state_is_made_once_kept_private_and_reused(tmp_path):
    first = start_broker(tmp_path, towers=2)
    try:
        wait_for_towers(first, 2)
    finally:
        assert stop_broker(first) == []
    state = first.state_dir
    files = [path for path in state.rglob("*") if path.is_file()]
    assert {"api-key", "ca.pem", "ca-key.pem", "certificate.pem", "key.pem"} <= {
        path.name for path in files}
    for path in files:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    ca = (state / "ca" / "ca.pem").read_bytes()
    second = start_broker(tmp_path, towers=2)
    try:
        assert second.api_key == first.api_key
        assert (state / "ca" / "ca.pem").read_bytes() == ca
    finally:
        stop_broker(second)


def test_ctrl_c_stops_the_broker_and_every_tower_agent(tmp_path):
    broker = start_broker(tmp_path, towers=3)
    wait_for_towers(broker, 3)
    agents = list(broker.tower_pids().values())
    assert len(agents) == 3
    started = time.monotonic()
    assert stop_broker(broker) == []
    assert broker.process.returncode == 0
    assert not [pid for pid in agents if psutil.pid_exists(pid)]
    print(f"stopped in {time.monotonic() - started:.2f} s")


def test_on_ctrl_c_each_client_hears_that_the_broker_is_shutting_down(tmp_path):
    broker = start_broker(tmp_path, towers=1)
    try:
        wait_for_towers(broker, 1)

        async def main():
            grant = await broker.client().create_session()
            frames, code = [], None
            async with open_websocket_url(grant.signaling_url,
                                          ssl_context=trusting(broker.certificate)) as socket:
                frames.append(json.loads(await socket.get_message()))
                broker.process.send_signal(signal.SIGINT)
                with trio.fail_after(15):
                    try:
                        while True:
                            frames.append(json.loads(await socket.get_message()))
                    except ConnectionClosed as closed:
                        code = closed.reason.code
            return frames, code

        frames, code = bridge.run(main, handle_signals=False)
    finally:
        assert stop_broker(broker) == []
    assert frames[0]["state"] == "negotiating"
    assert (frames[-1]["type"], frames[-1]["state"]) == ("state", "closed")
    assert frames[-1]["reason"] == "the broker is shutting down"
    assert code == 1000


def test_tower_agents_exit_when_their_broker_is_killed(tmp_path):
    broker = start_broker(tmp_path, towers=2)
    wait_for_towers(broker, 2)
    agents = [psutil.Process(pid) for pid in broker.tower_pids().values()]
    os.kill(broker.process.pid, signal.SIGKILL)
    broker.process.wait(10)
    _gone, alive = psutil.wait_procs(agents, timeout=10)
    for process in alive:
        process.kill()
    assert alive == []


def test_metrics_are_prometheus_text(tmp_path):
    broker = start_broker(tmp_path, towers=2)
    try:
        wait_for_towers(broker, 2)
        context = ssl.create_default_context(cafile=broker.certificate)
        with urllib.request.urlopen(broker.url + "/metrics", context=context) as response:
            assert response.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
            text = response.read().decode()
    finally:
        stop_broker(broker)
    samples = dict(line.rsplit(" ", 1) for line in text.splitlines() if not line.startswith("#"))
    assert samples['broker_towers{state="ready"}'] == "2"
    assert samples["broker_sessions_created_total"] == "0"
    assert float(samples["broker_actors"]) > 5
    # What each tower's agent process costs, as it reports it, and the broker's own.
    for tower in ("tower-1", "tower-2"):
        assert float(samples[f'broker_tower_cpu_seconds_total{{tower="{tower}"}}']) > 0
        assert float(samples[f'broker_tower_resident_memory_bytes{{tower="{tower}"}}']) > 2**20
        assert samples[f'broker_tower_capacity_used_ratio{{tower="{tower}"}}'] == "0.0"
    assert float(samples["process_cpu_seconds_total"]) > 0
    assert float(samples["process_resident_memory_bytes"]) > 2**20
    for family in ("broker_sessions", "broker_negotiations_total", "broker_actor_restarts_total",
                   "broker_mailbox_depth_max", "broker_negotiation_failures_total"):
        assert f"# TYPE {family} " in text


def test_https_speaks_http2_and_refuses_tls_1_1(tmp_path):
    broker = start_broker(tmp_path, towers=2)
    try:
        wait_for_towers(broker, 2)
        host, port = broker.url.removeprefix("https://").split(":")
        context = ssl.create_default_context(cafile=broker.certificate)
        context.set_alpn_protocols(["h2"])
        import socket

        with socket.create_connection((host, int(port))) as raw:
            with context.wrap_socket(raw, server_hostname=host) as tls:
                assert tls.selected_alpn_protocol() == "h2"
                connection = h2.connection.H2Connection(h2.config.H2Configuration())
                connection.initiate_connection()
                connection.send_headers(1, [(":method", "GET"), (":path", "/healthz"),
                                            (":scheme", "https"), (":authority", host)],
                                        end_stream=True)
                tls.sendall(connection.data_to_send())
                status, body, server_settings = None, b"", {}
                while True:
                    events = connection.receive_data(tls.recv(65536))
                    for event in events:
                        if isinstance(event, h2.events.ResponseReceived):
                            status = dict(event.headers)[b":status"]
                        elif isinstance(event, h2.events.DataReceived):
                            body += event.data
                        elif isinstance(event, h2.events.RemoteSettingsChanged):
                            server_settings.update(event.changed_settings)
                    tls.sendall(connection.data_to_send())
                    if any(isinstance(e, h2.events.StreamEnded) for e in events):
                        break
                # A DATA frame on the stream that just ended (the known hypercorn bug)
                # ends this connection at most, never the server.
                tls.sendall(b"\x00\x00\x01\x00\x00\x00\x00\x00\x01x")
                tls.recv(65536)
        assert status == b"200" and json.loads(body)["status"] == "ok"
        # No WebSockets over HTTP/2 (RFC 8441): browsers use HTTP/1.1 for signaling.
        connect = server_settings.get(h2.settings.SettingCodes.ENABLE_CONNECT_PROTOCOL)
        assert connect is None or connect.new_value == 0
        plain = ssl.create_default_context(cafile=broker.certificate)
        with urllib.request.urlopen(broker.url + "/healthz", context=plain) as response:
            assert response.status == 200
        # A client able to speak TLS 1.1 (security level 0 lifts OpenSSL's own ban).
        old = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        old.load_verify_locations(broker.certificate)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            old.minimum_version = old.maximum_version = ssl.TLSVersion.TLSv1_1
        old.set_ciphers("DEFAULT:@SECLEVEL=0")
        with socket.create_connection((host, int(port))) as raw:
            with pytest.raises(ssl.SSLError, match="(?i)version|protocol"):
                old.wrap_socket(raw, server_hostname=host)
    finally:
        stop_broker(broker)


def test_a_bad_config_file_is_refused_with_the_field_named(tmp_path):
    config = tmp_path / "bad.toml"
    config.write_text("negotiation_deadline = -1\n")
    result = subprocess.run(
        [__import__("sys").executable, "-m", "broker", "serve", "--config", str(config)],
        capture_output=True, text=True, timeout=30,
    )
    assert result.returncode == 2
    assert "negotiation_deadline" in result.stderr
