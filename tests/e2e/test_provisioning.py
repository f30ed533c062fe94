"""Provisioning towers on real hosts: OpenSSH servers and NGINX on loopback.

Each simulated host is a real sshd (``tests/e2e/hosts.py``) whose authorized key is the
broker's provisioning identity. The broker connects over SSH, has the host make its key
and request, signs it, writes the tower's NGINX site and starts NGINX and the agent
there, then links to the tower through NGINX over mutual TLS. Sessions then run on
those towers.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import trio

from actors import bridge
from broker.client import start_session
from broker.state import provisioning_identity

from .conftest import RunningBroker, start_broker, stop_broker, wait_for_towers
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


def hosts_state(broker: RunningBroker) -> dict:
    return {}


def wait_until(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.2)
    raise TimeoutError(f"not within {timeout} s: {what}")


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
    finally:
        stop_broker(broker)
