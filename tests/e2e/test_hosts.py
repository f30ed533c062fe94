"""The simulated hosts of ``tests.e2e.hosts``: real sshd servers, reached with asyncssh."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time

import asyncssh
import pytest

from .hosts import SimulatedHost, make_host  # noqa: F401  (make_host is a fixture)


def pinned(host: SimulatedHost, host_key: str | None = None) -> asyncssh.SSHKnownHosts:
    """Known hosts that trust ``host_key`` (by default the host's own) for this host only."""
    return asyncssh.import_known_hosts(
        f"[{host.address}]:{host.port} {host_key or host.host_key}\n")


def connect(host: SimulatedHost, key: asyncssh.SSHKey, host_key: str | None = None):
    return asyncssh.connect(host.address, host.port, username=host.user, client_keys=[key],
                            known_hosts=pinned(host, host_key), agent_path=None)


async def run(host: SimulatedHost, key: asyncssh.SSHKey, command: str) -> str:
    async with connect(host, key) as connection:
        return (await connection.run(command, check=True, timeout=10)).stdout


def new_key() -> asyncssh.SSHKey:
    return asyncssh.generate_private_key("ssh-ed25519")


def public(key: asyncssh.SSHKey) -> str:
    return key.export_public_key().decode()


@pytest.fixture
def key() -> asyncssh.SSHKey:
    return new_key()


@pytest.fixture
def host(make_host, key) -> SimulatedHost:  # noqa: F811  (the fixture)
    return make_host("tower-1", public(key))


def test_commands_and_sftp(host, key, tmp_path):
    local = tmp_path / "local.txt"
    local.write_bytes(b"payload\n")
    remote = host.directory / "uploaded.txt"
    back = tmp_path / "back.txt"

    async def main():
        async with connect(host, key) as connection:
            hello = await connection.run("echo hello", check=True)
            user = await connection.run("id -un", check=True)
            async with connection.start_sftp_client() as sftp:
                await sftp.put(str(local), str(remote))
                await sftp.get(str(remote), str(back))
        return hello.stdout, user.stdout

    hello, user = asyncio.run(main())
    assert hello == "hello\n"
    assert user == f"{host.user}\n"
    assert remote.read_bytes() == back.read_bytes() == b"payload\n"


def test_wrong_host_key_is_not_verifiable(host, key):
    async def main():
        async with connect(host, key, host_key=public(new_key())):
            pass

    with pytest.raises(asyncssh.HostKeyNotVerifiable):
        asyncio.run(main())


def test_unauthorized_key_is_refused(host):
    async def main():
        async with connect(host, new_key()):
            pass

    with pytest.raises(asyncssh.PermissionDenied):
        asyncio.run(main())


def test_stop_and_start_again(host, key):
    port = host.port
    host.stop()
    with pytest.raises(ConnectionRefusedError):
        asyncio.run(run(host, key, "true"))
    host.start()
    assert host.port == port
    assert asyncio.run(run(host, key, "echo back")) == "back\n"


def test_pause_and_resume(host, key):
    host.pause()
    try:
        with pytest.raises(TimeoutError):
            asyncio.run(asyncio.wait_for(run(host, key, "true"), 1.0))
    finally:
        host.resume()
    assert asyncio.run(run(host, key, "echo awake")) == "awake\n"


def test_cleanup_kills_detached_processes(host, key):
    marker = f"{host.directory}/marker"
    asyncio.run(run(
        host, key,
        f"setsid {sys.executable} -c 'import time; time.sleep(1000)' {marker}"
        " < /dev/null > /dev/null 2>&1 &"))

    def running() -> bool:
        return subprocess.run(["pgrep", "-f", marker], capture_output=True).returncode == 0

    deadline = time.monotonic() + 5
    while not running():
        assert time.monotonic() < deadline, "the detached process never started"
        time.sleep(0.02)
    host.cleanup()
    assert not running()
