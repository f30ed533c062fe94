"""Commands and files on a host over SSH (``broker.remote``), against a real sshd."""

from __future__ import annotations

import asyncio
import os
import stat
import time

import asyncssh
import pytest

from broker import remote
from broker.inventory import parse_host
from broker.state import provisioning_identity
from tests.broker.test_remote import AnyKey

from .hosts import SimulatedHost, make_host  # noqa: F401


def host_entry(host: SimulatedHost, **overrides):
    values = {"name": host.name, "address": host.address, "ssh_port": host.port,
              "user": host.user, "host_key": host.host_key}
    values.update(overrides)
    return parse_host(values)


@pytest.fixture
def identity(tmp_path):
    return provisioning_identity(tmp_path / "state")


def public(identity) -> str:
    return identity.with_name("id_ed25519.pub").read_text()


def test_commands_files_and_failures(tmp_path, make_host, identity):  # noqa: F811
    host = make_host("host-1", public(identity))

    async def main():
        connection = await remote.connect(host_entry(host), identity, tmp_path / "known")
        try:
            assert (await remote.run(connection, "echo hello", within=30)).strip() == "hello"
            await remote.put(connection, str(host.directory / "settings.toml"), b"a = 1\n")
            with pytest.raises(remote.RemoteError, match="exited with 3: broken"):
                await remote.run(connection, "echo broken >&2; exit 3", within=30)
            assert await remote.run(connection, "cat", within=30, stdin=b"given") == "given"
            with pytest.raises(remote.RemoteError, match="killed by SIGKILL: last words"):
                await remote.run(connection, "echo last words >&2; kill -9 $$", within=30)
            # A host that floods: refused past the cap, not kept in the broker's memory.
            for stream in ("", ">&2"):
                with pytest.raises(remote.RemoteError, match="more than 1024 KiB"):
                    await remote.run(connection, f"head -c 400000000 /dev/zero {stream}",
                                     within=30)
            still = await remote.run(connection, "echo still here", within=30)
            assert still.strip() == "still here"
        finally:
            await remote.close(connection)

    asyncio.run(main())
    written = host.directory / "settings.toml"
    assert written.read_bytes() == b"a = 1\n"
    assert stat.S_IMODE(written.stat().st_mode) == 0o600


def test_a_command_ends_on_the_host_at_its_time_even_once_its_connection_is_gone(
    tmp_path, make_host, identity  # noqa: F811
):
    host = make_host("host-1", public(identity))
    started, late = host.directory / "started", host.directory / "late"
    # What a step's script does: work that has to end before the next attempt begins.
    script = f"echo $$ > {started}.new && mv {started}.new {started}; sleep 4; touch {late}"

    async def main() -> None:
        connection = await remote.connect(host_entry(host), identity, tmp_path / "known")
        try:
            for stubborn in ("sleep 600", "trap '' TERM; sleep 600"):
                with pytest.raises(remote.RemoteError, match="ran past 1 s and was stopped"):
                    await remote.run(connection, stubborn, within=1)
            with pytest.raises(remote.RemoteError, match="exited with 124"):
                await remote.run(connection, "exit 124", within=30)
            # Cut off here (a step's deadline, a cancelled job): the host still ends it.
            command = asyncio.ensure_future(remote.run(connection, script, within=1))
            while not started.exists():
                await asyncio.sleep(0.05)
            command.cancel()
            with pytest.raises(asyncio.CancelledError):
                await command
            assert connection.connection.is_closed()
        finally:
            await remote.close(connection)

    asyncio.run(main())
    shell = int(started.read_text())
    for _ in range(300):
        if not os.path.exists(f"/proc/{shell}"):
            break
        time.sleep(0.05)
    else:
        raise AssertionError("the command's shell outlived its time on the host")
    assert not late.exists()


def test_trust_on_first_use_pins_the_first_key_and_refuses_another_after(
    tmp_path, make_host, identity  # noqa: F811
):
    host = make_host("host-1", public(identity))
    known_hosts = tmp_path / "known_hosts"
    trusting = host_entry(host, host_key="", trust_on_first_use=True)

    async def connect(entry):
        connection = await remote.connect(entry, identity, known_hosts)
        await remote.close(connection)

    asyncio.run(connect(trusting))
    [line] = known_hosts.read_text().splitlines()
    assert line == f"[{host.address}]:{host.port} {host.host_key}"
    asyncio.run(connect(trusting))  # the same key again: accepted
    assert len(known_hosts.read_text().splitlines()) == 1
    # The host shows another key (rebuilt, or an impostor on its address).
    for key_type in ("ssh-ed25519", "ecdsa-sha2-nistp256"):  # another type: refused too
        impostor = asyncssh.generate_private_key(key_type).export_public_key().decode()
        known_hosts.write_text(f"[{host.address}]:{host.port} {impostor}")
        with pytest.raises(remote.HostKeyRefused, match="other than the one pinned"):
            asyncio.run(connect(trusting))


def test_unreachable_and_refused_hosts_are_clear_errors(tmp_path, make_host, identity):  # noqa: F811
    stranger = asyncssh.generate_private_key("ssh-ed25519").export_public_key().decode()
    host = make_host("host-1", stranger)
    with pytest.raises(remote.RemoteError, match="refused the broker's key"):
        asyncio.run(remote.connect(host_entry(host), identity, tmp_path / "known"))
    host.stop()
    with pytest.raises(remote.RemoteError, match="cannot connect"):
        asyncio.run(remote.connect(host_entry(host), identity, tmp_path / "known"))


@pytest.mark.parametrize(("shown", "pinned", "connects"), [
    (("ssh-rsa", "ssh-ed25519"), "ssh-ed25519", True),  # a stock sshd: RSA comes first
    (("ssh-rsa", "ssh-ed25519"), "ssh-rsa", True),
    (("ssh-ed25519",), "ssh-rsa", False),  # refused for its key, not a lost connection
])
def test_a_host_with_several_keys_shows_the_pinned_one(tmp_path, identity, shown, pinned,
                                                       connects):
    keys = {kind: asyncssh.generate_private_key(kind) for kind in shown}
    keys.setdefault(pinned, asyncssh.generate_private_key(pinned))

    async def main():
        server = await asyncssh.create_server(
            AnyKey, "127.0.0.1", 0, server_host_keys=[keys[kind] for kind in shown])
        port = server.sockets[0].getsockname()[1]
        entry = parse_host({"name": "host-1", "address": "127.0.0.1", "ssh_port": port,
                            "user": "tower",
                            "host_key": keys[pinned].export_public_key().decode().strip()})
        try:
            connection = await remote.connect(entry, identity, tmp_path / "known")
            await remote.close(connection)
        finally:
            server.close()

    if connects:
        asyncio.run(main())
    else:
        with pytest.raises(remote.HostKeyRefused):
            asyncio.run(main())
