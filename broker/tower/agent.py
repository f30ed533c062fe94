"""The tower agent: the WebRTC peer for many sessions, linked to its broker.

Theory of operation: the agent's actor system has two children. ``peers`` supervises one
``Peer`` actor per session. ``link`` is the communication server: it accepts the
broker's WebSocket, says hello, reports load every ``load_interval`` seconds, and turns
the broker's frames into peers: open, add a candidate, close. One broker connection is
served at a time; a new one replaces the old. When the broker's connection ends, every
peer is closed: the broker has already moved those sessions elsewhere.

Two ways to stand, one protocol:

- **Local** (``--listen``): the agent speaks mutual TLS itself on a TCP port (the client
  certificate must be the broker's, issued by the broker's CA), prints ``ready <host>
  <port>`` once it listens, and exits when its stdin reaches end-of-file (its parent, a
  local broker, is gone) or on SIGINT/SIGTERM.
- **Behind NGINX** (``--config``, what provisioning sets up): NGINX terminates mutual TLS
  and proxies the link to the agent's Unix socket (in the tower's private directory, or
  for a root tower in a directory of NGINX's workers' group); the agent checks the
  client subject NGINX passes on. It holds a lock in the tower's directory, so a second
  agent for the same tower exits at once, and runs until SIGINT/SIGTERM.

Its identity (key and certificate chain, one PEM file) is renewed over the link: the key
is made here and never leaves; after the new file is written, the local agent loads it
for new handshakes and the agent behind NGINX runs its reload command.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import logging
import math
import os
import socket
import ssl
import stat
import sys
import tomllib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import psutil
import trio
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from trio_websocket import ConnectionClosed, WebSocketConnection, wrap_server_stream

from actors import (
    Actor,
    ActorRef,
    MailboxFull,
    ChildSpec,
    DecodeError,
    Down,
    Restart,
    Supervisor,
    SupervisorFlags,
    SupervisorRef,
    open_system,
)

from .. import __version__
from ..config import Settings, check_seconds
from ..link import (
    CLOSE_TIMEOUT,
    MAX_FRAME_BYTES,
    RECEIVE_BYTES,
    TOWER_FULL,
    BUNDLE_FRAMES,
    BUNDLES,
    AddCandidate,
    Bundle,
    CertificateInstalled,
    CertificateIssued,
    CertificateRefused,
    CertificateRequest,
    ClosePeer,
    LinkError,
    RenewCertificate,
    OpenPeer,
    PeerRejected,
    TowerHello,
    TowerLoadReport,
    codec,
    session_weight,
)
from ..collector import Collector
from ..metrics import process_usage
from ..outbox import Outbox, OutboxClosed, OutboxStalled
from ..pki import (
    BROKER_NAME,
    KeyType,
    generate_key_and_csr,
    server_ssl_context,
    write_secret,
)
from .peer import Answered, Close, Peer, PeerSettings

logger = logging.getLogger(__name__)


HANDSHAKE_TIMEOUT = 10.0
RENEWAL_STEP_TIMEOUT = 30.0
# The client subject NGINX passes on ($ssl_client_s_dn) for the broker's certificate.
BROKER_SUBJECT = f"CN={BROKER_NAME}"


@dataclass(frozen=True)
class AgentSettings:
    """A tower agent's settings.

    ``identity`` is the tower's key followed by its certificate (PEM). A local agent has
    ``host``, ``port`` and ``ca`` (it checks the broker's certificate itself); an agent
    behind NGINX has ``socket``, ``check`` and ``reload`` (the commands that test NGINX's
    configuration and make NGINX pick up a renewed identity).
    """

    name: str
    identity: Path
    host: str = ""
    port: int = 0
    ca: Path | None = None
    socket: Path | None = None
    check: tuple[str, ...] = ()
    reload: tuple[str, ...] = ()
    key_type: KeyType = "ec"
    capacity: int = Settings.tower_capacity
    video_weight: int = Settings.video_weight
    load_interval: float = Settings.tower_load_interval
    peer: PeerSettings = PeerSettings()

    def __post_init__(self) -> None:
        if self.capacity < 1:
            raise ValueError(f"capacity must be at least 1, not {self.capacity}")
        if self.video_weight < 1:
            raise ValueError(f"video_weight must be at least 1, not {self.video_weight}")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"the port must be a port number (0-65535), not {self.port}")
        check_seconds("load_interval", self.load_interval)


class Uplink:
    """The broker connection peers send through; sends are dropped while there is none.

    Frames go through the connection's outbox (``broker.outbox``), so a peer cancelled
    while sending never breaks the link for the others."""

    def __init__(self) -> None:
        self.outbox: Outbox | None = None

    async def send(self, message: object) -> None:
        outbox = self.outbox
        if outbox is None:
            return
        try:
            await outbox.put(codec.encode(message))
        except OutboxClosed:
            pass


@dataclass(frozen=True)
class PeerEntry:
    """The live peer of one session, and the broker connection that opened it."""

    negotiation: int
    ref: ActorRef
    opened_by: object
    # What it takes of the tower's capacity (``link.session_weight``): as much as its
    # application may need until answered, then what its media does.
    weight: int = 1
    # Whether its offer has been answered: reported from then on (until then its
    # broker counts it, and a report counting it too would count it twice).
    answered: bool = False


class CommunicationServer(Actor):
    """The agent's ``link``: serves the broker, over mutual TLS or behind NGINX."""

    runs_tasks = True

    def __init__(self, settings: AgentSettings, listeners: list[trio.SocketListener]) -> None:
        # TCP listeners for a local agent, the Unix socket behind NGINX.
        self.settings = settings
        # Opened once by the agent, so a restarted server keeps the port the broker knows.
        self.listeners = listeners
        self.uplink = Uplink()
        self.peers_by_session: dict[str, PeerEntry] = {}
        # How much of the capacity the peers take: one each, ``video_weight`` for one
        # with video (drawing and encoding a stream costs the tower far more than a data
        # session) or that may have it (not answered yet). Kept as peers come and go
        # (``_record``, ``_forget``), not added up per offer.
        self.used = 0
        # Each peer is watched (a Down message when it ends), not waited on by a task.
        self.session_of_peer: dict[ActorRef, str] = {}
        self.connection_scope: trio.CancelScope | None = None
        self.opened = 0
        # The key of a renewal in progress: made here, kept until its certificate comes.
        self.pending_key: bytes | None = None
        self.collector = Collector()
        self.renewals = 0

    async def started(self) -> None:
        peers = self.system.lookup(f"/{self.settings.name}/peers")
        assert isinstance(peers, SupervisorRef)
        self.peers = peers
        # Peers of this server's previous incarnation, if it crashed: their broker
        # connection ended with it (the broker moved their sessions), and nothing here
        # would track, count or close them.
        for child in peers.which_children():
            self.start_soon(self._terminate, child.name)
        self.tls: ssl.SSLContext | None = None
        if self.settings.ca is not None:
            self.tls = server_ssl_context(
                self.settings.identity, self.settings.identity, client_ca_file=self.settings.ca
            )
        self.start_soon(self._listen)
        self.start_soon(self.collector.run)

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

    async def _handle_stream(self, stream: trio.abc.Stream) -> None:
        if self.tls is not None:
            tls_stream = trio.SSLStream(stream, self.tls, server_side=True)
            try:
                with trio.fail_after(HANDSHAKE_TIMEOUT):
                    await tls_stream.do_handshake()
            except (trio.TooSlowError, trio.BrokenResourceError) as error:
                logger.warning("%s: refused a link: %r", self.settings.name,
                               error.__cause__ or error)
                await trio.aclose_forcefully(tls_stream)
                return
            if _common_name(tls_stream.getpeercert()) != BROKER_NAME:
                logger.warning("%s: refused a link from a certificate not the broker's",
                               self.settings.name)
                await trio.aclose_forcefully(tls_stream)
                return
            stream = tls_stream
        async with trio.open_nursery() as nursery:
            with trio.fail_after(HANDSHAKE_TIMEOUT):
                request = await wrap_server_stream(
                    nursery, stream, max_message_size=MAX_FRAME_BYTES,
                    receive_buffer_size=RECEIVE_BYTES,
                )
                if self.tls is None and _header(request, "x-client-subject") != BROKER_SUBJECT:
                    # NGINX checked the certificate chain; the subject must be the broker's.
                    logger.warning("%s: refused a link from %r", self.settings.name,
                                   _header(request, "x-client-subject"))
                    await request.reject(403)
                    nursery.cancel_scope.cancel()
                    return
                # Bundles both ways if the broker offers them (``link.BUNDLES``).
                websocket = await request.accept(
                    subprotocol=BUNDLES if BUNDLES in request.proposed_subprotocols else None)
            await self._serve_broker(websocket)
            nursery.cancel_scope.cancel()

    async def _serve_broker(self, websocket: WebSocketConnection) -> None:
        if self.connection_scope is not None:
            self.connection_scope.cancel()
        with trio.CancelScope() as scope:
            self.connection_scope = scope
            outbox = Outbox(websocket, bundling=websocket.subprotocol == BUNDLES)
            self.uplink.outbox = outbox
            try:
                await self.uplink.send(TowerHello(self.settings.name, self.settings.capacity,
                                                  __version__))
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(outbox.write_all)
                    nursery.start_soon(self._report_load)
                    await self._read(websocket)
                    nursery.cancel_scope.cancel()
            except* OutboxStalled as stalled:
                # The broker stopped reading: it will link again once it can.
                logger.warning("%s: the broker's link dropped: %s", self.settings.name,
                               stalled.exceptions[0])
            finally:
                # The broker gave those sessions up with this connection (it moves them
                # elsewhere), whether the connection broke or a new one replaced it.
                self._close_peers_opened_by(websocket)
                if self.uplink.outbox is outbox:
                    self.uplink.outbox = None
                    self.connection_scope = None
                with trio.CancelScope(shield=True), trio.move_on_after(CLOSE_TIMEOUT):
                    await websocket.aclose()

    async def _report_load(self) -> None:
        process = psutil.Process()
        while True:
            usage = process_usage(process)
            answered = [entry for entry in self.peers_by_session.values() if entry.answered]
            await self.uplink.send(TowerLoadReport(
                len(answered), self.settings.capacity,
                cpu_seconds=usage.cpu_seconds, resident_bytes=usage.resident_bytes,
                used=sum(entry.weight for entry in answered),
            ))
            await trio.sleep(self.settings.load_interval)

    async def _read(self, websocket: WebSocketConnection) -> None:
        while True:
            try:
                data = await websocket.get_message()
            except ConnectionClosed:
                return
            await self._take(data, websocket)

    async def _take(self, data: bytes, websocket: WebSocketConnection,
                    bundled: bool = False) -> None:
        """Take one frame of the broker's (each of a bundle's in turn)."""
        try:
            message = codec.decode(data)
        except DecodeError as error:
            await self.uplink.send(LinkError(str(error)))
            return
        if isinstance(message, Bundle) and not bundled:
            if len(message.frames) > BUNDLE_FRAMES:
                await self.uplink.send(LinkError(
                    f"a bundle of {len(message.frames)} frames, over {BUNDLE_FRAMES}"))
                return
            for frame in message.frames:
                await self._take(frame, websocket, bundled=True)
        elif isinstance(message, OpenPeer):
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
        elif isinstance(message, RenewCertificate):
            # Off the read loop: key generation and NGINX's reload take a while, and
            # the sessions' frames must not wait behind them.
            self.start_soon(self._renewal_step, self._request_certificate)
        elif isinstance(message, CertificateIssued):
            self.start_soon(self._renewal_step, self._install, message.certificate)
        elif isinstance(message, CertificateRefused):
            logger.warning("%s: the broker refused a new certificate: %s",
                           self.settings.name, message.reason)
            self.pending_key = None
        elif isinstance(message, LinkError):
            # Why the broker refused one of ours (a load report, say): said, not answered.
            logger.warning("%s: the broker refused a frame: %s", self.settings.name,
                           message.message[:200])
        else:
            # A bundle in a bundle too: a broker that bundles sends its frames flat.
            await self.uplink.send(LinkError(f"a tower does not take {type(message).__name__}"
                                             + (" in a bundle" if bundled else "")))

    async def _open(self, request: OpenPeer, opened_by: object) -> None:
        weight = session_weight(request.application, self.settings.video_weight,
                                self.settings.capacity)
        previous = self.peers_by_session.get(request.session)
        if previous is not None and request.negotiation < previous.negotiation:
            # Never from a broker that works: its negotiations only count up.
            await self.uplink.send(LinkError(
                f"an offer for negotiation {request.negotiation} of {request.session}, "
                f"whose peer is at negotiation {previous.negotiation}: not taken"))
            return
        # A session negotiating again gives back what its last peer took (a session of
        # the video application answered without video took one place, not its weight).
        freed = 0 if previous is None else previous.weight
        if self.used - freed + weight > self.settings.capacity:
            # The broker places by this tower's reports, which lag: the offer goes
            # elsewhere, and the peers here are not overloaded.
            await self.uplink.send(PeerRejected(
                request.session, request.negotiation, TOWER_FULL,
                f"{self.settings.name} is full (capacity {self.settings.capacity})"))
            return
        if previous is not None:
            self._close(request.session, previous.negotiation)
        self.opened += 1
        # Unique even when a refused offer's peer is still on its way out.
        name = f"peer:{request.session}:{request.negotiation}:{self.opened}"

        # The offer goes in a message, not in the factory: the supervisor keeps a
        # child's spec as long as the child lives.
        make = functools.partial(
            Peer, request.session, request.negotiation, self.uplink.send, self.settings.peer,
            self.ref,
        )
        # Started, given its offer and recorded as one step: a link replaced half-way
        # (its reader cancelled) would leave a peer that nobody tracks, counts or closes.
        # Recorded, it is closed with the rest of that link's peers.
        with trio.CancelScope(shield=True):
            try:
                ref = await self.peers.start_child(
                    ChildSpec(name, make, restart=Restart.TEMPORARY))
            except ValueError as error:
                refused = error
            else:
                refused = None
                await ref.tell(request)
                self._record(request.session,
                             PeerEntry(request.negotiation, ref, opened_by, weight))
                self.session_of_peer[ref] = request.session
                self.collector.opened()
                self.monitor(ref)
        if refused is not None:
            await self.uplink.send(LinkError(f"cannot open {name}: {refused}"))

    def _record(self, session: str, entry: PeerEntry) -> None:
        previous = self.peers_by_session.get(session)
        self.used += entry.weight - (0 if previous is None else previous.weight)
        self.peers_by_session[session] = entry

    def _forget(self, session: str) -> None:
        self.used -= self.peers_by_session.pop(session).weight

    async def receive(self, message: object) -> None:
        if isinstance(message, Answered):
            session = self.session_of_peer.get(message.peer)
            entry = None if session is None else self.peers_by_session.get(session)
            if entry is not None and entry.ref == message.peer:
                weight = (min(self.settings.video_weight, self.settings.capacity)
                          if message.sends_video else 1)
                self._record(session, replace(entry, weight=weight, answered=True))
            return None
        if not isinstance(message, Down):
            return await super().receive(message)
        session = self.session_of_peer.pop(message.ref, None)
        if session is None:
            return  # a peer of this server's previous incarnation
        self.collector.closed_one()
        entry = self.peers_by_session.get(session)
        if entry is not None and entry.ref == message.ref:
            self._forget(session)

    def _close(self, session: str, negotiation: int) -> None:
        entry = self.peers_by_session.get(session)
        if entry is None or entry.negotiation != negotiation:
            return
        self._forget(session)
        # Each peer closes itself, in its own time: the link's other sessions, and the
        # peers opened next (started by the same supervisor), do not wait behind it.
        self.start_soon(entry.ref.tell, Close())

    async def _terminate(self, name: str) -> None:
        try:
            await self.peers.terminate_child(name)
        except LookupError:
            pass

    async def _renewal_step(self, step: Callable[..., Awaitable[None]], *args: Any) -> None:
        # A step that fails here (an identity file that cannot be written, a full disk)
        # fails the renewal, which the broker tries again; it never ends the server.
        try:
            with trio.move_on_after(RENEWAL_STEP_TIMEOUT) as deadline:
                await step(*args)
        except OSError as error:
            logger.warning("%s: a certificate renewal step failed: %s", self.settings.name,
                           error)
            await self.uplink.send(LinkError(f"a certificate renewal step failed: {error}"))
            return
        if deadline.cancelled_caught:
            await self.uplink.send(LinkError(
                f"a certificate renewal step took over {RENEWAL_STEP_TIMEOUT:g} s"))

    async def _request_certificate(self) -> None:
        # RSA keys take a while to make: off the link's task.
        self.pending_key, csr = await trio.to_thread.run_sync(
            generate_key_and_csr, self.settings.name, self.settings.key_type
        )
        await self.uplink.send(CertificateRequest(csr))

    async def _install(self, certificate: bytes) -> None:
        key = self.pending_key
        if key is None or not _matches(key, certificate):
            await self.uplink.send(LinkError("a certificate that is not for the key asked for"))
            return
        self.pending_key = None
        previous = self.settings.identity.read_bytes()
        write_secret(self.settings.identity, key + certificate)
        if self.tls is not None:
            self.tls.load_cert_chain(self.settings.identity)
        else:
            # NGINX's configuration is checked with the new files before it reloads:
            # a reload that fails leaves NGINX running on the old ones, silently.
            for command in (self.settings.check, self.settings.reload):
                failure = await _run(command)
                if failure:
                    write_secret(self.settings.identity, previous)
                    await self.uplink.send(LinkError(
                        f"NGINX did not take the new certificate: {failure}"))
                    return
        self.renewals += 1
        await self.uplink.send(CertificateInstalled())

    def _close_peers_opened_by(self, connection: object) -> None:
        for session, entry in list(self.peers_by_session.items()):
            if entry.opened_by is connection:
                self._close(session, entry.negotiation)


async def _run(command: tuple[str, ...]) -> str:
    """Run ``command`` (if any); returns its complaint when it fails, else ""."""
    if not command:
        return ""
    try:
        result = await trio.run_process(
            list(command), capture_stdout=True, capture_stderr=True, check=False
        )
    except OSError as error:  # not there, not executable
        return str(error)
    if result.returncode == 0:
        return ""
    return (result.stderr or result.stdout).decode(errors="replace").strip()[-500:]


def _header(request: Any, name: str) -> str:
    for key, value in request.headers:
        if key.decode("latin-1").lower() == name:
            return value.decode("latin-1")
    return ""


def _matches(key_pem: bytes, certificate_pem: bytes) -> bool:
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
        certificate = x509.load_pem_x509_certificate(certificate_pem)
    except ValueError:
        return False
    der = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    return key.public_key().public_bytes(*der) == certificate.public_key().public_bytes(*der)


def _common_name(certificate: dict | None) -> str:
    for entry in (certificate or {}).get("subject", ()):
        for key, value in entry:
            if key == "commonName":
                return value
    return ""


async def run_agent(settings: AgentSettings) -> None:
    """Run a tower agent: a local one until its stdin closes, one behind NGINX until it
    is cancelled (SIGINT/SIGTERM)."""
    if settings.socket is not None:
        listeners = [await _unix_listener(settings.socket)]
    else:
        listeners = await trio.open_tcp_listeners(settings.port, host=settings.host)
    peers_flags = SupervisorFlags(intensity=1_000_000, period=1)
    children = [
        ChildSpec("peers", lambda: Supervisor((), peers_flags)),
        ChildSpec("link", lambda: CommunicationServer(settings, listeners)),
    ]
    async with open_system(settings.name, children=children):
        if settings.socket is not None:
            await trio.sleep_forever()
        port = listeners[0].socket.getsockname()[1]
        print(f"ready {settings.host} {port}", flush=True)
        await _wait_for_end_of_input()


class AlreadyRunning(Exception):
    """Another agent holds this tower's lock."""


def hold_agent_lock(directory: Path) -> int:
    """Take the tower directory's agent lock (held until the process ends) and write the
    pid file; returns the lock's descriptor.

    Raises:
        AlreadyRunning: another agent holds it.
    """
    descriptor = os.open(directory / "agent.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(descriptor)
        raise AlreadyRunning(f"an agent already runs in {directory}") from None
    (directory / "agent.pid").write_text(f"{os.getpid()}\n")
    return descriptor


def load_agent_config(path: Path) -> AgentSettings:
    """The settings of an agent behind NGINX, from the TOML file provisioning wrote.

    Raises:
        ValueError: the file is missing, not TOML, or lacks a setting (message says which).
    """
    try:
        with open(path, "rb") as file:
            values = tomllib.load(file)
        # Absent from the files of towers provisioned before they were written there.
        values.setdefault("negotiation_deadline", PeerSettings.negotiation_deadline)
        values.setdefault("video_weight", Settings.video_weight)
        values.setdefault("check", [])
        peer = PeerSettings(
            _seconds(values, "heartbeat_interval"), _seconds(values, "heartbeat_timeout"),
            tower=_text(values, "name"),
            negotiation_deadline=_seconds(values, "negotiation_deadline"),
        )
        return AgentSettings(
            name=_text(values, "name"),
            identity=Path(_text(values, "identity")),
            socket=Path(_text(values, "socket")),
            check=_command(values, "check"),
            reload=_command(values, "reload"),
            key_type=_key_type(values.get("key_type", "ec")),
            capacity=_count(values, "capacity"),
            video_weight=_count(values, "video_weight"),
            load_interval=_seconds(values, "load_interval"),
            peer=peer,
        )
    except OSError as error:
        raise ValueError(f"cannot read {path}: {error.strerror}") from None
    except tomllib.TOMLDecodeError as error:
        raise ValueError(f"{path} is not valid TOML: {error}") from None
    except KeyError as error:
        raise ValueError(f"{path} has no {error.args[0]!r}") from None
    except (TypeError, ValueError) as error:
        raise ValueError(f"{path}: {error}") from None


# The agent's settings by type: a value of another kind (a command as one string, a
# capacity of 2.9) is refused by name, not turned into something else.


def _text(values: dict[str, Any], key: str) -> str:
    value = values[key]
    if not isinstance(value, str) or not value:
        raise ValueError(f"{key} must be a non-empty string, not {value!r}")
    return value


def _command(values: dict[str, Any], key: str) -> tuple[str, ...]:
    value = values[key]
    if not isinstance(value, list) or not all(isinstance(word, str) for word in value):
        raise ValueError(f"{key} must be a command as a list of words, not {value!r}")
    return tuple(value)


def _count(values: dict[str, Any], key: str) -> int:
    value = values[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{key} must be a whole number of at least 1, not {value!r}")
    return value


def _seconds(values: dict[str, Any], key: str) -> float:
    value = values[key]
    if isinstance(value, bool) or not isinstance(value, int | float) or not (
            math.isfinite(value) and value > 0):
        raise ValueError(f"{key} must be a number of seconds above 0, not {value!r}")
    return float(value)


def _key_type(value: Any) -> KeyType:
    if value not in ("ec", "rsa"):
        raise ValueError(f"key_type is 'ec' or 'rsa', not {value!r}")
    return value


async def _unix_listener(path: Path) -> trio.SocketListener:
    # A socket left by an agent that died is in the way; the lock says none runs now.
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    # Bound before the mode is narrowed would leave a moment for anyone on the host. In a
    # set-group-ID directory (a root tower's, of NGINX's workers' group) that group may
    # connect too; elsewhere only the owner.
    shared = path.parent.stat().st_mode & stat.S_ISGID
    previous = os.umask(0o117 if shared else 0o177)
    try:
        await sock.bind(str(path))
    finally:
        os.umask(previous)
    sock.listen(128)
    return trio.SocketListener(sock)


async def _wait_for_end_of_input() -> None:
    # A duplicate: FdStream closes the descriptor it is given, and 0 is sys.stdin's.
    async with trio.lowlevel.FdStream(os.dup(sys.stdin.fileno())) as stdin:
        try:
            while await stdin.receive_some(1024):
                pass
        except (OSError, trio.BrokenResourceError):
            pass
