"""Commands and files on a tower host over SSH (asyncssh; the asyncio side).

Provisioning jobs call these through ``actors.bridge.call_asyncio``. Authentication is
the broker's key only. The host's key must be the one pinned in the inventory; a host
marked ``trust_on_first_use`` has the key it shows first pinned in the state directory's
``known_hosts``, and must show that same key ever after.
"""

from __future__ import annotations

import asyncio
import contextlib
import shlex
from collections.abc import Awaitable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import asyncssh
from asyncssh.public_key import get_default_certificate_algs, get_default_public_key_algs

from .inventory import Host
from .pki import write_secret

T = TypeVar("T")

CONNECT_TIMEOUT = 10.0
# What an error message quotes of a failed command's output.
OUTPUT_TAIL = 600
# The most a command may write on its output or its errors; what provisioning reads is
# a few KiB (a certificate request, NGINX's test): more is a host out of order.
MAX_OUTPUT = 1 << 20
# A command past its time gets SIGTERM, and SIGKILL this many seconds later if it is
# still there (coreutils' ``timeout``).
KILL_GRACE = 2
TIMED_OUT = 124


class HostKeyRefused(Exception):
    """The host showed a key other than the pinned one (or none is pinned): never retried."""


class RemoteError(Exception):
    """A connection or command on the host failed; retrying may help."""


class CutOff(RemoteError):
    """The broker stopped following a command (its connection broke, or it wrote too
    much): it may run on there, until its time."""


@dataclass
class HostConnection:
    host: Host
    connection: asyncssh.SSHClientConnection

    @property
    def host_key(self) -> str:
        """The key the host showed, as one ``type base64`` line: which machine it is."""
        shown = self.connection.get_server_host_key()
        assert shown is not None
        return " ".join(shown.export_public_key().decode().split()[:2])


async def connect(host: Host, identity: Path, known_hosts: Path) -> HostConnection:
    """Connect to ``host`` as its user with the broker's key.

    Raises:
        HostKeyRefused: the host key is not the pinned one.
        RemoteError: the connection or authentication failed.
        OSError: the host's first key could not be pinned in ``known_hosts``.
    """
    pinned = _pinned_key(host, known_hosts)
    try:
        connection = await asyncio.wait_for(
            asyncssh.connect(
                host.address,
                port=host.ssh_port,
                username=host.user,
                client_keys=[str(identity)],
                known_hosts=None if pinned is None else asyncssh.import_known_hosts(
                    f"{_known_hosts_pattern(host)} {pinned}\n"
                ),
                server_host_key_algs=(
                    "default" if pinned is None else _host_key_algorithms(pinned)
                ),
                agent_path=None,
                password=None,
                kbdint_auth=False,
                gss_auth=False,
                config=None,
            ),
            CONNECT_TIMEOUT,
        )
    except asyncssh.HostKeyNotVerifiable:
        raise HostKeyRefused(
            f"{host.address}:{host.ssh_port} showed a host key other than the one pinned "
            f"for {host.name}; if the host was rebuilt, pin its new key in the inventory"
        ) from None
    except asyncssh.PermissionDenied:
        raise RemoteError(f"{host.user}@{host.address}:{host.ssh_port} refused the broker's "
                          "key; add its provisioning/id_ed25519.pub to authorized_keys") from None
    except (OSError, asyncssh.Error, asyncio.TimeoutError) as error:
        reason = str(error) or type(error).__name__
        raise RemoteError(
            f"cannot connect to {host.address}:{host.ssh_port}: {reason}"
        ) from None
    if pinned is None:
        shown = connection.get_server_host_key()
        assert shown is not None
        try:
            _pin(known_hosts, host, shown.export_public_key().decode().strip())
        except OSError:
            await close(HostConnection(host, connection))
            raise
    return HostConnection(host, connection)


async def run(
    host: HostConnection, command: str, *, within: int, stdin: bytes | None = None
) -> str:
    """Run a shell command (``sh``) for at most ``within`` seconds; returns its output.

    The host ends it there, with everything it started in its process group (SIGTERM,
    then SIGKILL ``KILL_GRACE`` seconds later), whether or not this connection is still
    there to see it: OpenSSH signals nothing to a command without a terminal when its
    connection drops, so a cancelled command would otherwise run on.

    Raises:
        RemoteError: it exited with a status other than 0 (its output is in the message),
            or ran past ``within``.
        CutOff: the connection broke first.
    """
    bounded = f"timeout -k {KILL_GRACE} {within} sh -c {shlex.quote(command)}"
    loop = asyncio.get_running_loop()
    started = loop.time()
    try:
        result = await _abort_if_cancelled(host, _run(host.connection, bounded, stdin))
    except (OSError, asyncssh.Error) as error:
        raise CutOff(f"{host.host.name}: the connection broke: {error}") from None
    stdout = result.stdout.decode(errors="replace")
    if result.status != 0:
        stderr = result.stderr.decode(errors="replace")
        output = (stderr.strip() or stdout.strip())[-OUTPUT_TAIL:]
        # ``timeout`` exits with TIMED_OUT, or dies of its SIGKILL; a command may do
        # either of its own accord, sooner.
        if (result.status == TIMED_OUT or result.signal == "KILL") and (
                loop.time() - started >= within):
            raise RemoteError(f"ran past {within} s and was stopped on the host: {output}")
        if result.signal:
            raise RemoteError(f"killed by SIG{result.signal}: {output}")
        if result.status is None:
            raise CutOff(f"the channel closed before the command finished: {output}")
        raise RemoteError(f"exited with {result.status}: {output}")
    return stdout


@dataclass(frozen=True)
class _Finished:
    status: int | None  # None: the channel closed first (asyncssh: -1 when ``signal``)
    signal: str
    stdout: bytes
    stderr: bytes


async def _run(
    connection: asyncssh.SSHClientConnection, command: str, stdin: bytes | None
) -> _Finished:
    process = await connection.create_process(command, encoding=None)
    try:
        if stdin:
            process.stdin.write(stdin)
        process.stdin.write_eof()
        # Both at once: a host that fills one while the other is read would otherwise
        # wait on the channel's window for good.
        read = await asyncio.gather(
            _read_at_most(process, process.stdout, "output"),
            _read_at_most(process, process.stderr, "errors"),
            return_exceptions=True,
        )
        for outcome in read:
            if isinstance(outcome, BaseException):
                raise outcome
        await process.wait_closed()
    finally:
        process.close()
    signal = process.exit_signal[0] if process.exit_signal else ""
    return _Finished(process.exit_status, signal, *read)  # type: ignore[arg-type]


async def _read_at_most(
    process: asyncssh.SSHClientProcess, stream: asyncssh.SSHReader, name: str
) -> bytes:
    data = bytearray()
    while chunk := await stream.read(65536):
        data += chunk
        if len(data) > MAX_OUTPUT:
            process.close()  # which need not end it on the host
            raise CutOff(f"the command wrote more than {MAX_OUTPUT // 1024} KiB on its "
                              f"{name}; the host is not as provisioning expects it")
    return bytes(data)


async def put(host: HostConnection, path: str, data: bytes) -> None:
    """Write a file readable by its owner only, atomically (a temporary file, renamed).

    Raises:
        RemoteError: the file cannot be written.
    """
    try:
        await _abort_if_cancelled(host, _put(host.connection, path, data))
    except (OSError, asyncssh.Error) as error:
        raise RemoteError(f"{host.host.name}: cannot write {path}: {error}") from None


async def _put(connection: asyncssh.SSHClientConnection, path: str, data: bytes) -> None:
    temporary = f"{path}.new"
    async with connection.start_sftp_client() as sftp:
        async with sftp.open(temporary, "wb", attrs=asyncssh.SFTPAttrs(permissions=0o600)) as file:
            await file.write(data)
        await sftp.chmod(temporary, 0o600)
        await sftp.posix_rename(temporary, path)


async def _abort_if_cancelled(host: HostConnection, operation: Awaitable[T]) -> T:
    """Await ``operation``; if cancelled (a step's deadline), drop the connection first.

    A hung host never answers the channel close that a cancelled operation's clean-up
    waits for; dropping the connection ends every such wait at once.
    """
    task = asyncio.ensure_future(operation)
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        host.connection.abort()
        task.cancel()
        with contextlib.suppress(BaseException):
            await task
        raise


async def close(host: HostConnection) -> None:
    host.connection.close()
    await host.connection.wait_closed()


def _host_key_algorithms(pinned: str) -> list[str]:
    """The pinned key's own algorithms first, so that a host with keys of several types
    shows that one; then every other, so that a host without it shows another and is
    refused for its key at once, not retried as a lost connection."""
    first = [name.decode() for name in asyncssh.import_public_key(pinned).sig_algorithms]
    others = get_default_certificate_algs() + get_default_public_key_algs()
    return first + [name.decode() for name in others if name.decode() not in first]


def _known_hosts_pattern(host: Host) -> str:
    return host.address if host.ssh_port == 22 else f"[{host.address}]:{host.ssh_port}"


def _pinned_key(host: Host, known_hosts: Path) -> str | None:
    if host.host_key:
        return host.host_key
    pattern = _known_hosts_pattern(host)
    try:
        lines = known_hosts.read_text().splitlines()
    except FileNotFoundError:
        return None
    for line in lines:
        fields = line.split()
        if len(fields) >= 3 and fields[0] == pattern:
            return " ".join(fields[1:3])
    return None


def _pin(known_hosts: Path, host: Host, key: str) -> None:
    previous = known_hosts.read_text() if known_hosts.exists() else ""
    write_secret(known_hosts, f"{previous}{_known_hosts_pattern(host)} {key}\n".encode())
