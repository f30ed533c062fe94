"""The asyncio side of the operators' shell: the SSH server (asyncssh) and its sessions.

Public-key authentication only; each authorized key carries a role. Everything a
session does is driven from trio (``broker.shell.server``) through the bridge: this
module only accepts connections, hands each session to a callback, and offers the few
I/O calls the trio side needs (read a line, write, wait for an interrupt, finish).

Ctrl-C in a terminal: at the prompt it throws away the line being typed; while a command
runs it interrupts the command (``OperatorSession.wait_for_interrupt``). The line editor
stays on while a command runs, so what is typed meanwhile is echoed and kept for the next
prompt (a Ctrl-C throws it away); only streaming commands (``top``, ``trace``) leave it,
so that any key stops them.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import asyncssh

from ..config import public_key_id
from ..pki import write_secret

MAX_LINE = 4096
CLOSE_TIMEOUT = 2.0
# Bounds on what operators' clients may hold of the broker's process: sessions open in
# all and per connection (each streaming view costs the broker's thread a read of every
# actor's counters per refresh), connections not yet logged in, and how long one may take
# to log in or to read what it is sent.
MAX_SESSIONS = 32
ADMIN_RESERVE = 8  # of MAX_SESSIONS, that read-only keys cannot take
# Channels open on one connection, whether or not a shell or command runs in them.
MAX_SESSIONS_PER_CONNECTION = 8
MAX_CONNECTIONS_LOGGING_IN = 16
# Connections logged in, in all.
MAX_CONNECTIONS = 64
# Time to begin logging in (the key exchange done), and then to log in: for a key's
# passphrase, or a security key's touch, too.
HANDSHAKE_TIMEOUT = 10.0
LOGIN_TIMEOUT = 30.0
WRITE_TIMEOUT = 10.0
# What a client may send on a session before the broker takes it in. Keys are taken
# (and echoed) as they come, so this bounds the work one read of the connection makes
# the broker's thread do; and a session's input waits while its output does.
CHANNEL_WINDOW = 8192
# A client quiet this long is asked whether it is there, and dropped after this many
# unanswered asks: a vanished one would hold its sessions.
KEEPALIVE_INTERVAL = 15.0
KEEPALIVE_COUNT_MAX = 3
CTRL_C = "\x03"


class SessionGone(Exception):
    """The operator's side of the session is closed: nothing more can be written."""


class OperatorSession:
    """One SSH session: an interactive shell or one command (``ssh host tree``)."""

    def __init__(self, process: asyncssh.SSHServerProcess, role: str) -> None:
        self.process = process
        self.role = role
        self.command: str | None = process.command
        self.interactive = self.command is None
        # A pseudo-terminal (an interactive ``ssh``, or ``ssh -t``): keys can interrupt.
        self.has_terminal = bool(process.channel.get_terminal_type())
        self.username = process.get_extra_info("username") or ""
        self.peer = str(process.get_extra_info("peername") or "")
        self.ended = asyncio.Event()
        # Completion candidates for the line being typed, refreshed by the trio side.
        self.complete: Callable[[str], list[str]] = lambda line: []
        # Whether a line is being read (the prompt is up): Ctrl-C then edits the line;
        # otherwise a command runs, and Ctrl-C sets ``_interrupted`` for it.
        self._reading = False
        self._interrupted = asyncio.Event()

    async def read_line(self, prompt: str = "") -> str | None:
        """Write ``prompt``, then read the next line typed; None when the client closed
        its input.

        Ctrl-C throws away the line being typed and gives an empty line.
        """
        # From before the prompt shows: a Ctrl-C from then on is the prompt's. One that
        # came after the last command ended is not for the next one.
        self._reading = True
        self._interrupted.clear()
        try:
            if prompt:
                await self.write(prompt)
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
                # Cut short without a terminal when longer than asyncssh buffers.
                cut = not line.endswith("\n") and not self.process.stdin.at_eof()
                if cut:
                    await self._skip_to_end_of_line()
                line = line.rstrip("\r\n")
                if cut or len(line) > MAX_LINE:
                    await self.write_error(f"line too long: at most {MAX_LINE} characters\n")
                    return ""
                return line
        finally:
            self._reading = False

    async def _skip_to_end_of_line(self) -> None:
        try:
            while rest := await self.process.stdin.readline():
                if rest.endswith("\n"):
                    return
        except (asyncssh.Error, asyncssh.BreakReceived, asyncssh.SignalReceived,
                asyncssh.TerminalSizeChanged, OSError):
            return  # the next read says what became of the session

    async def wait_for_interrupt(self, any_key: bool) -> bool:
        """Until the operator interrupts the command that runs, or goes away (terminals only).

        Returns True for an interrupt: Ctrl-C pressed since the command's line was read
        (for a streaming command, a break or signal from the client too; during another
        command those wait in the input and reach the next prompt as a Ctrl-C). With
        ``any_key`` (a streaming command), the line editor is left meanwhile, so that
        any key stops the command and is not echoed: False for a key other than Ctrl-C.
        False when the session closed.
        """
        if self._interrupted.is_set():
            return True
        channel = self.process.channel
        waits = [self._interrupted.wait(), channel.wait_closed()]
        if any_key:
            # Out of line mode, so that one key is enough and is not echoed.
            channel.set_line_mode(False)
            waits.append(self._read_key())
        tasks = [asyncio.ensure_future(wait) for wait in waits]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            if any_key and not self.process.is_closing():
                channel.set_line_mode(True)
        if self._interrupted.is_set():
            return True
        key = tasks[-1]
        return any_key and key in done and key.result()

    async def _read_key(self) -> bool:
        """The next key, out of line mode: whether it interrupts (Ctrl-C, a break)."""
        while True:
            try:
                # All that came, so that no rest of a key's escape sequence is left over
                # for the next line.
                return CTRL_C in await self.process.stdin.read(MAX_LINE)
            except asyncssh.TerminalSizeChanged:
                continue
            except (asyncssh.BreakReceived, asyncssh.SignalReceived):
                return True
            except (asyncssh.DisconnectError, BrokenPipeError, ConnectionError):
                return False

    def _interrupt_key(self, line: str, position: int) -> tuple[str, int]:
        """Ctrl-C in the line editor: at the prompt, a signal (``read_line`` answers it);
        while a command runs, that command is interrupted and the line typed meanwhile
        is thrown away."""
        if self._reading:
            return "INT", -1
        self._interrupted.set()
        return "", 0

    async def wait_closed(self) -> None:
        """Until the client closes the session (for a command run without a terminal)."""
        await self.process.channel.wait_closed()

    async def write(self, text: str) -> None:
        """Write to the operator. Raises ``SessionGone`` once the session is closed."""
        await self._write(self.process.stdout, text)

    async def write_error(self, text: str) -> None:
        """Write an error message: to stderr without a terminal, so that a script tells
        it from the output (``ssh broker sessions --json | jq``); a terminal shows it in
        line with the rest. Raises ``SessionGone`` once the session is closed."""
        stream = self.process.stdout if self.has_terminal else self.process.stderr
        await self._write(stream, text)

    async def _write(self, stream: asyncssh.SSHWriter, text: str) -> None:
        if self.process.is_closing():
            raise SessionGone()
        try:
            stream.write(text)
            await asyncio.wait_for(stream.drain(), WRITE_TIMEOUT)
        except (asyncssh.DisconnectError, BrokenPipeError, ConnectionError):
            raise SessionGone() from None
        except TimeoutError:
            # A client that stops reading would hold the command (a trace past its
            # deadline) and what it has written, for as long as the connection lasts;
            # a close would still keep the unsent output for it.
            self.process.channel.abort()
            raise SessionGone() from None

    async def finish(self, status: int) -> None:
        if not self.process.is_closing():
            self.process.exit(status)
        self.ended.set()

    def _complete_key(self, line: str, position: int) -> tuple[str, int]:
        """Tab: the word being typed becomes the one candidate (and a space, unless it is
        a path that goes on), or as much as all candidates share."""
        candidates = self.complete(line[:position])
        if not candidates:
            return line, position
        head = line[:position]
        start = head.rfind(" ") + 1
        if len(candidates) == 1:
            word = candidates[0] if candidates[0].endswith("/") else candidates[0] + " "
        else:
            word = os.path.commonprefix(candidates)
        completed = head[:start] + word
        if len(completed) < len(head):
            return line, position
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
    keys = {public_key_id(text): role for text, role in authorized.items()}
    connections: set[asyncssh.SSHServerConnection] = set()
    logging_in: set[asyncssh.SSHServerConnection] = set()
    logged_in: set[asyncssh.SSHServerConnection] = set()
    # Channels open on each connection, and sessions running (a shell or command).
    channels: dict[asyncssh.SSHServerConnection, int] = {}
    running = 0

    class Server(asyncssh.SSHServer):
        handshake: asyncio.TimerHandle | None = None

        def connection_made(self, connection: asyncssh.SSHServerConnection) -> None:
            self.connection = connection
            connections.add(connection)
            if (len(logging_in) >= MAX_CONNECTIONS_LOGGING_IN
                    or len(logged_in) >= MAX_CONNECTIONS):
                connection.close()  # as OpenSSH's MaxStartups does
                return
            logging_in.add(connection)
            # Until it begins to log in: a client that connects and says nothing holds a
            # slot for less long.
            self.handshake = asyncio.get_running_loop().call_later(
                HANDSHAKE_TIMEOUT, connection.close)

        def auth_completed(self) -> None:
            logging_in.discard(self.connection)
            if len(logged_in) >= MAX_CONNECTIONS:  # others logged in meanwhile
                self.connection.close()
                return
            logged_in.add(self.connection)

        def connection_lost(self, error: Exception | None) -> None:
            connections.discard(self.connection)
            logging_in.discard(self.connection)
            logged_in.discard(self.connection)
            if self.handshake is not None:
                self.handshake.cancel()

        def begin_auth(self, username: str) -> bool:
            if self.handshake is not None:
                self.handshake.cancel()
            return True

        def session_requested(self) -> Any:
            connection = self.connection
            if channels.get(connection, 0) >= MAX_SESSIONS_PER_CONNECTION:
                raise asyncssh.ChannelOpenError(
                    asyncssh.OPEN_RESOURCE_SHORTAGE,
                    f"at most {MAX_SESSIONS_PER_CONNECTION} sessions per connection")
            channel = connection.create_server_channel(
                "utf-8", "replace", CHANNEL_WINDOW, CHANNEL_WINDOW)
            # Environment variables are not taken (asyncssh would keep every one).
            channel._process_env_request = _refuse
            channels[connection] = channels.get(connection, 0) + 1

            def closed() -> None:
                channels[connection] -= 1
                if not channels[connection]:
                    del channels[connection]

            return channel, _OperatorProcess(handle, closed)

        def public_key_auth_supported(self) -> bool:
            return True

        def validate_public_key(self, username: str, key: asyncssh.SSHKey) -> bool:
            role = keys.get(public_key_id(key.export_public_key().decode()))
            if role is None:
                return False
            self.connection.set_extra_info(role=role)
            return True

    async def handle(process: asyncssh.SSHServerProcess) -> None:
        nonlocal running
        role = process.get_extra_info("role")
        if role is None:
            # Only a key validated above carries a role; anything else gets nothing.
            process.exit(3)
            return
        room = MAX_SESSIONS - (0 if role == "admin" else ADMIN_RESERVE)
        if running >= room:
            process.stderr.write("too many shell sessions are open; close one and retry\n")
            process.exit(1)
            return
        session = OperatorSession(process, role)
        if session.has_terminal:
            process.channel.register_key(CTRL_C, session._interrupt_key)
            if session.interactive:
                process.channel.register_key("\t", session._complete_key)
        running += 1
        try:
            on_session(session)
            await session.ended.wait()
        finally:
            running -= 1

    acceptor = await asyncssh.create_server(
        Server,
        host,
        port,
        server_host_keys=[str(host_key)],
        # Sessions are made by ``Server.session_requested``: UTF-8, where a byte that is
        # not UTF-8 is the operator's typo, not a reason to drop the connection
        # (asyncssh's strict default) with every channel on it.
        # The shell never needs the operator's keys: no agent socket on this host.
        agent_forwarding=False,
        line_history=200,
        # One more than a line may have: the editor keeps it, read_line refuses it.
        max_line_length=MAX_LINE + 1,
        password_auth=False,
        kbdint_auth=False,
        login_timeout=LOGIN_TIMEOUT,
        keepalive_interval=KEEPALIVE_INTERVAL,
        keepalive_count_max=KEEPALIVE_COUNT_MAX,
        gss_host=None,
        x509_trusted_certs=None,
    )
    return OperatorServer(acceptor, connections)


class _OperatorProcess(asyncssh.SSHServerProcess):
    """An operator's session, whose input waits while its output waits to be sent: keys
    are echoed as they come, and a client that sent them without reading its output
    would have the broker keep every echo (and take keys in as fast as they came)."""

    def __init__(self, handle: Callable[..., Any], closed: Callable[[], None]) -> None:
        super().__init__(handle, None, asyncssh.sftp.MIN_SFTP_VERSION, False)
        self._closed = closed
        self._output_held = False

    def _should_pause_reading(self) -> bool:
        return self._output_held or super()._should_pause_reading()

    def pause_writing(self) -> None:
        super().pause_writing()
        self._output_held = True
        self._maybe_pause_reading()

    def resume_writing(self) -> None:
        super().resume_writing()
        self._output_held = False
        self._maybe_resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        self._closed()


def _refuse(packet: Any) -> bool:
    return False


class OperatorServer:
    """The listening server and the connections it has accepted."""

    def __init__(
        self, acceptor: asyncssh.SSHAcceptor, connections: set[asyncssh.SSHServerConnection]
    ) -> None:
        self.acceptor = acceptor
        self.connections = connections

    def get_port(self) -> int:
        return self.acceptor.get_port()


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
