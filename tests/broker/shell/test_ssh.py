"""The operators' SSH server itself, over real SSH: what one client may hold of the
broker's process (sessions, connections not logged in, a trace it does not read)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import asyncio
import asyncssh
import pytest
import trio

from actors import Actor, ChildSpec, Supervisor, SupervisorFlags, bridge, open_system
from actors.bridge import call_asyncio
from broker.provisioning import HostBoard
from broker.shell import ssh
from broker.shell.server import ShellFiles, ShellServer
from broker.towers import TowerDirectory

DEADLINE = 30.0


class Worker(Actor):
    async def receive(self, message: Any) -> None:
        pass


def run_with_shell(
    tmp: Path, test: Callable[[Any, int, Path], Awaitable[None]], key_format: str = "openssh"
) -> None:
    """``test(system, port, key)`` with a real shell listening; ``key`` is read-only (and
    authorized as written in ``key_format``)."""
    host_key, key = tmp / "host-key", tmp / "operator"
    ssh.ensure_host_key(host_key)
    private = asyncssh.generate_private_key("ssh-ed25519")
    private.write_private_key(str(key))
    authorized = {private.export_public_key(key_format).decode().strip(): "read-only"}
    files = ShellFiles(host_key, tmp / "operator-key", tmp / "known_hosts", tmp / "port")

    async def main() -> None:
        children = [
            ChildSpec("towers", lambda: Supervisor([ChildSpec("tower-1", Worker)],
                                                   SupervisorFlags())),
            ChildSpec("shell", lambda: ShellServer(
                "127.0.0.1", 0, files, authorized, TowerDirectory(stale_after=3.0),
                HostBoard(()))),
        ]
        async with open_system("broker", children=children) as system:
            with trio.fail_after(DEADLINE):
                await test(system, int(files.port_file.read_text()), key)

    bridge.run(main, handle_signals=False)


def connect(port: int, key: Path, **options: Any) -> Any:
    return asyncssh.connect("127.0.0.1", port, username="operator", known_hosts=None,
                            client_keys=[str(key)], agent_path=None, **options)


async def hold_traces(connection: Any, count: int) -> list[Any]:
    """``count`` sessions kept open on ``connection``, each tracing tower-1."""
    held = [await connection.create_process("trace /broker/towers/tower-1")
            for _ in range(count)]
    for process in held:
        await process.stdout.readline()  # "tracing ..."
    return held


def test_sessions_past_the_cap_of_a_connection_are_refused(tmp_path, monkeypatch):
    # Each streaming view costs the broker's one thread a read of every actor per
    # refresh; sessions also queue in the shell's mailbox, which drops past its capacity.
    monkeypatch.setattr(ssh, "MAX_SESSIONS_PER_CONNECTION", 2)
    seen = {}

    async def test(system, port, key):
        async def client() -> None:
            async with connect(port, key) as connection:
                held = await hold_traces(connection, 2)
                refused = await connection.run("ps")
                seen["refused"] = (refused.exit_status, refused.stderr)
                for process in held:
                    process.close()
                    await process.wait_closed()
                # The shell lets go of a closed session's place once it has ended it.
                for _ in range(100):
                    again = await connection.run("ps")
                    if again.exit_status == 0:
                        break
                    await asyncio.sleep(0.05)
                seen["again"] = again.exit_status

        await call_asyncio(client)

    run_with_shell(tmp_path, test)
    assert seen["refused"] == (1, "too many shell sessions are open; close one and retry\n")
    assert seen["again"] == 0


async def _turned_away(reader: asyncio.StreamReader) -> bool:
    try:
        await asyncio.wait_for(reader.read(), 2.0)  # EOF (or a reset) when turned away
    except ConnectionResetError:
        pass
    except TimeoutError:
        return False
    return True


def test_connections_not_logged_in_are_bounded(tmp_path, monkeypatch):
    monkeypatch.setattr(ssh, "MAX_CONNECTIONS_LOGGING_IN", 3)
    seen = {}

    async def test(system, port, key):
        async def idle_connections() -> None:
            opened = []
            for _ in range(5):
                opened.append(await asyncio.open_connection("127.0.0.1", port))
                opened[-1][1].write(b"SSH-2.0-idle\r\n")  # and then nothing
            seen["turned away"] = await asyncio.gather(
                *(_turned_away(reader) for reader, _ in opened))
            for _, writer in opened:
                writer.close()

        await call_asyncio(idle_connections)

    run_with_shell(tmp_path, test)
    assert seen["turned away"] == [False, False, False, True, True]


def test_a_connection_logged_in_no_longer_counts_as_logging_in(tmp_path, monkeypatch):
    monkeypatch.setattr(ssh, "MAX_CONNECTIONS_LOGGING_IN", 1)
    seen = {}

    async def test(system, port, key):
        async def two_operators() -> None:
            async with connect(port, key) as first, connect(port, key) as second:
                seen["statuses"] = [(await first.run("ps")).exit_status,
                                    (await second.run("ps")).exit_status]

        await call_asyncio(two_operators)

    run_with_shell(tmp_path, test)
    assert seen["statuses"] == [0, 0]


def test_a_client_that_stops_reading_does_not_hold_its_trace(tmp_path, monkeypatch):
    monkeypatch.setattr(ssh, "WRITE_TIMEOUT", 0.5)
    seen = {}

    async def test(system, port, key):
        tower = system.lookup("/broker/towers/tower-1")
        held = {}

        async def client() -> None:
            held["connection"] = await connect(port, key)
            # A small window, never read: a client stuck, or gone without a FIN.
            held["process"] = await held["connection"].create_process(
                "trace /broker/towers/tower-1 --seconds 1 --limit 10000", window=1024)

        await call_asyncio(client)
        while tower.snapshot().traces == 0:
            await trio.sleep(0.05)
        for number in range(500):  # far more than the window holds
            await tower.tell("x" * 190 + str(number))
        with trio.move_on_after(10):
            while tower.snapshot().traces:
                await trio.sleep(0.05)
        seen["traces"] = tower.snapshot().traces
        held["connection"].close()

    run_with_shell(tmp_path, test)
    assert seen["traces"] == 0


def test_read_only_keys_leave_admins_their_reserve(tmp_path, monkeypatch):
    monkeypatch.setattr(ssh, "MAX_SESSIONS", 3)
    monkeypatch.setattr(ssh, "ADMIN_RESERVE", 1)
    seen = {}

    async def test(system, port, key):
        async def client() -> None:
            async with connect(port, key) as connection:
                held = await hold_traces(connection, 2)
                seen["third"] = (await connection.run("ps")).exit_status
                for process in held:
                    process.close()

        await call_asyncio(client)

    run_with_shell(tmp_path, test)
    assert seen["third"] == 1  # the last place is an admin's


@pytest.mark.parametrize("key_format", ["openssh", "rfc4716", "pkcs8-pem"])
def test_a_key_authorized_in_any_form_the_configuration_takes_logs_in(tmp_path, key_format):
    seen = {}

    async def test(system, port, key):
        async def client() -> None:
            async with connect(port, key) as connection:
                seen["ps"] = (await connection.run("ps")).exit_status

        await call_asyncio(client)

    run_with_shell(tmp_path, test, key_format)
    assert seen["ps"] == 0


def test_a_command_given_on_the_ssh_line_is_held_to_the_line_limit(tmp_path):
    # An interactive line was; one given with the connection could be 256 KiB.
    seen = {}

    async def test(system, port, key):
        async def client() -> None:
            async with connect(port, key) as connection:
                result = await connection.run("ps --limit " + "1" * (ssh.MAX_LINE + 1))
                seen["status"], seen["errors"] = result.exit_status, result.stderr

        await call_asyncio(client)

    run_with_shell(tmp_path, test)
    assert seen["status"] == 2
    assert seen["errors"] == f"line too long: at most {ssh.MAX_LINE} characters\n"
