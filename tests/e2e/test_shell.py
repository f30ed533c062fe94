"""The operators' shell through real SSH clients: asyncssh, and the system's ssh."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
from pathlib import Path

import asyncssh
import pytest

from .conftest import (
    FAST_REPAIR,
    start_broker,
    start_steady_client,
    stop_broker,
    wait_for_towers,
)


@pytest.fixture(scope="module")
def read_only_key(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("keys") / "read-only"
    key = asyncssh.generate_private_key("ssh-ed25519")
    key.write_private_key(str(path))
    key.write_public_key(str(path) + ".pub")
    return path


@pytest.fixture(scope="module")
def broker(tmp_path_factory, read_only_key):
    public = (read_only_key.parent / "read-only.pub").read_text().strip()
    running = start_broker(tmp_path_factory.mktemp("broker"), shell_port=0,
                           shell_keys=[{"key": public, "role": "read-only"}], **FAST_REPAIR)
    wait_for_towers(running, 2)
    steady = start_steady_client(running)
    running.steady_session = steady.id
    yield running
    steady.kill()
    stop_broker(running)


def shell_port(broker) -> int:
    return int((broker.state_dir / "shell" / "port").read_text())


def run(broker, *commands: str, key: Path | None = None) -> list[asyncssh.SSHCompletedProcess]:
    """Each command over one SSH connection, as ``ssh broker-host COMMAND`` would."""
    shell = broker.state_dir / "shell"
    host_key = asyncssh.read_public_key(str(shell / "host-key.pub"))

    async def main():
        known = asyncssh.import_known_hosts(
            f"[127.0.0.1]:{shell_port(broker)} {host_key.export_public_key().decode()}")
        async with asyncssh.connect(
            "127.0.0.1", shell_port(broker), username="operator", known_hosts=known,
            client_keys=[str(key or shell / "operator-key")],
        ) as connection:
            return [await connection.run(command) for command in commands]

    return asyncio.run(main())


def test_read_commands_show_the_live_system(broker):
    tree, sessions, towers, stats, ps = run(
        broker, "tree", "sessions --json", "towers --json", "stats --json", "ps --json")
    assert tree.exit_status == 0
    assert "/broker" in tree.stdout and f"session:{broker.steady_session}" in tree.stdout
    listed = json.loads(sessions.stdout)
    [steady] = [s for s in listed if s["id"] == broker.steady_session]
    assert steady["state"] == "connected"
    listed_towers = json.loads(towers.stdout)
    assert sorted(t["name"] for t in listed_towers) == ["tower-1", "tower-2"]
    assert all(t["state"] == "ready" and t["certificate_expires"] for t in listed_towers)
    assert all(t["cpu_seconds"] > 0 and t["resident_bytes"] > 2**20 for t in listed_towers)
    assert json.loads(stats.stdout)
    assert json.loads(ps.stdout)


def test_bad_input_gets_a_clear_answer(broker):
    unknown, bad_path, bad_args = run(broker, "dance", "inspect /nowhere", "ps --limit x")
    # Without a terminal, on stderr: output piped on is only output.
    assert unknown.exit_status == 2 and "unknown command" in unknown.stderr
    assert bad_path.exit_status == 1 and "/nowhere" in bad_path.stderr
    assert bad_args.exit_status == 2 and "usage: ps" in bad_args.stderr
    assert unknown.stdout == bad_path.stdout == bad_args.stdout == ""


def test_kill_on_a_negotiation_shows_the_restart(broker):
    negotiation = f"/broker/sessions/session:{broker.steady_session}/negotiation"
    killed, = run(broker, f"kill {negotiation} operator test")
    assert killed.exit_status == 0, killed.stdout
    inspected, tree = run(broker, f"inspect {negotiation} --json", "tree")
    snapshot = json.loads(inspected.stdout)
    assert snapshot["restarts"] >= 1
    assert "operator test" in json.dumps(snapshot)


def test_a_read_only_key_reads_but_may_not_act(broker, read_only_key):
    tree, kill = run(broker, "tree", "kill /broker/endpoint", key=read_only_key)
    assert tree.exit_status == 0
    assert kill.exit_status == 3 and "refused" in kill.stderr
    alive, = run(broker, "inspect /broker/endpoint --json")
    assert json.loads(alive.stdout)["restarts"] == 0


def test_provisioning_commands_without_an_inventory(broker):
    jobs, provision = run(broker, "jobs --json", "provision host-1")
    for result in (jobs, provision):
        assert result.exit_status == 1
        assert result.stderr == "not available: this broker has no host inventory\n"


def test_an_unknown_key_is_refused(broker, tmp_path):
    stranger = tmp_path / "stranger"
    asyncssh.generate_private_key("ssh-ed25519").write_private_key(str(stranger))
    with pytest.raises(asyncssh.PermissionDenied):
        run(broker, "tree", key=stranger)


def test_the_interactive_shell_completes_and_exits(broker):
    shell = broker.state_dir / "shell"

    async def main():
        async with asyncssh.connect(
            "127.0.0.1", shell_port(broker), username="operator", known_hosts=None,
            client_keys=[str(shell / "operator-key")],
        ) as connection:
            process = await connection.create_process(term_type="xterm")
            await asyncio.wait_for(process.stdout.readuntil("broker> "), 10)
            process.stdin.write("tre\t\r")
            output = await asyncio.wait_for(process.stdout.readuntil("broker> "), 10)
            # Down a path, one segment a tab: "/broker/", then "/broker/towers/".
            process.stdin.write("tree /bro\ttow\t\r")
            towers = await asyncio.wait_for(process.stdout.readuntil("broker> "), 10)
            assert "towers (Supervisor" in towers and "jobs (" not in towers
            # Ctrl-C throws the line being typed away.
            process.stdin.write("dance\x03")
            await asyncio.wait_for(process.stdout.readuntil("broker> "), 10)
            process.stdin.write("\r")
            after_interrupt = await asyncio.wait_for(process.stdout.readuntil("broker> "), 10)
            assert "unknown command" not in after_interrupt
            process.stdin.write("exit\r")
            await asyncio.wait_for(process.wait(), 10)
            return output

    output = asyncio.run(main())
    assert "/broker" in output


def test_bytes_that_are_not_utf8_are_a_typo_not_a_dropped_connection(broker):
    async def main():
        async with connect(broker) as connection:
            process = await connection.create_process(term_type="xterm", encoding=None)
            await read_until(process, b"broker> ")
            process.stdin.write(b"inspect /caf\xe9\r")
            typo = await read_until(process, b"broker> ")
            process.stdin.write(b"tree\r")
            tree = await read_until(process, b"broker> ")
            process.stdin.write(b"exit\r")
            await asyncio.wait_for(process.wait(), 10)
            return typo.decode(), tree.decode()

    typo, tree = asyncio.run(main())
    assert "no actor at /caf\ufffd" in typo
    assert "/broker" in tree


@pytest.mark.parametrize("terminal", [True, False])
def test_a_line_too_long_is_refused_whole(broker, terminal):
    async def main():
        async with connect(broker) as connection:
            process = await connection.create_process(term_type="xterm" if terminal else None)
            if terminal:
                await read_until(process, "broker> ")
            # Without a terminal, longer than asyncssh's buffer: it comes in pieces.
            long = "help " + "x" * (5000 if terminal else 3_000_000)
            enter = "\r" if terminal else "\n"
            process.stdin.write(long + enter + "tree" + enter)
            answers = await read_until(process, "shell (ShellServer")
            process.stdin.write("exit" + enter)
            completed = await asyncio.wait_for(process.wait(), 10)
            return answers.replace("\r\n", "\n"), completed.stderr

    answers, errors = asyncio.run(main())
    refused = "line too long: at most 4096 characters\n"
    if terminal:
        assert refused + "broker> /broker (" in answers
    else:
        # Without a terminal, the refusal goes to stderr.
        assert errors == refused
        assert "broker> broker> /broker (" in answers
    assert "unknown command" not in answers + errors


@pytest.mark.skipif(shutil.which("ssh") is None, reason="no ssh client (openssh-client)")
def test_the_system_ssh_client_through_broker_shell(broker):
    result = subprocess.run(
        [sys.executable, "-m", "broker", "shell", "--state-dir", str(broker.state_dir), "tree"],
        capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 0, result.stderr
    assert "/broker" in result.stdout
    # Its words reach the shell as they were quoted.
    result = subprocess.run(
        [sys.executable, "-m", "broker", "shell", "--state-dir", str(broker.state_dir),
         "kill", "/broker/none", "it's stuck; really"],
        capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL,
    )
    assert "no actor at /broker/none" in result.stdout + result.stderr, result
    # A line given as one word, as to ssh.
    result = subprocess.run(
        [sys.executable, "-m", "broker", "shell", "--state-dir", str(broker.state_dir),
         "tree --depth 0"],
        capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 0 and "children" in result.stdout, result


def test_trace_streams_the_messages_an_actor_receives(broker):
    import ssl
    import threading
    import time
    import urllib.request

    session = f"/broker/sessions/session:{broker.steady_session}"
    context = ssl.create_default_context(cafile=broker.certificate)
    stop = threading.Event()

    def ask_about_the_session():
        request = urllib.request.Request(
            f"{broker.url}/v1/sessions/{broker.steady_session}",
            headers={"Authorization": f"Bearer {broker.api_key}"})
        while not stop.is_set():
            urllib.request.urlopen(request, context=context).read()
            time.sleep(0.1)

    asker = threading.Thread(target=ask_about_the_session)
    asker.start()
    try:
        traced, = run(broker, f"trace {session} --seconds 2")
    finally:
        stop.set()
        asker.join()
    assert traced.exit_status == 0, traced.stdout
    assert "Describe" in traced.stdout and " ask " in traced.stdout
    # Messages carry API keys; a trace never shows them.
    assert broker.api_key not in traced.stdout


def connect(broker, key: Path | None = None):
    """An SSH connection to the broker's shell (``async with``)."""
    shell = broker.state_dir / "shell"
    return asyncssh.connect(
        "127.0.0.1", shell_port(broker), username="operator", known_hosts=None,
        client_keys=[str(key or shell / "operator-key")],
    )


async def read_until(process, text: str | bytes, timeout: float = 10) -> str | bytes:
    return await asyncio.wait_for(process.stdout.readuntil(text), timeout)


def test_ctrl_c_interrupts_a_command_that_blocks(tmp_path):
    # Restarting the towers waits for their agent processes to start again, one after
    # the other: seconds on any machine, so the Ctrl-C comes while the command waits
    # (had the restart been done first, the output would say "restarted"). Its own
    # broker, as it disturbs the towers the other tests use.
    broker = start_broker(tmp_path, shell_port=0, **FAST_REPAIR)
    try:
        wait_for_towers(broker, 2)

        async def main():
            async with connect(broker) as connection:
                process = await connection.create_process(term_type="xterm")
                await read_until(process, "broker> ")
                process.stdin.write("restart /broker/towers\r")
                await read_until(process, "\n")
                await asyncio.sleep(0.3)
                process.stdin.write("\x03")
                interrupted = await read_until(process, "broker> ")
                # The session goes on, streaming commands too.
                process.stdin.write("tree /broker/towers --depth 0\r")
                after = await read_until(process, "broker> ")
                process.stdin.write("top --interval 0.2\r")
                await read_until(process, "top at ")
                process.stdin.write("\x03")
                stopped_top = await read_until(process, "broker> ")
                process.stdin.write("exit\r")
                await asyncio.wait_for(process.wait(), 10)
                # One command in a terminal, as `ssh -t broker-host restart ...`.
                command = await connection.create_process(
                    "restart /broker/towers", term_type="xterm")
                await asyncio.sleep(0.3)
                command.stdin.write("\x03")
                completed = await asyncio.wait_for(command.wait(), 10)
                return interrupted, after, stopped_top, completed

        interrupted, after, stopped_top, completed = asyncio.run(main())
    finally:
        stop_broker(broker)
    assert "^C interrupted" in interrupted, interrupted
    assert "restarted" not in interrupted, "the restart was done before the Ctrl-C came"
    assert "/broker/towers (Supervisor" in after
    assert "^C interrupted" in stopped_top
    assert completed.exit_status == 130
    assert "^C interrupted" in completed.stdout and "restarted" not in completed.stdout


@pytest.mark.parametrize("terminal", [False, True], ids=["command", "interactive"])
def test_a_client_that_drops_mid_trace_leaves_no_trace_behind(broker, terminal):
    traced = "/broker/endpoint"

    async def traces_open(connection) -> int:
        inspected = await connection.run(f"inspect {traced} --json")
        assert inspected.exit_status == 0, inspected.stdout
        return json.loads(inspected.stdout)["traces"]

    async def main():
        async with connect(broker) as watcher:
            assert await traces_open(watcher) == 0
            async with connect(broker) as tracer:
                line = f"trace {traced} --seconds 30"
                if terminal:
                    process = await tracer.create_process(term_type="xterm")
                    await read_until(process, "broker> ")
                    process.stdin.write(line + "\r")
                else:
                    process = await tracer.create_process(line)
                await read_until(process, f"tracing {traced} for 30s")
                assert await traces_open(watcher) == 1
                # Gone without a word: no EOF, no exit, no SSH disconnect message.
                tracer.abort()
            deadline = asyncio.get_running_loop().time() + 5
            while (count := await traces_open(watcher)) != 0:
                assert asyncio.get_running_loop().time() < deadline, f"{count} traces left"
                await asyncio.sleep(0.05)

    asyncio.run(main())


def test_an_interactive_session_without_a_terminal_streams(broker):
    async def main():
        async with connect(broker) as connection:
            process = await connection.create_process()
            process.stdin.write("top --count 2 --interval 0.2 --limit 1\ntree --depth 0\nexit\n")
            output = await asyncio.wait_for(process.stdout.read(), 10)
            await asyncio.wait_for(process.wait(), 10)
            return output

    output = asyncio.run(main())
    assert "error" not in output, output
    assert output.count("top at ") == 2
    assert "/broker (Supervisor, running)" in output
