"""How the server runs one line for an operator (``run_line``): Ctrl-C, keys, and a client
that goes away, over a real actor tree.

``run_line`` is the code path the shell server takes for every line, interactive or not;
it crosses into asyncio for the session's I/O, so each test is a plain function under
``bridge.run`` (asyncio host, trio guest), as the broker runs. The session is a double
with the ``OperatorSession`` calls ``run_line`` makes, on the asyncio side: it records
what is written, and its keys are pressed by the test. What it does with a key mirrors
the real one: Ctrl-C interrupts any command, another key only a streaming one (for the
others the line editor keeps it for the next prompt).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import trio

from actors import Actor, ChildSpec, Supervisor, SupervisorFlags, bridge, open_system
from actors.bridge import call_asyncio
from broker.provisioning import HostBoard
from broker.shell import ssh
from broker.shell.commands import Role, Shell, Status
from broker.shell.server import INTERRUPTED, LiveView, run_line
from broker.towers import TowerDirectory

from .test_live_view import host

CTRL_C = "\x03"
DEADLINE = 10.0  # real seconds; each test takes milliseconds


class Worker(Actor):
    async def receive(self, message: Any) -> Any:
        return message


class FakeSession:
    """An operator's session as ``run_line`` uses it; its coroutines run on asyncio."""

    def __init__(self, *, has_terminal: bool) -> None:
        self.has_terminal = has_terminal
        self.username, self.peer, self.role = "operator", "127.0.0.1:50000", "admin"
        self.written: list[str] = []
        self.errors: list[str] = []  # what went to stderr
        self.keys: asyncio.Queue[str] = asyncio.Queue()
        self.closed = asyncio.Event()
        # The ``any_key`` of each interrupt watch, and how many watches are still open.
        self.watches: list[bool] = []
        self.watching = 0

    async def write(self, text: str) -> None:
        if self.closed.is_set():
            raise ssh.SessionGone()
        self.written.append(text)

    async def write_error(self, text: str) -> None:
        if self.has_terminal:
            return await self.write(text)
        if self.closed.is_set():
            raise ssh.SessionGone()
        self.errors.append(text)

    async def wait_for_interrupt(self, any_key: bool) -> bool:
        self.watches.append(any_key)
        self.watching += 1
        try:
            while True:
                key = await self.keys.get()
                if key == CTRL_C:
                    return True
                if any_key:
                    return False
        finally:
            self.watching -= 1

    async def wait_closed(self) -> None:
        self.watching += 1
        try:
            await self.closed.wait()
        finally:
            self.watching -= 1

    async def press(self, key: str) -> None:
        self.keys.put_nowait(key)

    async def close(self) -> None:
        self.closed.set()

    def text(self) -> str:
        return "".join(self.written)


class StuckView(LiveView):
    """The live view over a real tree, whose admin requests never get an answer."""

    def __init__(self, system: Any) -> None:
        board = HostBoard((host("host-1", "10.0.0.1"),))
        super().__init__(system, TowerDirectory(stale_after=3.0), board)
        self.waiting = trio.Event()
        self.cancelled: list[str] = []

    async def _stuck(self, request: str) -> str:
        self.waiting.set()
        try:
            await trio.Event().wait()  # never set: a supervisor or an actor that hangs
        finally:
            self.cancelled.append(request)
        raise AssertionError("unreachable")

    async def restart(self, path: str) -> None:
        self._ref(path)
        await self._stuck(f"restart {path}")

    async def provision(self, host: str) -> str:
        return await self._stuck(f"provision {host}")

    async def scale(self, count: int) -> str:
        return await self._stuck(f"scale {count}")


def live(test: Callable[[StuckView, Shell], Awaitable[None]]) -> None:
    """Run ``test`` as the broker runs: trio as asyncio's guest, a real tree under it."""

    async def main() -> None:
        children = [
            ChildSpec(
                "towers",
                lambda: Supervisor([ChildSpec("tower-1", Worker)], SupervisorFlags()),
            )
        ]
        async with open_system("broker", children=children) as system:
            view = StuckView(system)
            with trio.fail_after(DEADLINE):
                await test(view, Shell(view, Role.ADMIN))

    bridge.run(main, handle_signals=False)


async def until(condition: Callable[[], object]) -> None:
    while not condition():
        await trio.sleep(0.01)


@pytest.mark.parametrize(
    "line", ["restart /broker/towers/tower-1", "provision host-1", "scale 3"]
)
def test_ctrl_c_interrupts_a_command_that_waits_forever(line):
    async def test(view: StuckView, shell: Shell) -> None:
        session = FakeSession(has_terminal=True)

        async def operator() -> None:
            await view.waiting.wait()
            # A key typed ahead is no interrupt for a command that does not stream.
            await call_asyncio(session.press, "t")
            await trio.sleep(0.05)
            assert not view.cancelled
            await call_asyncio(session.press, CTRL_C)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(operator)
            status = await run_line(session, shell, line)
        assert status == INTERRUPTED
        assert session.written == ["^C interrupted\n"]
        assert view.cancelled == [line]
        assert session.watches == [False] and session.watching == 0
        # The session goes on.
        after = await run_line(session, shell, "tree /broker/towers")
        assert after == Status.OK
        assert session.written[-1].startswith("/broker/towers (Supervisor, running)")
        assert session.watching == 0

    live(test)


def test_a_streaming_command_stops_quietly_on_a_key_and_is_interrupted_by_ctrl_c():
    async def test(view: StuckView, shell: Shell) -> None:
        session = FakeSession(has_terminal=True)

        async def press_after_the_first_output(key: str) -> None:
            written = len(session.written)
            await until(lambda: len(session.written) > written)
            await call_asyncio(session.press, key)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(press_after_the_first_output, "q")
            assert await run_line(session, shell, "top --interval 0.2") == Status.OK
        assert session.text().startswith("top at ")
        assert "interrupted" not in session.text()

        tower = view.system.lookup("/broker/towers/tower-1")
        session.written.clear()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(press_after_the_first_output, CTRL_C)
            line = "trace /broker/towers/tower-1 --seconds 30"
            status = await run_line(session, shell, line)
            assert status == INTERRUPTED
        assert session.written[0].startswith("tracing /broker/towers/tower-1 for 30s")
        assert session.written[-1] == "^C interrupted\n"
        # The trace the command held is closed: the actor carries nothing more.
        assert tower.snapshot().traces == 0
        assert session.watches == [True, True] and session.watching == 0

    live(test)


def test_a_command_that_ends_on_its_own_leaves_no_watch_behind():
    async def test(view: StuckView, shell: Shell) -> None:
        session = FakeSession(has_terminal=True)
        assert await run_line(session, shell, "tree --depth 0") == Status.OK
        assert session.written == [
            "/broker (Supervisor, running)  [one_for_one, intensity 1 in 5s]  +1 child\n"
        ]
        assert session.watches == [False] and session.watching == 0

    live(test)


@pytest.mark.parametrize("terminal", [True, False])
def test_an_error_message_goes_to_stderr_without_a_terminal(terminal):
    async def test(view: StuckView, shell: Shell) -> None:
        session = FakeSession(has_terminal=terminal)
        assert await run_line(session, shell, "inspect /nowhere") == Status.ERROR
        assert await run_line(session, shell, "tree --depth 0") == Status.OK
        error = "no actor at /nowhere\n"
        output = "/broker (Supervisor, running)  [one_for_one, intensity 1 in 5s]  +1 child\n"
        if terminal:
            assert (session.written, session.errors) == ([error, output], [])
        else:
            assert (session.written, session.errors) == ([output], [error])

    live(test)


def test_without_a_terminal_the_client_going_away_cancels_the_command():
    async def test(view: StuckView, shell: Shell) -> None:
        session = FakeSession(has_terminal=False)

        async def client_goes_away() -> None:
            await view.waiting.wait()
            await call_asyncio(session.close)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(client_goes_away)
            await run_line(session, shell, "restart /broker/towers/tower-1")
        assert view.cancelled == ["restart /broker/towers/tower-1"]
        assert session.written == [] and session.watches == [] and session.watching == 0

    live(test)


def test_an_error_in_the_command_is_raised_as_itself():
    async def test(view: StuckView, shell: Shell) -> None:
        session = FakeSession(has_terminal=True)

        async def broken(path: str) -> None:
            raise OSError("the view broke")

        view.restart = broken  # type: ignore[method-assign]
        with pytest.raises(OSError, match="the view broke"):
            await run_line(session, shell, "restart /broker/towers/tower-1")
        assert session.watching == 0
        await call_asyncio(session.close)
        with pytest.raises(ssh.SessionGone):
            await run_line(session, shell, "tree")

    live(test)
