"""The asyncio side of the operators' shell: the SSH server (asyncssh) and its sessions.

Public-key authentication only; each authorized key carries a role. Everything a
session does is driven from trio (``broker.shell.server``) through the bridge: this
module only accepts connections, hands each session to a callback, and offers the few
I/O calls the trio side needs (read a line, write, finish).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import asyncssh

from ..pki import write_secret

MAX_LINE = 4096
CLOSE_TIMEOUT = 2.0


class SessionGone(Exception):
    """The operator's side of the session is closed: nothing more can be written."""


class OperatorSession:
    """One SSH session: an interactive shell or one command (``ssh host tree``)."""

    def __init__(self, process: asyncssh.SSHServerProcess, role: str) -> None:
        self.process = process
        self.role = role
        self.command: str | None = process.command
        self.interactive = self.command is None
        self.username = process.get_extra_info("username") or ""
        self.peer = str(process.get_extra_info("peername") or "")
        self.ended = asyncio.Event()
        # Completion candidates for the line being typed, refreshed by the trio side.
        self.complete: Callable[[str], list[str]] = lambda line: []

    async def read_line(self) -> str | None:
        """The next line typed, or None when the client closed its input.

        Ctrl-C throws away the line being typed and gives an empty line.
        """
        while True:
            try:
                line = await self.process.stdin.readline()
            except asyncssh.TerminalSizeChanged:
                continue
            except (asyncssh.BreakReceived, asyncssh.SignalReceived):
                self.process.channel.clear_input()
                await self.write("^C\n")
                return ""
            except (asyncssh.DisconnectError, BrokenPipeError, ConnectionError):
                return None
            if line == "":
                return None
            return line.rstrip("\r\n")[:MAX_LINE]

    async def wait_for_interrupt(self) -> None:
        """Until the operator presses a key (Ctrl-C included) or goes away."""
        channel = self.process.channel
        # Out of line mode, so that one key is enough and is not echoed.
        channel.set_line_mode(False)
        try:
            while True:
                try:
                    await self.process.stdin.read(1)
                    return
                except asyncssh.TerminalSizeChanged:
                    continue
                except (asyncssh.BreakReceived, asyncssh.SignalReceived):
                    return
                except (asyncssh.DisconnectError, BrokenPipeError, ConnectionError):
                    return
        finally:
            channel.set_line_mode(True)

    async def wait_closed(self) -> None:
        """Until the client closes the session (for a command run without a terminal)."""
        await self.process.channel.wait_closed()

    async def write(self, text: str) -> None:
        """Write to the operator. Raises ``SessionGone`` once the session is closed."""
        if self.process.is_closing():
            raise SessionGone()
        try:
            self.process.stdout.write(text)
            await self.process.stdout.drain()
        except (asyncssh.DisconnectError, BrokenPipeError, ConnectionError):
            raise SessionGone() from None

    async def finish(self, status: int) -> None:
        if not self.process.is_closing():
            self.process.exit(status)
        self.ended.set()

    def _complete_key(self, line: str, position: int) -> tuple[str, int]:
        candidates = self.complete(line[:position])
        if len(candidates) != 1:
            return line, position
        head = line[:position]
        # Replace the word being typed by the one candidate.
        start = head.rfind(" ") + 1
        completed = head[:start] + candidates[0] + " "
        return completed + line[position:], len(completed)


async def start_server(
    host: str,
    port: int,
    host_key: Path,
    authorized: dict[str, str],
    on_session: Callable[[OperatorSession], None],
) -> OperatorServer:
    """Listen for operators.

    Args:
        host_key: the server's private host key (made by :func:`ensure_host_key`).
        authorized: each authorized public key (OpenSSH text, ``type base64``) and its
            role (``"admin"`` or ``"read-only"``).
        on_session: called with each new session; the session lasts until its
            ``finish`` is called.

    Returns:
        The listening server; ``close()`` it to stop.
    """
    keys = {_key_id(text): role for text, role in authorized.items()}
    connections: set[asyncssh.SSHServerConnection] = set()

    class Server(asyncssh.SSHServer):
        def connection_made(self, connection: asyncssh.SSHServerConnection) -> None:
            self.connection = connection
            connections.add(connection)

        def connection_lost(self, error: Exception | None) -> None:
            connections.discard(self.connection)

        def begin_auth(self, username: str) -> bool:
            return True

        def public_key_auth_supported(self) -> bool:
            return True

        def validate_public_key(self, username: str, key: asyncssh.SSHKey) -> bool:
            role = keys.get(_key_id(key.export_public_key().decode()))
            if role is None:
                return False
            self.connection.set_extra_info(role=role)
            return True

    async def handle(process: asyncssh.SSHServerProcess) -> None:
        role = process.get_extra_info("role")
        if role is None:
            # Only a key validated above carries a role; anything else gets nothing.
            process.exit(3)
            return
        session = OperatorSession(process, role)
        if session.interactive and process.channel.get_terminal_type():
            process.channel.register_key("\t", session._complete_key)
        on_session(session)
        await session.ended.wait()

    acceptor = await asyncssh.create_server(
        Server,
        host,
        port,
        server_host_keys=[str(host_key)],
        process_factory=handle,
        encoding="utf-8",
        line_history=200,
        max_line_length=MAX_LINE,
        password_auth=False,
        kbdint_auth=False,
        gss_host=None,
        x509_trusted_certs=None,
    )
    return OperatorServer(acceptor, connections)


class OperatorServer:
    """The listening server and the connections it has accepted."""

    def __init__(
        self, acceptor: asyncssh.SSHAcceptor, connections: set[asyncssh.SSHServerConnection]
    ) -> None:
        self.acceptor = acceptor
        self.connections = connections

    def get_port(self) -> int:
        return self.acceptor.get_port()


def _key_id(text: str) -> str:
    """An OpenSSH public key's type and data, without its comment."""
    return " ".join(text.split()[:2])


def ensure_host_key(path: Path) -> None:
    """Make the server's host key once; it is kept so operators' known_hosts stay true."""
    if not path.exists():
        _write_key_pair(path, asyncssh.generate_private_key("ssh-ed25519"))


def ensure_operator_key(path: Path) -> str:
    """The key ``broker shell`` uses, made once; returns its public key text."""
    if not path.exists():
        _write_key_pair(path, asyncssh.generate_private_key("ssh-ed25519", comment="broker shell"))
    return asyncssh.read_private_key(str(path)).export_public_key().decode()


def _write_key_pair(path: Path, key: asyncssh.SSHKey) -> None:
    # The public half first: a private key on disk is then always complete with its pair.
    write_secret(Path(f"{path}.pub"), key.export_public_key())
    write_secret(path, key.export_private_key())


def read_public_keys(paths: Sequence[Path]) -> list[str]:
    """Every public key in these files (``*.pub`` or ``authorized_keys`` style); files
    that are missing or do not parse are skipped."""
    found = []
    for path in paths:
        try:
            keys: list[Any] = asyncssh.read_public_key_list(str(path))
        except (OSError, ValueError, asyncssh.KeyImportError):
            continue
        found.extend(key.export_public_key().decode() for key in keys)
    return found


async def close_server(server: OperatorServer) -> None:
    """Stop listening and close every connection (authenticated or not)."""
    server.acceptor.close()
    for connection in list(server.connections):
        connection.close()
    try:
        await asyncio.wait_for(server.acceptor.wait_closed(), CLOSE_TIMEOUT)
    except asyncio.TimeoutError:
        pass
