"""The tower agent: the WebRTC peer for many sessions, linked to its broker.

Theory of operation: the agent's actor system has two children. ``peers`` supervises one
``Peer`` actor per session. ``link`` is the communication server: it accepts the
broker's WebSocket over mutual TLS (the client certificate must be the broker's, issued
by the broker's CA), says hello, reports load every ``load_interval`` seconds, and turns
the broker's frames into peers: open, add a candidate, close. One broker connection is
served at a time; a new one replaces the old. When the broker's connection ends, every
peer is closed: the broker has already moved those sessions elsewhere.

The agent prints ``ready <host> <port>`` on stdout once it listens, and exits when its
stdin reaches end-of-file (its parent, a local broker, is gone) or on SIGINT/SIGTERM.
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import trio
from trio_websocket import ConnectionClosed, WebSocketConnection, wrap_server_stream

from actors import (
    Actor,
    ActorRef,
    MailboxFull,
    ChildSpec,
    DecodeError,
    Restart,
    Supervisor,
    SupervisorFlags,
    SupervisorRef,
    open_system,
)

from .. import __version__
from ..config import Settings
from ..link import (
    CLOSE_TIMEOUT,
    MAX_FRAME_BYTES,
    AddCandidate,
    ClosePeer,
    LinkError,
    OpenPeer,
    PeerRejected,
    TowerHello,
    TowerLoadReport,
    codec,
)
from ..pki import BROKER_NAME, server_ssl_context
from .peer import Peer, PeerSettings

logger = logging.getLogger(__name__)


HANDSHAKE_TIMEOUT = 10.0


@dataclass(frozen=True)
class AgentSettings:
    name: str
    host: str
    port: int
    certificate: Path
    key: Path
    ca: Path
    capacity: int = Settings.tower_capacity
    load_interval: float = Settings.tower_load_interval
    peer: PeerSettings = PeerSettings()


class Uplink:
    """The broker connection peers send through; sends are dropped while there is none."""

    def __init__(self) -> None:
        self.websocket: WebSocketConnection | None = None

    async def send(self, message: object) -> None:
        websocket = self.websocket
        if websocket is None:
            return
        try:
            await websocket.send_message(codec.encode(message))
        except (ConnectionClosed, trio.BrokenResourceError, trio.ClosedResourceError):
            pass


@dataclass(frozen=True)
class PeerEntry:
    """The live peer of one session, and the broker connection that opened it."""

    negotiation: int
    ref: ActorRef
    opened_by: object


class CommunicationServer(Actor):
    """The agent's ``link``: serves the broker over mutual TLS."""

    runs_tasks = True

    def __init__(self, settings: AgentSettings, listeners: list[trio.SocketListener]) -> None:
        self.settings = settings
        # Opened once by the agent, so a restarted server keeps the port the broker knows.
        self.listeners = listeners
        self.uplink = Uplink()
        self.peers_by_session: dict[str, PeerEntry] = {}
        self.connection_scope: trio.CancelScope | None = None
        self.opened = 0

    async def started(self) -> None:
        peers = self.system.lookup(f"/{self.settings.name}/peers")
        assert isinstance(peers, SupervisorRef)
        self.peers = peers
        self.tls = server_ssl_context(
            self.settings.certificate, self.settings.key, client_ca_file=self.settings.ca
        )
        self.start_soon(self._listen)

    async def _listen(self) -> None:
        async with trio.open_nursery() as nursery:
            for listener in self.listeners:
                nursery.start_soon(self._accept, listener)

    async def _accept(self, listener: trio.SocketListener) -> None:
        while True:
            stream = await listener.accept()
            self.start_soon(self._handle_stream_safely, stream)

    async def _handle_stream_safely(self, stream: trio.SocketStream) -> None:
        # Whatever one connection does wrong ends that connection, never the server.
        try:
            await self._handle_stream(stream)
        except Exception as error:
            logger.warning("%s: a link failed: %r", self.settings.name, error)
        finally:
            await trio.aclose_forcefully(stream)

    async def _handle_stream(self, stream: trio.SocketStream) -> None:
        tls_stream = trio.SSLStream(stream, self.tls, server_side=True)
        try:
            with trio.fail_after(HANDSHAKE_TIMEOUT):
                await tls_stream.do_handshake()
        except (trio.TooSlowError, trio.BrokenResourceError) as error:
            logger.warning("%s: refused a link: %r", self.settings.name, error.__cause__ or error)
            await trio.aclose_forcefully(tls_stream)
            return
        if _common_name(tls_stream.getpeercert()) != BROKER_NAME:
            logger.warning("%s: refused a link from a certificate not the broker's",
                           self.settings.name)
            await trio.aclose_forcefully(tls_stream)
            return
        async with trio.open_nursery() as nursery:
            with trio.fail_after(HANDSHAKE_TIMEOUT):
                request = await wrap_server_stream(
                    nursery, tls_stream, max_message_size=MAX_FRAME_BYTES
                )
                websocket = await request.accept()
            await self._serve_broker(websocket)
            nursery.cancel_scope.cancel()

    async def _serve_broker(self, websocket: WebSocketConnection) -> None:
        if self.connection_scope is not None:
            self.connection_scope.cancel()
        with trio.CancelScope() as scope:
            self.connection_scope = scope
            self.uplink.websocket = websocket
            try:
                await self.uplink.send(TowerHello(self.settings.name, self.settings.capacity,
                                                  __version__))
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._report_load)
                    await self._read(websocket)
                    nursery.cancel_scope.cancel()
            finally:
                # The broker gave those sessions up with this connection (it moves them
                # elsewhere), whether the connection broke or a new one replaced it.
                self._close_peers_opened_by(websocket)
                if self.uplink.websocket is websocket:
                    self.uplink.websocket = None
                    self.connection_scope = None
                with trio.CancelScope(shield=True), trio.move_on_after(CLOSE_TIMEOUT):
                    await websocket.aclose()

    async def _report_load(self) -> None:
        while True:
            await self.uplink.send(
                TowerLoadReport(len(self.peers_by_session), self.settings.capacity)
            )
            await trio.sleep(self.settings.load_interval)

    async def _read(self, websocket: WebSocketConnection) -> None:
        while True:
            try:
                data = await websocket.get_message()
            except ConnectionClosed:
                return
            try:
                message = codec.decode(data)
            except DecodeError as error:
                await self.uplink.send(LinkError(str(error)))
                continue
            if isinstance(message, OpenPeer):
                await self._open(message, websocket)
            elif isinstance(message, AddCandidate):
                entry = self.peers_by_session.get(message.session)
                if entry is not None and entry.negotiation == message.negotiation:
                    try:
                        entry.ref.tell_nowait(message)
                    except MailboxFull:
                        await self.uplink.send(PeerRejected(
                            message.session, message.negotiation, "invalid_message",
                            "too many candidates at once"))
            elif isinstance(message, ClosePeer):
                self._close(message.session, message.negotiation)
            else:
                await self.uplink.send(LinkError(f"a tower does not take {type(message).__name__}"))

    async def _open(self, request: OpenPeer, opened_by: object) -> None:
        previous = self.peers_by_session.get(request.session)
        if previous is not None:
            self._close(request.session, previous.negotiation)
        self.opened += 1
        # Unique even when a refused offer's peer is still on its way out.
        name = f"peer:{request.session}:{request.negotiation}:{self.opened}"

        def make() -> Peer:
            return Peer(request, self.uplink.send, self.settings.peer)

        try:
            ref = await self.peers.start_child(ChildSpec(name, make, restart=Restart.TEMPORARY))
        except ValueError as error:
            await self.uplink.send(LinkError(f"cannot open {name}: {error}"))
            return
        entry = PeerEntry(request.negotiation, ref, opened_by)
        self.peers_by_session[request.session] = entry
        self.start_soon(self._forget_when_done, request.session, entry)

    async def _forget_when_done(self, session: str, entry: PeerEntry) -> None:
        await entry.ref.join()
        if self.peers_by_session.get(session) is entry:
            del self.peers_by_session[session]

    def _close(self, session: str, negotiation: int) -> None:
        entry = self.peers_by_session.get(session)
        if entry is None or entry.negotiation != negotiation:
            return
        del self.peers_by_session[session]
        # In a task of its own: closing a peer connection can take a while, and the
        # link's other sessions must not wait behind it.
        self.start_soon(self._terminate, entry.ref.path.rsplit("/", 1)[1])

    async def _terminate(self, name: str) -> None:
        try:
            await self.peers.terminate_child(name)
        except LookupError:
            pass

    def _close_peers_opened_by(self, connection: object) -> None:
        for session, entry in list(self.peers_by_session.items()):
            if entry.opened_by is connection:
                self._close(session, entry.negotiation)


def _common_name(certificate: dict | None) -> str:
    for entry in (certificate or {}).get("subject", ()):
        for key, value in entry:
            if key == "commonName":
                return value
    return ""


async def run_agent(settings: AgentSettings) -> None:
    """Run a tower agent until its stdin closes or it is cancelled."""
    listeners = await trio.open_tcp_listeners(settings.port, host=settings.host)
    port = listeners[0].socket.getsockname()[1]
    peers_flags = SupervisorFlags(intensity=1_000_000, period=1)
    children = [
        ChildSpec("peers", lambda: Supervisor((), peers_flags)),
        ChildSpec("link", lambda: CommunicationServer(settings, listeners)),
    ]
    async with open_system(settings.name, children=children):
        print(f"ready {settings.host} {port}", flush=True)
        await _wait_for_end_of_input()


async def _wait_for_end_of_input() -> None:
    # A duplicate: FdStream closes the descriptor it is given, and 0 is sys.stdin's.
    async with trio.lowlevel.FdStream(os.dup(sys.stdin.fileno())) as stdin:
        try:
            while await stdin.receive_some(1024):
                pass
        except (OSError, trio.BrokenResourceError):
            pass
