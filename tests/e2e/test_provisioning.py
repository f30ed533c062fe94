"""Provisioning towers on real hosts: OpenSSH servers and NGINX on loopback.

Each simulated host is a real sshd (``tests/e2e/hosts.py``) whose authorized key is the
broker's provisioning identity. The broker connects over SSH, has the host make its key
and request, signs it, writes the tower's NGINX site and starts NGINX and the agent
there, then links to the tower through NGINX over mutual TLS. Sessions then run on
those towers.
"""

from __future__ import annotations

import json
import os
import pwd
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from cryptography import x509

from actors import bridge
from broker.client import start_session
from broker.inventory import parse_host
from broker.provisioning import _nginx_running
from broker.site import NGINX_WORKER_USER, TowerPaths, nginx_command
from broker.state import provisioning_identity

from .conftest import (
    RunningBroker,
    wait_until,
    run_shell,
    start_broker,
    start_steady_client,
    stop_broker,
    wait_for_towers,
)
from .hosts import SimulatedHost, make_host, require_nginx  # noqa: F401

TOWER_COMMAND = str(Path(sys.executable).parent / "broker")
PROVISION_DEADLINE = 90.0


def run(main, *args):
    return bridge.run(main, *args, handle_signals=False)


def broker_key(tmp_path: Path) -> str:
    """The broker's provisioning public key, made in the state directory it will use."""
    return Path(f"{provisioning_identity(tmp_path / 'state')}.pub").read_text().strip()


def entry(host: SimulatedHost, **overrides: object) -> dict:
    """The inventory entry of a simulated host."""
    values = {
        "name": host.name,
        "address": host.address,
        "ssh_port": host.port,
        "user": host.user,
        "host_key": host.host_key,
        "tower_port": host.tower_port,
        "root": str(host.root),
        "tower_command": TOWER_COMMAND,
    }
    values.update(overrides)
    return values


def hosts(broker: RunningBroker) -> dict[str, dict]:
    """What ``jobs --json`` says of each inventory host."""
    [jobs] = run_shell(broker, "jobs --json")
    assert jobs.exit_status == 0, jobs.stdout + jobs.stderr
    return {host["name"]: host for host in json.loads(jobs.stdout)["hosts"]}


def events(broker: RunningBroker) -> str:
    """The events ``jobs --json`` lists, one per line."""
    [jobs] = run_shell(broker, "jobs --json")
    return "\n".join(event["text"] for event in json.loads(jobs.stdout)["events"])


def test_three_hosts_become_towers_at_once_and_serve_sessions(tmp_path, make_host):  # noqa: F811
    require_nginx()
    key = broker_key(tmp_path)
    hosts = [make_host(f"host-{number}", key) for number in (1, 2, 3)]
    broker = start_broker(
        tmp_path, towers=0, min_towers=3, scale_interval=0.5,
        hosts=[entry(host) for host in hosts],
    )
    try:
        wait_for_towers(broker, 3, timeout=PROVISION_DEADLINE)
        towers_used = set()

        async def main():
            client = broker.client()
            for _ in range(9):
                async with start_session(client) as session:
                    await session.wait_state("connected")
                    await session.echo("through a provisioned tower")
                    towers_used.add(session.grant.tower)
            await client.aclose()

        run(main)
        assert towers_used <= {"host-1", "host-2", "host-3"}
        assert len(towers_used) >= 2
        for host in hosts:
            master, workers = nginx_users(host)
            assert master == host.user
            # Never root: an unprivileged user of their own when root provisions.
            root = pwd.getpwnam(host.user).pw_uid == 0
            assert workers == {NGINX_WORKER_USER if root else host.user}
    finally:
        stop_broker(broker)


def nginx_users(host: SimulatedHost) -> tuple[str, set[str]]:
    """Who runs the host's tower NGINX: its master, and its workers."""
    pid = int((host.root / "nginx" / "nginx.pid").read_text())
    workers = {int(child) for child in
               Path(f"/proc/{pid}/task/{pid}/children").read_text().split()}
    assert workers, "the NGINX master has no workers"
    return _user(pid), {_user(worker) for worker in workers}


def _user(pid: int) -> str:
    return pwd.getpwuid(os.stat(f"/proc/{pid}").st_uid).pw_name


def test_faults_stay_within_their_own_job(tmp_path, make_host):  # noqa: F811
    """Five hosts, each with its own fault, beside a healthy one: each fault gets its
    own clear outcome, and the healthy host becomes a tower that serves sessions."""
    require_nginx()
    key = broker_key(tmp_path)
    healthy, sshd_down, wrong_key, port_taken, lock_held, hung = (
        make_host(name, key) for name in
        ("healthy", "sshd-down", "wrong-key", "port-taken", "lock-held", "hung"))
    sshd_down.stop()
    # Another host's key pinned for this one: an impostor, or a rebuilt host.
    wrong = entry(wrong_key, host_key=healthy.host_key)
    # NGINX cannot load: something else listens on the tower's port.
    squatter = socket.socket()
    squatter.bind((port_taken.address, port_taken.tower_port))
    squatter.listen()
    # The agent cannot start: another process holds its lock (and does not answer).
    (lock_held.root).mkdir(parents=True)
    holder = subprocess.Popen(
        ["flock", str(lock_held.root / "agent.lock"), "sleep", "600"],
        stdin=subprocess.DEVNULL, start_new_session=True)  # flock's sleep goes with it
    # A step that hangs: writing the agent's settings blocks (a FIFO nobody reads).
    (hung.root).mkdir(parents=True)
    os.mkfifo(hung.root / "tower.toml.new")
    inventory = [entry(healthy), entry(sshd_down), wrong, entry(port_taken),
                 entry(lock_held), entry(hung)]
    broker = start_broker(
        tmp_path, towers=0, min_towers=len(inventory), scale_interval=0.5,
        provision_step_timeout=4.0, provision_restarts=3, provision_restart_period=120.0,
        hosts=inventory,
    )
    try:
        wait_for_towers(broker, 1, timeout=PROVISION_DEADLINE)
        wait_until(lambda: hosts(broker)["sshd-down"]["attempts"] >= 2, 30,
                   "a second attempt at the host whose sshd is down")
        sshd_down.start()
        wait_for_towers(broker, 2, timeout=PROVISION_DEADLINE)
        settled = ("ready", "failed")
        wait_until(lambda: all(host["state"] in settled for host in hosts(broker).values()),
                   PROVISION_DEADLINE, "every job settled")
        outcome = hosts(broker)
        assert outcome["healthy"]["state"] == "ready"
        assert outcome["healthy"]["attempts"] == 1
        assert outcome["sshd-down"]["state"] == "ready"
        assert outcome["wrong-key"]["state"] == "failed"
        assert outcome["wrong-key"]["attempts"] == 1  # no retry storm
        assert "host key" in outcome["wrong-key"]["error"]
        assert outcome["port-taken"]["state"] == "failed"
        assert outcome["port-taken"]["attempts"] == 4
        assert "nginx" in outcome["port-taken"]["error"]
        assert "Address already in use" in outcome["port-taken"]["error"]
        assert outcome["lock-held"]["state"] == "failed"
        assert "holds" in outcome["lock-held"]["error"]
        assert "agent.lock) does not answer" in outcome["lock-held"]["error"]
        assert outcome["hung"]["state"] == "failed"
        assert "certificate: no progress within 4 s" in outcome["hung"]["error"]
        # The failed hosts keep no valid certificate (each attempt had one issued).
        unrevoked = {record["tower"] for record in ledger(broker) if not record["revoked"]}
        assert unrevoked == {"healthy", "sshd-down"}

        # An operator tries the hung host again, and cancels the job while it hangs.
        [again] = run_shell(broker, "provision hung")
        assert again.exit_status == 0, again.stdout
        wait_until(lambda: hosts(broker)["hung"]["step"] == "certificate", 20,
                   "the hung host's job at its hanging step")
        [cancel] = run_shell(broker, "cancel hung")
        assert cancel.exit_status == 0, cancel.stdout
        wait_until(lambda: hosts(broker)["hung"]["state"] == "cancelled", 10, "cancelled")
        assert "cancelled at certificate" in hosts(broker)["hung"]["error"]
        # What the job left on the host is cleared by decommissioning it.
        release(hung.root / "tower.toml.new")
        os.unlink(hung.root / "tower.toml.new")
        [decommission] = run_shell(broker, "decommission hung")
        assert decommission.exit_status == 0, decommission.stdout
        # (Free again, the scaler soon provisions it: min_towers asks for every host.)
        wait_until(lambda: "hung: free" in events(broker), 30, "hung decommissioned")
        assert "hung: revoked" in events(broker)

        async def main():
            client = broker.client()
            for _ in range(4):
                async with start_session(client) as session:
                    await session.wait_state("connected")
                    await session.echo("unaffected")
                    assert session.grant.tower in ("healthy", "sshd-down")
            await client.aclose()

        run(main)
    finally:
        stop_broker(broker)
        squatter.close()
        os.killpg(holder.pid, signal.SIGKILL)
        holder.wait()
        if (hung.root / "tower.toml.new").exists():
            release(hung.root / "tower.toml.new")


def release(fifo: Path) -> None:
    """Let the SFTP servers blocked opening ``fifo`` go: once their client is gone they
    are no longer sshd's children, so the host's clean-up would not find them."""
    os.close(os.open(fifo, os.O_RDONLY | os.O_NONBLOCK))
    time.sleep(0.2)


def ledger(broker: RunningBroker) -> list[dict]:
    path = broker.state_dir / "ca" / "ledger.json"
    return json.loads(path.read_text()) if path.exists() else []


def nginx_certificate(broker: RunningBroker, host: SimulatedHost, client: bool = True):
    """The certificate the host's NGINX shows to a client with the broker's certificate
    (or none), and the start of NGINX's answer to a plain request on /link."""
    import ssl

    context = ssl.create_default_context(cafile=str(broker.state_dir / "ca" / "ca.pem"))
    if client:
        context.load_cert_chain(broker.state_dir / "broker" / "certificate.pem",
                                broker.state_dir / "broker" / "key.pem")
    with socket.create_connection((host.address, host.tower_port), timeout=10) as raw:
        with context.wrap_socket(raw, server_hostname=host.name) as tls:
            serial = x509.load_der_x509_certificate(tls.getpeercert(binary_form=True))
            tls.sendall(f"GET /link HTTP/1.1\r\nHost: {host.name}\r\n"
                        "Connection: close\r\n\r\n".encode())
            answer = b""
            while chunk := tls.recv(4096):
                answer += chunk
    return serial.serial_number, answer.decode(errors="replace")


def test_certificates_are_renewed_under_live_sessions_and_revocation_unlinks(
    tmp_path, make_host  # noqa: F811
):
    require_nginx()
    host = make_host("host-1", broker_key(tmp_path))
    broker = start_broker(
        tmp_path, towers=1, min_towers=2, scale_interval=0.5,
        tower_certificate_lifetime=12.0, hosts=[entry(host)],
    )
    try:
        wait_for_towers(broker, 2, timeout=PROVISION_DEADLINE)
        clients = [start_steady_client(broker) for _ in range(4)]
        # Issued at provisioning (or start), renewed at 2/3 of 12 s, then again.
        wait_until(lambda: all(
            sum(1 for record in ledger(broker) if record["tower"] == tower) >= 3
            for tower in ("tower-1", "host-1")), 40, "two renewals of each tower")
        newest = max((record for record in ledger(broker) if record["tower"] == "host-1"),
                     key=lambda record: record["not_after"])
        # Recorded when signed; NGINX shows it once the tower installed it and reloaded
        # (or the one renewed after it, if a renewal came in between).
        def nginx_shows_newest() -> bool:
            shown = format(nginx_certificate(broker, host)[0], "x")
            return any(record["serial"] == shown and record["not_after"] >= newest["not_after"]
                       for record in ledger(broker))

        wait_until(nginx_shows_newest, 10, "NGINX showing the newest certificate")
        _, status = nginx_certificate(broker, host)
        # Through to the agent, which wants a WebSocket upgrade.
        assert "Sec-WebSocket-Version: 13" in status
        summaries = [client.finish() for client in clients]
        for summary in summaries:
            assert summary["failed_echoes"] == 0, summary
            assert summary["negotiation"] == 1, summary
        # No certificate, no entry: NGINX refuses a client without one.
        _, answer = nginx_certificate(broker, host, client=False)
        assert answer.startswith("HTTP/1.1 400 Bad Request")
        assert "No required SSL certificate was sent" in answer

        revoked = subprocess.run(
            [sys.executable, "-m", "broker", "ca", "--state-dir", str(broker.state_dir),
             "revoke", "host-1"], capture_output=True, text=True)
        assert revoked.returncode == 0, revoked.stderr
        wait_until(lambda: ready_towers(broker) == 1, 15, "the revoked tower unlinked")
        # Its relinks are refused; past its restarts the host is failed, not provisioned
        # again behind the operator's back.
        wait_until(lambda: hosts(broker)["host-1"]["state"] == "failed", 40,
                   "the revoked host failed")
        assert "revoked" in hosts(broker)["host-1"]["error"]
        assert ready_towers(broker) == 1
    finally:
        stop_broker(broker)


def ready_towers(broker: RunningBroker) -> int:
    import ssl
    import urllib.request

    context = ssl.create_default_context(cafile=broker.certificate)
    with urllib.request.urlopen(broker.url + "/healthz", context=context) as response:
        return json.load(response)["towers_ready"]


def processes_of(host: SimulatedHost) -> list[str]:
    import psutil

    marker = str(host.root)
    found = []
    for process in psutil.process_iter(["cmdline"]):
        command = " ".join(process.info["cmdline"] or ())
        if marker in command:
            found.append(command)
    return found


def test_scale_out_under_load_then_scale_in_without_losing_a_session(
    tmp_path, make_host  # noqa: F811
):
    require_nginx()
    key = broker_key(tmp_path)
    first, second = make_host("host-a", key), make_host("host-b", key)
    broker = start_broker(
        tmp_path, towers=0, min_towers=1, tower_capacity=4, scale_out_threshold=0.6,
        scale_out_after=1.0, scale_in_after=2.0, scale_interval=0.3,
        hosts=[entry(first), entry(second)],
    )
    try:
        wait_for_towers(broker, 1, timeout=PROVISION_DEADLINE)
        clients = [start_steady_client(broker) for _ in range(3)]  # 3 of 4: 75 %
        wait_for_towers(broker, 2, timeout=PROVISION_DEADLINE)
        # Back to one session on host-a: host-b is idle, and host-a alone would be at
        # 25 %, under half the threshold. host-b is drained, then decommissioned.
        for client in clients[1:]:
            assert client.finish()["failed_echoes"] == 0
        wait_until(lambda: any(record["tower"] == "host-b" and record["revoked"]
                               for record in ledger(broker)), 30, "host-b decommissioned")
        wait_until(lambda: not processes_of(second), 10, "host-b's agent and NGINX gone")
        # Its whole directory: site, credentials, settings, the agent's log and lock.
        assert not second.root.exists(), sorted(path.name for path in second.root.iterdir())
        assert ready_towers(broker) == 1
        assert processes_of(first)  # host-a untouched
        summary = clients[0].finish()
        assert summary["failed_echoes"] == 0 and summary["negotiation"] == 1, summary
    finally:
        stop_broker(broker)


def test_a_tower_whose_agent_died_is_provisioned_again(tmp_path, make_host):  # noqa: F811
    require_nginx()
    host = make_host("host-1", broker_key(tmp_path))
    # Retries 6, 12 and 24 s apart.
    broker = start_broker(tmp_path, towers=1, min_towers=2, scale_interval=0.5,
                          provision_restart_period=240.0, hosts=[entry(host)])
    try:
        wait_for_towers(broker, 2, timeout=PROVISION_DEADLINE)
        wait_until(lambda: hosts(broker)["host-1"]["state"] == "ready", 10, "host-1 handed over")
        pid_file = host.root / "agent.pid"
        first = int(pid_file.read_text())
        os.kill(first, signal.SIGKILL)
        wait_until(lambda: ready_towers(broker) == 1, 15, "the dead tower unlinked")
        # Its link fails past the restart intensity; the host is provisioned again,
        # which starts a new agent.
        wait_for_towers(broker, 2, timeout=PROVISION_DEADLINE)
        assert int(pid_file.read_text()) != first
        assert "provisioning it again" in events(broker)
        # The whole host goes away for 15 s, as in a reboot: sshd, agent and NGINX.
        host.cleanup()
        wait_until(lambda: ready_towers(broker) == 1, 15, "the rebooting tower unlinked")
        time.sleep(15)
        host.start()
        wait_for_towers(broker, 2, timeout=PROVISION_DEADLINE)
        wait_until(lambda: hosts(broker)["host-1"]["state"] == "ready", 10, "host-1 back")
    finally:
        stop_broker(broker)


def test_provisioning_again_keeps_a_running_agent_unless_its_settings_changed(
    tmp_path, make_host  # noqa: F811
):
    require_nginx()
    host = make_host("host-1", broker_key(tmp_path))
    pid_file = host.root / "agent.pid"

    def provisioned_by_a_broker_with(capacity: int) -> tuple[int, list[dict], str]:
        """A broker with this tower capacity provisions the host; its agent's pid, the
        towers the broker sees, and the events."""
        broker = start_broker(tmp_path, towers=0, min_towers=1, scale_interval=0.5,
                              tower_capacity=capacity, hosts=[entry(host)])
        try:
            wait_for_towers(broker, 1, timeout=PROVISION_DEADLINE)
            [towers] = run_shell(broker, "towers --json")
            return int(pid_file.read_text()), json.loads(towers.stdout), events(broker)
        finally:
            stop_broker(broker)  # the tower stays up: it is the host's

    first, towers, _ = provisioned_by_a_broker_with(capacity=7)
    assert [tower["capacity"] for tower in towers] == [7]
    # The same settings: the agent found running is kept, with its sessions.
    same, towers, said = provisioned_by_a_broker_with(capacity=7)
    assert same == first and [tower["capacity"] for tower in towers] == [7]
    assert "restarted" not in said
    # Other settings: an agent left running would keep the old ones, so it is restarted.
    other, towers, said = provisioned_by_a_broker_with(capacity=9)
    assert other != first and [tower["capacity"] for tower in towers] == [9]
    assert "host-1: agent restarted: its settings changed" in said


def test_a_stale_nginx_pid_file_is_not_taken_for_the_towers_nginx(tmp_path):
    require_nginx()
    host = parse_host({"name": "tower-x", "address": "127.0.0.1", "user": "tower",
                       "trust_on_first_use": True})
    towers = {name: TowerPaths(str(tmp_path / name)) for name in ("tower-x", "tower-y")}
    for paths in towers.values():
        Path(paths.nginx).mkdir(parents=True)
        Path(f"{paths.nginx}/nginx.conf").write_text(
            "pid nginx.pid;\nerror_log error.log;\nevents {}\n")
    x = towers["tower-x"]
    subprocess.run(nginx_command(host, x), check=True, timeout=10)
    try:
        master = Path(f"{x.nginx}/nginx.pid").read_text().strip()
        # tower-y's NGINX died long ago; its pid file's pid is tower-x's master now.
        Path(f"{towers['tower-y'].nginx}/nginx.pid").write_text(f"{master}\n")
        running = {name: subprocess.run(["sh", "-c", _nginx_running(host, paths)]).returncode
                   for name, paths in towers.items()}
        assert running == {"tower-x": 0, "tower-y": 1}
    finally:
        subprocess.run(nginx_command(host, x, "-s", "stop"), timeout=10)
