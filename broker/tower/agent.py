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
import sys
from dataclasses import dataclass
from pathlib import Path

import trio
from trio_websocket import ConnectionClosed, WebSocketConnection, wrap_server_stream

from actors import (
    Actor,
    ActorRef,
    ChildSpec,
    DecodeError,
    Restart,
    Supervisor,
    SupervisorFlags,
    SupervisorRef,
    open_system,
)

from .. import __version__
from ..link import (
    MAX_FRAME_BYTES,
    AddCandidate,
    ClosePeer,
    LinkError,
    OpenPeer,
    TowerHello,
    TowerLoadReport,
    codec,
)
from ..pki import server_ssl_context
from .peer import Peer, PeerSettings

logger = logging.getLogger(__name__)

BROKER_NAME = "broker"
HANDSHAKE_TIMEOUT = 10.0
CLOSE_TIMEOUT = 1.0


@dataclass(frozen=True)
class AgentSettings:
    name: str
    host: str
    port: int
    certificate: Path
    key: Path
    ca: Path
    capacity: int = 500
    load_interval: float = 1.0
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


class PeerDirectory:
    """The live peer of each session on this tower."""

    def __init__(self) -> None:
        self.peers: dict[str, tuple[int, ActorRef]] = {}

    def __len__(self) -> int:
        return len(self.peers)


class CommunicationServer(Actor):
    """The agent's ``link``: serves the broker over mutual TLS."""

    runs_tasks = True

    def __init__(self, settings: AgentSettings, listening: trio.Event) -> None:
        self.settings = settings
        self.listening = listening
        self.uplink = Uplink()
        self.directory = PeerDirectory()
        self.current: trio.CancelScope | None = None
        self.port = 0

    async def started(self) -> None:
        peers = self.system.lookup(f"/{self.settings.name}/peers")
        assert isinstance(peers, SupervisorRef)
        self.peers = peers
        tls = server_ssl_context(
            self.settings.certificate, self.settings.key, client_ca_file=self.settings.ca
        )
        listeners = await trio.open_tcp_listeners(self.settings.port, host=self.settings.host)
        self.port = listeners[0].socket.getsockname()[1]
        self.tls = tls
        self.start_soon(self._listen, listeners)
        self.listening.set()

    async def _listen(self, listeners: list[trio.SocketListener]) -> None:
        async with trio.open_nursery() as nursery:
            for listener in listeners:
                nursery.start_soon(trio.serve_listeners, self._handle_stream, [listener])

    async def _handle_stream(self, stream: trio.SocketStream) -> None:
        tls_stream = trio.SSLStream(stream, self.tls, server_side=True)
        try:
            with trio.fail_after(HANDSHAKE_TIMEOUT):
                await tls_stream.do_handshake()
        except (trio.TooSlowError, trio.BrokenResourceError) as error:
            logger.warning("%s: refused a link: %s", self.settings.name, error)
            await trio.aclose_forcefully(tls_stream)
            return
        if _common_name(tls_stream.getpeercert()) != BROKER_NAME:
            logger.warning("%s: refused a link from a certificate not the broker's",
                           self.settings.name)
            await trio.aclose_forcefully(tls_stream)
            return
        async with trio.open_nursery() as nursery:
            request = await wrap_server_stream(nursery, tls_stream, max_message_size=MAX_FRAME_BYTES)
            websocket = await request.accept()
            await self._serve_broker(websocket)
            nursery.cancel_scope.cancel()

    async def _serve_broker(self, websocket: WebSocketConnection) -> None:
        if self.current is not None:
            self.current.cancel()
        with trio.CancelScope() as scope:
            self.current = scope
            self.uplink.websocket = websocket
            try:
                await self.uplink.send(TowerHello(self.settings.name, self.settings.capacity,
                                                  __version__))
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._report_load)
                    await self._read(websocket)
                    nursery.cancel_scope.cancel()
            finally:
                if self.uplink.websocket is websocket:
                    self.uplink.websocket = None
                    self.current = None
                    with trio.CancelScope(shield=True):
                        await self._close_all_peers()
                        with trio.move_on_after(CLOSE_TIMEOUT):
                            await websocket.aclose()

    async def _report_load(self) -> None:
        while True:
            await self.uplink.send(
                TowerLoadReport(len(self.directory), self.settings.capacity)
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
                await self._open(message)
            elif isinstance(message, AddCandidate):
                entry = self.directory.peers.get(message.session)
                if entry is not None and entry[0] == message.negotiation:
                    entry[1].tell_nowait(message)
            elif isinstance(message, ClosePeer):
                await self._close(message.session, message.negotiation)
            else:
                await self.uplink.send(LinkError(f"a tower does not take {type(message).__name__}"))

    async def _open(self, request: OpenPeer) -> None:
        previous = self.directory.peers.get(request.session)
        if previous is not None:
            await self._close(request.session, previous[0])
        name = f"peer:{request.session}:{request.negotiation}"
        directory = self.directory

        def make() -> Peer:
            return Peer(request, self.uplink.send, self.settings.peer)

        try:
            ref = await self.peers.start_child(ChildSpec(name, make, restart=Restart.TEMPORARY))
        except ValueError as error:
            await self.uplink.send(LinkError(f"cannot open {name}: {error}"))
            return
        directory.peers[request.session] = (request.negotiation, ref)
        self.start_soon(self._forget_when_done, request.session, request.negotiation, ref)

    async def _forget_when_done(self, session: str, negotiation: int, ref: ActorRef) -> None:
        await ref.join()
        if self.directory.peers.get(session) == (negotiation, ref):
            del self.directory.peers[session]

    async def _close(self, session: str, negotiation: int) -> None:
        entry = self.directory.peers.get(session)
        if entry is None or entry[0] != negotiation:
            return
        del self.directory.peers[session]
        try:
            await self.peers.terminate_child(entry[1].path.rsplit("/", 1)[1])
        except LookupError:
            pass

    async def _close_all_peers(self) -> None:
        for session, (negotiation, _ref) in list(self.directory.peers.items()):
            await self._close(session, negotiation)


def _common_name(certificate: dict | None) -> str:
    for entry in (certificate or {}).get("subject", ()):
        for key, value in entry:
            if key == "commonName":
                return value
    return ""


async def run_agent(settings: AgentSettings) -> None:
    """Run a tower agent until its stdin closes or it is cancelled."""
    listening = trio.Event()
    peers_flags = SupervisorFlags(intensity=1_000_000, period=1)
    holder: dict[str, CommunicationServer] = {}

    def make_server() -> CommunicationServer:
        holder["server"] = server = CommunicationServer(settings, listening)
        return server

    children = [
        ChildSpec("peers", lambda: Supervisor((), peers_flags)),
        ChildSpec("link", make_server),
    ]
    async with open_system(settings.name, children=children):
        await listening.wait()
        print(f"ready {settings.host} {holder['server'].port}", flush=True)
        await _wait_for_end_of_input()


async def _wait_for_end_of_input() -> None:
    stdin = trio.lowlevel.FdStream(sys.stdin.fileno())
    try:
        while await stdin.receive_some(1024):
            pass
    except (OSError, trio.BrokenResourceError):
        pass
    finally:
        # The descriptor belongs to sys.stdin; FdStream would otherwise close it.
        stdin._fd_holder.fd = -1
