"""The operators' SSH server itself, over real SSH: what one client may hold of the
broker's process (sessions, connections not logged in, a trace it does not read)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import asyncio
import contextlib

import asyncssh
import pytest
import trio
from asyncssh.channel import SSHClientChannel
from asyncssh.packet import String

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
                try:
                    await connection.run("ps")
                except asyncssh.ChannelOpenError as error:
                    seen["refused"] = error.reason
                for process in held:
                    process.close()
                    await process.wait_closed()
                # A closed session's place is free once the broker has seen it close.
                for _ in range(100):
                    with contextlib.suppress(asyncssh.ChannelOpenError):
                        seen["again"] = (await connection.run("ps")).exit_status
                        break
                    await asyncio.sleep(0.05)

        await call_asyncio(client)

    run_with_shell(tmp_path, test)
    assert seen["refused"] == "at most 2 sessions per connection"
    assert seen["again"] == 0


def test_channels_count_against_the_cap_before_they_run_anything(tmp_path, monkeypatch):
    # Opened without asking for a shell or a command, they were not counted at all:
    # 20,000 of them held 150 MB of the broker's memory.
    monkeypatch.setattr(ssh, "MAX_SESSIONS_PER_CONNECTION", 2)
    seen = {}

    async def test(system, port, key):
        async def client() -> None:
            async with connect(port, key) as connection:
                idle = [await open_idle_channel(connection) for _ in range(2)]
                with pytest.raises(asyncssh.ChannelOpenError):
                    await open_idle_channel(connection)
                # And an environment variable asked for is refused, not kept.
                seen["env taken"] = await idle[0]._make_request(
                    b"env", String("NAME"), String("x" * 30_000))
                for channel in idle:
                    channel.close()
                    await channel.wait_closed()
                seen["after"] = (await connection.run("ps")).exit_status

        await call_asyncio(client)

    run_with_shell(tmp_path, test)
    assert seen == {"env taken": False, "after": 0}


async def open_idle_channel(connection: Any) -> SSHClientChannel:
    """A session channel that never asks for a shell or a command, as a hostile client's."""
    channel = SSHClientChannel(connection, asyncio.get_running_loop(), False, None,
                               "strict", 2**21, 32768)
    await channel._open(b"session")
    return channel


def test_keys_sent_without_reading_the_echo_wait_for_it(tmp_path):
    # Keys are echoed as they come: a client that sent them and never read had the broker
    # keep every echo (585 MB), its thread busy with a 2 MB window of keys at a time.
    seen = {}

    async def test(system, port, key):
        async def client() -> None:
            async with connect(port, key) as connection:
                process = await connection.create_process(
                    term_type="xterm", window=1024)  # and never read
                process.stdin.write("a\x7f" * 500_000)
                try:
                    await asyncio.wait_for(process.stdin.drain(), 3)
                except TimeoutError:
                    seen["held"] = True
                process.close()

        await call_asyncio(client)

    run_with_shell(tmp_path, test)
    assert seen == {"held": True}


def test_a_client_gone_silent_is_dropped_and_its_sessions_freed(tmp_path, monkeypatch):
    # A client frozen (or a host powered off) held its sessions until TCP gave up on it,
    # two hours here.
    monkeypatch.setattr(ssh, "MAX_SESSIONS", 1)
    monkeypatch.setattr(ssh, "ADMIN_RESERVE", 0)
    monkeypatch.setattr(ssh, "KEEPALIVE_INTERVAL", 0.2)
    monkeypatch.setattr(ssh, "KEEPALIVE_COUNT_MAX", 2)
    seen = {}

    async def test(system, port, key):
        async def client() -> None:
            frozen = await connect(port, key)
            prompt = await frozen.create_process(term_type="xterm")
            await prompt.stdout.read(1)  # the shell is up, and waits for a line
            frozen._transport.pause_reading()  # it hears nothing more, answers nothing
            async with connect(port, key) as other:
                for _ in range(100):
                    seen["other"] = (await other.run("ps")).exit_status
                    if seen["other"] == 0:
                        break
                    await asyncio.sleep(0.1)
            frozen.abort()

        await call_asyncio(client)

    run_with_shell(tmp_path, test)
    assert seen["other"] == 0


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


def test_a_connection_that_does_not_begin_to_log_in_is_closed_early(tmp_path, monkeypatch):
    # It held its place among those logging in for the whole login timeout (30 s).
    monkeypatch.setattr(ssh, "HANDSHAKE_TIMEOUT", 0.3)
    seen = {}

    async def test(system, port, key):
        async def idle_connection() -> None:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            seen["closed"] = await _turned_away(reader)
            writer.close()

        await call_asyncio(idle_connection)

    run_with_shell(tmp_path, test)
    assert seen["closed"]


def test_connections_logged_in_are_bounded(tmp_path, monkeypatch):
    monkeypatch.setattr(ssh, "MAX_CONNECTIONS", 1)
    seen = {}

    async def test(system, port, key):
        async def two_operators() -> None:
            async with connect(port, key) as first:
                seen["first"] = (await first.run("ps")).exit_status
                with pytest.raises((ConnectionError, asyncssh.Error)):
                    async with connect(port, key):
                        pass

        await call_asyncio(two_operators)

    run_with_shell(tmp_path, test)
    assert seen["first"] == 0


def test_connections_logging_in_together_past_the_cap_are_closed_once_in(
        tmp_path, monkeypatch):
    # Checked only as they came, all those logging in at once could pass the cap.
    monkeypatch.setattr(ssh, "MAX_CONNECTIONS", 1)
    seen = {}

    async def test(system, port, key):
        async def together() -> None:
            tried, all_tried = [], asyncio.Event()

            async def operator() -> int | None:
                status = None
                try:
                    async with connect(port, key) as connection:
                        status = (await connection.run("ps")).exit_status
                        tried.append(status)
                        if len(tried) == 3:
                            all_tried.set()
                        await all_tried.wait()  # all still connected as the others try
                except (OSError, asyncssh.Error):
                    tried.append(None)
                    if len(tried) == 3:
                        all_tried.set()
                return status

            seen["statuses"] = await asyncio.gather(*(operator() for _ in range(3)))

        await call_asyncio(together)

    run_with_shell(tmp_path, test)
    assert sorted(seen["statuses"], key=str) == [0, None, None]


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
