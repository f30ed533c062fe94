"""The operators' shell inside the broker: an actor that serves SSH sessions.

Theory of operation: ``shell`` starts the asyncssh server (``broker.shell.ssh``) on the
asyncio side; each session is posted back to this actor, which drives it from a task of
its own: read a line, run it with a ``Shell`` (``broker.shell.commands``) over the live
system, write the output (``run_line``). Every command runs under one watch: in a
terminal, Ctrl-C interrupts it (any key, for the streaming ``top`` and ``trace``);
without one, the client going away does. The command is then cancelled, whatever it
holds (a trace) is let go, and the operator gets the prompt back: nothing is left behind.
Interrupting an admin command only stops the waiting: what was already asked (a
restart, a provisioning request) goes on.
"""

from __future__ import annotations

import contextlib
import functools
import ipaddress
import logging
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import trio

from actors import Actor, ActorActivity, ActorError, ActorSnapshot, ActorStopped, SupervisorRef
from actors.bridge import call_asyncio, post_to

from ..pki import write_secret
from ..provisioning import (
    Answer,
    Cancel,
    Decommission,
    HostBoard,
    HostRecord,
    HostState,
    Provision,
)
from ..scaling import ScaleTo
from ..sessions import SESSIONS_PATH, Describe, session_id_of
from ..towers import TowerDirectory
from . import ssh
from .commands import UNANSWERED, HostView, Role, SessionView, Shell, Status, TowerView

logger = logging.getLogger(__name__)

BANNER = "session broker shell: 'help' lists the commands, 'exit' leaves.\n"
JOBS_PATH = "/broker/jobs"
PROVISIONING_PATH = "/broker/provisioning"
SCALER_PATH = "/broker/scaler"
# How long provisioning and the scaler have to answer the shell.
ANSWER_TIMEOUT = 10.0
RESTART_TIMEOUT = 10.0
DESCRIBE_AT_ONCE = 64
DESCRIBE_TIMEOUT = 1.0
# The exit status of an interrupted command, as a POSIX shell reports one ended by SIGINT.
INTERRUPTED = 130


@dataclass(frozen=True)
class ShellFiles:
    host_key: Path
    operator_key: Path
    known_hosts: Path
    port_file: Path

    @property
    def address_file(self) -> Path:
        """Where ``broker shell`` finds the address to connect to, beside the port."""
        return self.port_file.with_name("address")


class LiveView:
    """The running broker, as the shell sees it (``BrokerView``)."""

    def __init__(
        self, system: Any, towers: TowerDirectory, board: HostBoard, shell: str | None = None
    ) -> None:
        self.system = system
        # The shell's own path: killed or restarted, it would end every operator's
        # session, the one that asked included, without a word.
        self.shell = shell
        self.towers_directory = towers
        self.board = board
        # Kept current by each session before it reads a line: tab completion runs
        # outside trio and must not read the live tree itself.
        self.paths: list[str] = []
        self.tower_views: list[TowerView] = []
        self.host_views: list[HostView] = []

    def tree(self, depth: int | None = None, children: int | None = None) -> Any:
        return self.system.snapshot(depth, children)

    def snapshot_of(self, path: str, depth: int | None = None, children: int | None = None
                    ) -> ActorSnapshot | None:
        ref = self.system.lookup(path)
        return None if ref is None else ref.snapshot(depth=depth, children=children)

    def activity(self) -> list[ActorActivity]:
        return self.system.activity()

    def refresh(self) -> None:
        """Take what tab completion will offer while the next line is typed."""
        self.paths = sorted(self.system.paths())
        self.towers()
        self.hosts()

    def actor_paths(self) -> list[str]:
        return self.paths

    def towers(self) -> list[TowerView]:
        if not trio.lowlevel.in_trio_task():
            # Tab completion, on the asyncio side: the towers as of the prompt.
            return self.tower_views
        self.tower_views = self._towers(trio.current_time())
        return self.tower_views

    def _towers(self, now: float) -> list[TowerView]:
        directory = self.towers_directory
        views = []
        for connection in directory:
            load = directory.placement.load_of(connection.name)
            reported_at = directory.placement.reported_at(connection.name)
            views.append(TowerView(
                name=connection.name,
                state=directory.state_of(connection.name, now),
                sessions=load.sessions if load else 0,
                capacity=load.capacity if load else connection.capacity,
                heartbeat_age=None if reported_at is None else now - reported_at,
                certificate_expires=connection.certificate_expires,
                usage=directory.usage.get(connection.name),
                used=load.taken if load else 0,
                unanswered_offers=directory.placement.unanswered(connection.name),
                waiting_offers=connection.waiting_offers(),
            ))
        return sorted(views, key=lambda view: view.name)

    async def sessions(self) -> list[SessionView]:
        """Every session as it describes itself; asked at most ``DESCRIBE_AT_ONCE`` at a
        time, a session that does not answer within ``DESCRIBE_TIMEOUT`` is listed as
        ``unanswered`` rather than left out (a busy session is the one to look at)."""
        sessions = self.system.lookup(SESSIONS_PATH)
        if not isinstance(sessions, SupervisorRef):
            return []
        views: list[SessionView] = []
        asking = trio.CapacityLimiter(DESCRIBE_AT_ONCE)

        async def describe(child: ActorSnapshot) -> None:
            ref = self.system.lookup(child.path)
            if ref is None:
                return
            async with asking:
                try:
                    described = await ref.ask(Describe(None), timeout=DESCRIBE_TIMEOUT)
                except ActorStopped:
                    return  # ended meanwhile
                except ActorError as error:
                    views.append(SessionView(
                        id=session_id_of(child.name), state=UNANSWERED,
                        tower="", negotiation=0, placements=0, age=child.uptime,
                        reason=f"did not answer: {type(error).__name__}",
                    ))
                    return
            views.append(SessionView(
                id=described["id"], state=described["state"], tower=described["tower"],
                negotiation=described["negotiation"], placements=described["placements"],
                reason=described["reason"], age=described["age"],
            ))

        async with trio.open_nursery() as nursery:
            for child in sessions.which_children():
                nursery.start_soon(describe, child)
        return views

    def _ref(self, path: str) -> Any:
        ref = self.system.lookup(path)
        if ref is None:
            raise LookupError(f"no actor at {path}")
        return ref

    def _supervisor_of(self, path: str) -> tuple[SupervisorRef, str]:
        """The supervisor of the actor at ``path``, and the actor's name under it.

        Raises:
            LookupError: no actor there.
            ValueError: it has none (the root: the whole system would end), or it is
                the shell itself.
        """
        self._ref(path)
        if path.rstrip("/") == self.shell:
            raise ValueError("it is the shell itself: every operator's session, this one "
                             "too, would end with it")
        parent_path, _, name = path.rstrip("/").rpartition("/")
        parent = self.system.lookup(parent_path)
        if not isinstance(parent, SupervisorRef):
            raise ValueError("it has no supervisor")
        return parent, name

    async def kill(self, path: str, reason: str) -> None:
        self._supervisor_of(path)
        self._ref(path).kill(reason)

    async def restart(self, path: str) -> None:
        parent, name = self._supervisor_of(path)
        await parent.restart_child(name, timeout=RESTART_TIMEOUT)

    async def drain(self, tower: str) -> None:
        self.towers_directory.drain(tower)

    async def undrain(self, tower: str) -> None:
        directory = self.towers_directory
        record = self.board.records.get(tower)
        if record is not None and record.state not in (HostState.READY, HostState.DRAINING):
            raise ValueError(f"its host is {record.state.value}")
        load = directory.placement.load_of(tower)
        if load is not None and load.draining:
            raise ValueError("the tower itself says it is draining")
        directory.undrain(tower)
        if record is not None and record.state is HostState.DRAINING:
            # The scaler's drain: the host serves again, no longer to be decommissioned.
            self.board.set(tower, HostState.READY)

    def trace(self, path: str, capacity: int) -> Any:
        return self._ref(path).trace(capacity=capacity)

    # Provisioning: the host board, read as it is; requests go to the actors that own it.

    def has_inventory(self) -> bool:
        return bool(self.board.records)

    def hosts(self) -> list[HostView]:
        if not trio.lowlevel.in_trio_task():
            # Tab completion, on the asyncio side: the hosts as of the prompt.
            return self.host_views
        self.host_views = [self._host(record) for record in self.board.records.values()]
        return self.host_views

    def _host(self, record: HostRecord) -> HostView:
        host = record.host
        address = f"[{host.address}]" if ":" in host.address else host.address
        steps = self.system.lookup(f"{JOBS_PATH}/job:{host.name}/steps")
        return HostView(
            name=host.name,
            address=f"{address}:{host.ssh_port}",
            state=record.state.value,
            plan=record.plan,
            step=record.step,
            attempts=record.attempts,
            error=record.error,
            restart_in=None if steps is None else steps.snapshot().restart_in,
            provisioned_in=record.provisioned_in,
            step_seconds=dict(record.step_seconds),
        )

    def events(self) -> list[tuple[datetime, str]]:
        return [(event.at, event.text) for event in self.board.events]

    async def provision(self, host: str) -> str:
        self.board.get(host)
        return self._answered(await self._ask(PROVISIONING_PATH, Provision(host)))

    async def decommission(self, host: str) -> str:
        self.board.get(host)
        return self._answered(await self._ask(PROVISIONING_PATH, Decommission(host)))

    async def cancel(self, host: str) -> str:
        self.board.get(host)
        return self._answered(await self._ask(PROVISIONING_PATH, Cancel(host)))

    async def scale(self, count: int) -> str:
        return self._answered(await self._ask(SCALER_PATH, ScaleTo(count)))

    async def _ask(self, path: str, message: Any) -> Any:
        """What the actor at ``path`` answers; ValueError when it cannot answer."""
        ref = self.system.lookup(path)
        if ref is None:
            raise ValueError(f"{path} is not running")
        try:
            return await ref.ask(message, timeout=ANSWER_TIMEOUT)
        except ActorError as error:
            raise ValueError(f"{path} did not answer: {error}") from error

    @staticmethod
    def _answered(answer: Answer) -> str:
        if not answer.ok:
            raise ValueError(answer.text)
        return answer.text


class ShellServer(Actor):
    """The ``shell`` actor: the SSH server and the sessions it serves."""

    runs_tasks = True

    def __init__(
        self, host: str, port: int, files: ShellFiles, authorized: dict[str, str],
        towers: TowerDirectory, board: HostBoard,
    ) -> None:
        self.host = host
        self.port = port
        self.files = files
        self.authorized = authorized
        self.towers = towers
        self.board = board
        self.sessions = 0

    async def started(self) -> None:
        self.view = LiveView(self.system, self.towers, self.board, self.path)
        self.port = await self.start(self._listen)

    async def _listen(self, task_status: trio.TaskStatus[int]) -> None:
        post = post_to(self.ref)
        server = await call_asyncio(functools.partial(
            ssh.start_server, self.host, self.port, self.files.host_key, self.authorized, post
        ))
        try:
            port = server.get_port()
            write_secret(self.files.port_file, f"{port}\n".encode())
            write_secret(self.files.address_file, f"{_reachable(self.host)}\n".encode())
            task_status.started(port)
            await trio.sleep_forever()
        finally:
            with trio.CancelScope(shield=True):
                await call_asyncio(ssh.close_server, server)

    async def receive(self, message: Any) -> None:
        if isinstance(message, ssh.OperatorSession):
            self.sessions += 1
            self.start_soon(self._drive, message)
        else:
            raise TypeError(f"the shell does not handle {type(message).__name__}")

    async def _drive(self, session: ssh.OperatorSession) -> None:
        status = 0
        try:
            shell = Shell(self.view, Role(session.role))
            if session.interactive:
                await self._interact(session, shell)
            elif len(session.command or "") > ssh.MAX_LINE:  # as an interactive line
                await call_asyncio(session.write_error,
                                   f"line too long: at most {ssh.MAX_LINE} characters\n")
                status = Status.USAGE
            else:
                status = await run_line(session, shell, session.command or "")
        except ssh.SessionGone:
            pass
        except Exception as error:
            logger.warning("a shell session failed: %r", error)
            status = 1
            with trio.CancelScope(shield=True), contextlib.suppress(ssh.SessionGone):
                await call_asyncio(session.write_error, f"error: {error!r}\n")
        finally:
            with trio.CancelScope(shield=True):
                await call_asyncio(session.finish, max(status, 0))

    async def _interact(self, session: ssh.OperatorSession, shell: Shell) -> None:
        await call_asyncio(session.write, BANNER)
        while True:
            self.view.refresh()
            session.complete = shell.complete
            line = await call_asyncio(session.read_line, "broker> ")
            if line is None:
                return
            try:
                status = await run_line(session, shell, line)
            except ssh.SessionGone:
                raise
            except Exception as error:
                # One command's failure is that command's, not the session's.
                logger.warning("shell command %r failed: %r", line[:200], error)
                await call_asyncio(session.write_error, f"error: {error!r}\n")
                continue
            if status < 0:
                return


async def run_line(session: ssh.OperatorSession, shell: Shell, line: str) -> int:
    """Run one command line for an operator's ``session`` and write its output as it
    comes; returns its exit status.

    While the command runs, a terminal is watched for Ctrl-C (and, for a streaming
    command, any key), and a session without one for the client going away. Either
    cancels the command; whatever it holds (a trace) is let go before this returns. An
    interrupt (Ctrl-C) is answered with a line and ``INTERRUPTED``; a streaming command
    stopped by another key ends quietly.

    Raises:
        ssh.SessionGone: the session closed while the output was written.
    """
    stream = shell.stream(line)
    interrupted = False

    async def watch(scope: trio.CancelScope) -> None:
        nonlocal interrupted
        if session.has_terminal:
            any_key = shell.is_streaming(line)
            interrupted = await call_asyncio(session.wait_for_interrupt, any_key)
        else:
            await call_asyncio(session.wait_closed)
        scope.cancel()

    try:
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(watch, nursery.cancel_scope)
                async for chunk in stream:
                    write = session.write_error if stream.is_error else session.write
                    await call_asyncio(write, chunk)
                nursery.cancel_scope.cancel()
        except BaseExceptionGroup as group:
            # The command's own error (or SessionGone) as itself, as the caller expects.
            if len(group.exceptions) == 1 and isinstance(group.exceptions[0], Exception):
                raise group.exceptions[0] from None
            raise
    finally:
        # Whatever the command holds (a trace) is let go now, however it ended.
        with trio.CancelScope(shield=True):
            await stream.aclose()
    if interrupted:
        await call_asyncio(session.write, "^C interrupted\n")
        return INTERRUPTED
    if stream.status == Status.REFUSED:
        logger.warning("shell: %s (%s, %s role) was refused: %r", session.username,
                       session.peer, session.role, line[:200])
    return stream.status or 0


def authorized_keys(
    configured: tuple[dict[str, str], ...], operator_key: str, own_keys: list[str]
) -> dict[str, str]:
    """Each authorized key and its role: configured ones, the ``broker shell`` key and,
    in the embedded default, the user's own keys (admin)."""
    authorized = {key: "admin" for key in own_keys}
    authorized[operator_key] = "admin"
    for entry in configured:
        authorized[entry["key"]] = entry.get("role", "read-only")
    return authorized


def _reachable(host: str) -> str:
    """The address to reach a server listening on ``host`` (an IP address) from this
    machine: for a wildcard, the loopback of its family."""
    address = ipaddress.ip_address(host)
    if not address.is_unspecified:
        return host
    return "127.0.0.1" if address.version == 4 else "::1"
