"""``broker.remote`` against an SSH server in the test's own event loop (the real
sshd's tests are in ``tests/e2e/test_remote.py``)."""

from __future__ import annotations

import asyncio
import errno

import asyncssh
import pytest

from broker import remote
from broker.inventory import parse_host
from broker.state import provisioning_identity


class AnyKey(asyncssh.SSHServer):
    def begin_auth(self, username: str) -> bool:
        return True

    def public_key_auth_supported(self) -> bool:
        return True

    def validate_public_key(self, username: str, key: asyncssh.SSHKey) -> bool:
        return True


def test_a_host_key_that_cannot_be_pinned_closes_the_connection(tmp_path, monkeypatch):
    identity = provisioning_identity(tmp_path / "state")
    opened: list[asyncssh.SSHClientConnection] = []
    connect = asyncssh.connect

    async def recorded(*args, **kwargs) -> asyncssh.SSHClientConnection:
        connection = await connect(*args, **kwargs)
        opened.append(connection)
        return connection

    def disk_full(path, data) -> None:
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(asyncssh, "connect", recorded)
    monkeypatch.setattr(remote, "write_secret", disk_full)

    async def main() -> None:
        server = await asyncssh.create_server(
            AnyKey, "127.0.0.1", 0,
            server_host_keys=[asyncssh.generate_private_key("ssh-ed25519")])
        port = server.sockets[0].getsockname()[1]
        entry = parse_host({"name": "host-1", "address": "127.0.0.1", "ssh_port": port,
                            "user": "tower", "trust_on_first_use": True})
        try:
            with pytest.raises(OSError, match="No space left"):
                await remote.connect(entry, identity, tmp_path / "known_hosts")
            [connection] = opened
            assert connection.is_closed()
        finally:
            server.close()

    asyncio.run(main())
