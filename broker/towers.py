"""The broker's side of its towers: links over mutual TLS, the directory, local agents.

Theory of operation: each tower has a ``tower:<name>`` supervisor. Its ``link`` actor
dials the tower's communication server (a WebSocket over mutual TLS: the broker shows
its client certificate, the tower's certificate must name the tower and be issued by
the broker's CA), waits for ``TowerHello``, then reads frames until the link breaks, the
tower's certificate is revoked or expires, or no load report of the tower's is taken
for ``tower_silence`` seconds of the broker's own time (whatever else it sends: see
``TowerLink._read``). While a link is up its
``TowerConnection`` is in the ``TowerDirectory``, where sessions find towers: placement
reads the load reports, negotiations send their offers and get their answers routed
back by session id. When a link ends, its connection's ``closed`` event fires and every
negotiation on it fails at once ("tower lost"); the link actor crashes and its
supervisor reconnects with backoff.

A local tower (the embedded default) also has an ``agent`` actor before the link, which
runs ``broker tower run`` as a child process and restarts it when it dies
(``rest_for_one``: a new agent process means a new link).
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import math
import reprlib
import ssl
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import trio
from cryptography import x509
from trio_websocket import (
    ConnectionClosed,
    HandshakeError,
    WebSocketConnection,
    wrap_client_stream,
)

from actors import Actor, ActorRef, Backoff, ChildSpec, MailboxFull, Strategy, Supervisor
from actors import DecodeError, Exit, Restart, SupervisorFlags

from .config import Settings
from .issuer import Issuer, LedgerDamaged
from .outbox import Outbox, OutboxClosed, OutboxStalled
from .link import (
    BUNDLE_FRAMES,
    BUNDLES,
    CLOSE_TIMEOUT,
    Bundle,
    CertificateInstalled,
    CertificateIssued,
    CertificateRefused,
    CertificateRequest,
    RenewCertificate,
    MAX_FRAME_BYTES,
    LinkError,
    OFFER_REFUSALS,
    RECEIVE_BYTES,
    TOWER_FULL,
    PeerAnswer,
    PeerRejected,
    PeerState,
    TowerHello,
    TowerLoadReport,
    codec,
)
from .metrics import ProcessUsage
from .pki import CLOCK_SKEW, CertificateError
from .placement import Placement, TowerLoad

logger = logging.getLogger(__name__)

CONNECT_TIMEOUT = 5.0
RENEWAL_TIMEOUT = 30.0
# The longest renewal sleeps before it reads the wall clock again.
RENEWAL_RECHECK = 60.0
SEND_TIMEOUT = 5.0
# A tower's silence is counted in steps of at most this long (``TowerLink._read``); past
# this many silences of the wall clock, its link ends once it delivers nothing.
SILENCE_STEP = 0.1
SILENCE_CEILING = 3
AGENT_START_TIMEOUT = 30.0
AGENT_STOP_TIMEOUT = 3.0
# At most one log line per this long about the frames a tower refused (LinkError).
REFUSAL_LOG_INTERVAL = 60.0
# The share of the broker's time a tower's refused frames may take, in bursts of at most
# REFUSED_FRAMES_BURST seconds (decoding is the cost: 256 KiB of nested empty maps takes
# some 20 ms). Their cost is counted in the broker thread's CPU time, so that a pause of
# the process while one is decoded is not held against the tower. Past it, the link is
# dropped: a tower cannot keep the broker's one thread busy with frames it can make
# cheaply, while reports now and then keep it linked.
REFUSED_FRAMES_SHARE = 0.1
REFUSED_FRAMES_BURST = 0.5


class TowerGone(Exception):
    """The tower's link is closed; nothing more can be sent to it."""


class TowerLinkLost(Exception):
    """The link to a tower broke or went silent."""


class AgentExited(Exception):
    """A local tower agent process ended."""


# The refusals of an offer (the others are of a candidate): each settles its offer, as
# its answer or its peer's end does.
_OFFER_REFUSALS = OFFER_REFUSALS | {TOWER_FULL}


class TowerConnection:
    """One live link to a tower: send to it, and route its session messages back.

    At most ``offers_at_once`` offers are on the link unanswered: past that, an offer
    waits its turn, first come first served, until one of them is answered, refused or
    given up. A tower answers its offers one after another, between its sessions' media
    and messages: a burst of offers sent together (hundreds of sessions repaired onto it
    when another tower fails) would stall those sessions until the last was answered,
    and every offer of the burst would wait for all the others.
    """

    def __init__(
        self,
        name: str,
        websocket: WebSocketConnection,
        hello: TowerHello,
        certificate: x509.Certificate | None = None,
        offers_at_once: int = Settings.max_unanswered_offers,
        bundling: bool = False,
    ) -> None:
        self.name = name
        self.capacity = hello.capacity
        # The certificate the link runs on: the one the tower showed, then each renewed.
        self.certificate = certificate
        self.closed = trio.Event()
        self.undeliverable = 0
        self.outbox = Outbox(websocket, bundling=bundling)
        self._routes: dict[str, ActorRef] = {}
        self.offers_at_once = offers_at_once
        # The offers sent and not settled: each session's negotiation.
        self.offers_out: dict[str, int] = {}
        # Turns taken: the offers out, and each turn handed to a waiting offer (its
        # negotiation about to send it).
        self._turns = 0
        self._waiting_offers = trio.lowlevel.ParkingLot()

    @property
    def certificate_expires(self) -> datetime | None:
        return None if self.certificate is None else self.certificate.not_valid_after_utc

    @property
    def negotiating(self) -> int:
        """This broker's sessions with a negotiation on the tower now (routed here):
        whether counted in its load or not (one being repaired, waiting for its client's
        offer, is not)."""
        return len(self._routes)

    async def offer_turn(self, session: str, negotiation: int) -> None:
        """Wait for the turn of ``session``'s offer for ``negotiation`` (see the class),
        then count it as out until it is settled: the offer is to be sent at once."""
        if self._turns < self.offers_at_once:
            self._turns += 1
        else:
            await self._waiting_offers.park()  # woken with a turn handed over
        self._offer_settled(session)  # a session has one offer out at most
        self.offers_out[session] = negotiation
    def waiting_offers(self) -> int:
        return self._waiting_offers.statistics().tasks_waiting

    def _offer_settled(self, session: str, negotiation: int | None = None) -> None:
        out = self.offers_out.get(session)
        if out is None or negotiation not in (None, out):
            return
        del self.offers_out[session]
        if not self._waiting_offers.unpark():
            self._turns -= 1

    async def send(self, message: object) -> None:
        """Send one message to the tower.

        The frame is queued for the link's writer (see ``broker.outbox``).

        Raises:
            TowerGone: the link is closed, or so congested that a frame waited
                ``SEND_TIMEOUT`` seconds for room (then the link is as good as gone for a
                negotiation with a deadline).
        """
        if self.closed.is_set():
            raise TowerGone(f"{self.name} is gone")
        try:
            with trio.fail_after(SEND_TIMEOUT):
                await self.outbox.put(codec.encode(message))
        except OutboxClosed:
            raise TowerGone(f"{self.name} is gone") from None
        except trio.TooSlowError:
            raise TowerGone(f"{self.name} took over {SEND_TIMEOUT:g} s to take a frame") from None

    def send_nowait(self, message: object) -> bool:
        """Queue one message if the link takes it at once (for whoever cannot wait: an
        actor that was killed); False if it is full or gone."""
        return not self.closed.is_set() and self.outbox.put_nowait(codec.encode(message))

    def route(self, session: str, ref: ActorRef) -> None:
        """Deliver the tower's messages about ``session`` to ``ref`` from now on."""
        self._routes[session] = ref

    def unroute(self, session: str, ref: ActorRef) -> None:
        if self._routes.get(session) == ref:
            del self._routes[session]
            self._offer_settled(session)

    def deliver(self, message: PeerAnswer | PeerRejected | PeerState) -> None:
        if not isinstance(message, PeerRejected) or message.code in _OFFER_REFUSALS:
            self._offer_settled(message.session, message.negotiation)
        ref = self._routes.get(message.session)
        if ref is None:
            # A peer's last words after its negotiation ended: expected, not an error.
            self.undeliverable += 1
            return
        try:
            ref.tell_nowait(message)
        except MailboxFull:
            self.undeliverable += 1


class TowerDirectory:
    """The towers linked right now, and placement over their load reports."""

    def __init__(self, stale_after: float) -> None:
        self._connections: dict[str, TowerConnection] = {}
        self.placement = Placement(stale_after=stale_after)
        # What each tower's agent process costs, as it last reported.
        self.usage: dict[str, ProcessUsage] = {}
        # Towers an operator drained: they keep their sessions and take no new ones.
        self.draining: set[str] = set()

    def get(self, name: str) -> TowerConnection | None:
        return self._connections.get(name)

    def __iter__(self):
        return iter(list(self._connections.values()))

    def __len__(self) -> int:
        return len(self._connections)

    def connected(self, connection: TowerConnection) -> None:
        self._connections[connection.name] = connection

    def disconnected(self, connection: TowerConnection) -> None:
        connection.closed.set()
        if self._connections.get(connection.name) is connection:
            del self._connections[connection.name]
            self.placement.forget(connection.name)
            self.usage.pop(connection.name, None)

    def report(self, name: str, report: TowerLoadReport) -> None:
        """Take a linked tower's load report.

        Raises:
            ValueError: the report has negative or non-finite figures, or claims more
                capacity than the tower's hello did; nothing of it is taken.
        """
        cpu, resident = report.cpu_seconds, report.resident_bytes
        if (cpu is not None and not (math.isfinite(cpu) and cpu >= 0)) or (
                resident is not None and resident < 0):
            raise ValueError(f"{name}: a load report with impossible usage (cpu_seconds "
                             f"{cpu!r}, resident_bytes {resident!r})")
        connection = self._connections.get(name)
        if connection is not None and report.capacity > connection.capacity:
            # One tower's word must not steer placement and the scaler for all.
            raise ValueError(f"{name}: a load report claiming a capacity of "
                             f"{report.capacity}, more than the {connection.capacity} "
                             "of its hello")
        if connection is not None:
            load = TowerLoad(name, report.sessions, report.capacity, report.draining,
                             report.used)
            self.placement.report(load, trio.current_time())
            if cpu is not None and resident is not None:
                self.usage[name] = ProcessUsage(cpu, resident)

    def drain(self, name: str) -> None:
        """Take no new sessions on ``name``. Raises LookupError if it is not linked."""
        if name not in self._connections:
            raise LookupError(f"no tower {name} is linked")
        self.draining.add(name)

    def undrain(self, name: str) -> None:
        """Place new sessions on ``name`` again. Raises LookupError if it is not linked."""
        if name not in self._connections:
            raise LookupError(f"no tower {name} is linked")
        self.draining.discard(name)

    def is_draining(self, name: str) -> bool:
        """Whether ``name`` takes no new sessions: drained here (by an operator or the
        scaler) or by itself (its load report says so)."""
        load = self.placement.load_of(name)
        return name in self.draining or (load is not None and load.draining)

    def state_of(self, name: str, now: float) -> str:
        """``draining``, ``stale`` (no load report within the staleness window) or
        ``ready`` (full or not), as metrics and the shell show a linked tower."""
        if self.is_draining(name):
            return "draining"
        return "ready" if self.placement.is_fresh(name, now) else "stale"

    def choose(
        self, exclude: frozenset[str] = frozenset(), weight: int = 1,
        unanswered_below: int | None = None,
    ) -> TowerConnection | None:
        """A linked tower for a session taking ``weight`` of its capacity (two choices),
        or None if none has room for it (or, with ``unanswered_below``, none with room
        has fewer offers unanswered than that)."""
        name = self.placement.choose(trio.current_time(), exclude | self.draining, weight,
                                     unanswered_below)
        return None if name is None else self._connections.get(name)

    def has_room(self, weight: int = 1) -> bool:
        """Whether a linked tower has room for a session of ``weight``, however many
        offers it has not answered."""
        return bool(self.placement.ready(trio.current_time(), self.draining, weight))

    def ready_count(self) -> int:
        return len(self.placement.ready(trio.current_time(), exclude=self.draining))


@dataclass
class TowerAddress:
    """Where a tower's communication server listens (a local agent fills it in)."""

    host: str = ""
    port: int = 0


@dataclass(frozen=True)
class LinkContext:
    """What every tower link shares: where linked towers go, the broker's TLS client
    context, the settings, and the issuer that renews tower certificates."""

    directory: TowerDirectory
    tls: ssl.SSLContext
    settings: Settings
    issuer: Issuer


class TowerLink(Actor):
    """The broker's end of one tower's link."""

    runs_tasks = True

    def __init__(self, name: str, address: TowerAddress, context: LinkContext) -> None:
        self.name = name
        self.address = address
        self.directory = context.directory
        self.tls = context.tls
        self.settings = context.settings
        self.issuer = context.issuer
        # Why the last frame was refused, since the last load report taken.
        self.last_refusal = ""
        # The broker's CPU seconds refused frames may still take, as of
        # ``refused_counted_at`` (``time.perf_counter``).
        self.refused_allowance = REFUSED_FRAMES_BURST
        self.refused_counted_at: float | None = None
        # The frames the tower refused (its LinkErrors), and the logging of them.
        self.refused_by_tower = 0
        self.refusals_unlogged = 0
        self.refusal_logged_at: float | None = None
        self.renewals = 0
        self.renewing = False
        # The tower's certificate now: the one it showed, then each one renewed.
        self.certificate: x509.Certificate | None = None
        self.renewal_replies: trio.MemorySendChannel[object] | None = None

    async def started(self) -> None:
        self.start_soon(self._run)

    async def _run(self) -> None:
        # The link's end is raised after the nursery, so the crash reason is the error
        # itself rather than an exception group around it.
        lost: TowerLinkLost | None = None
        try:
            async with trio.open_nursery() as nursery:
                try:
                    await self._link(nursery)
                except TowerLinkLost as error:
                    lost = error
                nursery.cancel_scope.cancel()
        except* HandshakeError as group:
            lost = _refused(self.name, group)
        except* TowerLinkLost as group:
            # From a task of the link's (renewal refused, say): the first says why.
            lost = group.exceptions[0]  # type: ignore[assignment]
        if lost is not None:
            raise lost

    async def _link(self, nursery: trio.Nursery) -> None:
        websocket, self.certificate = await dial_tower(
            nursery, self.address.host, self.address.port, self.name, self.tls
        )
        try:
            hello = await receive_hello(websocket, self.name, self.settings.tower_silence)
            if hello.capacity > self.settings.tower_capacity:
                # Every tower is given tower_capacity; one claiming more would draw
                # every session and hide the load from the scaler.
                raise TowerLinkLost(
                    f"{self.name}: its hello claims a capacity of {hello.capacity}, more "
                    f"than the {self.settings.tower_capacity} of tower_capacity")
            self._check_not_revoked()
            connection = TowerConnection(self.name, websocket, hello, self.certificate,
                                         self.settings.max_unanswered_offers,
                                         bundling=websocket.subprotocol == BUNDLES)
            self.directory.connected(connection)
            send, receive = trio.open_memory_channel[object](1)
            self.renewal_replies = send
            try:
                nursery.start_soon(self._write, connection)
                nursery.start_soon(self._renew, connection, receive)
                nursery.start_soon(self._watch_certificate)
                await self._read(websocket, connection)
            finally:
                self.directory.disconnected(connection)
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(CLOSE_TIMEOUT):
                await websocket.aclose()

    async def _write(self, connection: TowerConnection) -> None:
        try:
            await connection.outbox.write_all()
        except OutboxStalled as error:
            raise TowerLinkLost(f"{self.name}: {error}") from None

    async def _receive(self, websocket: WebSocketConnection, deadline: float) -> bytes | None:
        """The tower's next frame, or None when none came by ``deadline``."""
        with trio.move_on_at(deadline):
            try:
                return await websocket.get_message()
            except ConnectionClosed as closed:
                raise TowerLinkLost(f"{self.name}: link closed ({closed.reason})") from None
        return None

    async def _read(self, websocket: WebSocketConnection, connection: TowerConnection) -> None:
        silence = self.settings.tower_silence
        # Only a load report that is taken is the tower's heartbeat: a tower that sends
        # anything else, or reports nothing placement can use, is silent all the same.
        # The silence is counted in steps, each for at most its own length: a step that
        # ended late was this process's own delay, not the tower's. A broker paused (a
        # VM, swapping) or too busy to read its link in time (2,000 sessions ending at
        # once kept it from the link for 6 s) finds the reports waiting in the socket.
        # Time spent taking frames counts (a tower that floods frames without a report
        # is silent all the same). Past SILENCE_CEILING silences of the wall clock, two
        # steps in a row begun then with nothing at all from the tower end the link,
        # however late the broker: a dead tower is not kept for as long as the broker
        # is busy, and one whose frames wait in the socket after a pause is read first.
        silent_for = 0.0
        counted_to = heard_at = trio.current_time()
        empty_past_ceiling = 0
        while True:
            started = trio.current_time()
            data = await self._receive(websocket, started + SILENCE_STEP)
            now = trio.current_time()
            silent_for += min(now - counted_to, SILENCE_STEP)
            counted_to = now
            if data is None:
                if started - heard_at >= SILENCE_CEILING * silence:
                    empty_past_ceiling += 1
            else:
                empty_past_ceiling = 0
                if self._take(connection, data):
                    silent_for, heard_at = 0.0, now
            if silent_for >= silence or empty_past_ceiling >= 2:
                raise TowerLinkLost(self._silent(silence))

    def _take(self, connection: TowerConnection, data: bytes, bundled: bool = False) -> bool:
        """Take one frame of the tower's (each of a bundle's in turn); True if a load
        report was taken among them."""
        started = time.thread_time()
        try:
            message = codec.decode(data)
        except DecodeError as error:
            self._refuse(connection, str(error), started)
            return False
        if isinstance(message, Bundle) and not bundled:
            if len(message.frames) > BUNDLE_FRAMES:
                self._refuse(connection, f"a bundle of {len(message.frames)} frames, over "
                             f"{BUNDLE_FRAMES}", started)
                return False
            taken = [self._take(connection, frame, bundled=True) for frame in message.frames]
            return any(taken)
        if isinstance(message, TowerLoadReport):
            try:
                self.directory.report(self.name, message)
            except ValueError as error:
                # Not taken, not even as the tower's heartbeat for placement.
                self._refuse(connection, str(error), started)
                return False
            self.last_refusal = ""
            return True
        if isinstance(message, (PeerAnswer, PeerRejected, PeerState)):
                connection.deliver(message)
        elif isinstance(message, (CertificateRequest, CertificateInstalled)):
            assert self.renewal_replies is not None
            try:
                self.renewal_replies.send_nowait(message)
            except trio.WouldBlock:
                self._refuse(connection, f"a {type(message).__name__} nobody asked for",
                             started)
        elif isinstance(message, LinkError):
            self._refused_by_tower(message)
            if self.renewing:  # most likely the renewal's own failure: heard at once
                assert self.renewal_replies is not None
                with contextlib.suppress(trio.WouldBlock):
                    self.renewal_replies.send_nowait(message)
        else:
            # A bundle in a bundle too: a tower that bundles sends its frames flat.
            self._refuse(connection, f"a tower does not send {type(message).__name__}"
                         + (" in a bundle" if bundled else ""), started)
        return False

    def _refuse(self, connection: TowerConnection, reason: str, started: float) -> None:
        """Refuse a frame whose handling began at ``started`` (``time.thread_time``)."""
        self.last_refusal = reason
        connection.send_nowait(LinkError(reason))  # best effort: never wait on it
        now = time.perf_counter()
        if self.refused_counted_at is not None:
            self.refused_allowance = min(REFUSED_FRAMES_BURST, self.refused_allowance + (
                now - self.refused_counted_at) * REFUSED_FRAMES_SHARE)
        self.refused_counted_at = now
        self.refused_allowance -= time.thread_time() - started
        if self.refused_allowance < 0:
            raise TowerLinkLost(
                f"{self.name}: the frames it sent that were refused took over "
                f"{REFUSED_FRAMES_SHARE:.0%} of the broker's time; the last refused: "
                f"{reason[:200]}")

    def _silent(self, silence: float) -> str:
        """Why the link is dropped for silence: a tower whose reports are all refused
        (one newer than this broker, say) must not look as if it said nothing."""
        if not self.last_refusal:
            return f"{self.name}: silent for {silence:g} s: no load report"
        return (f"{self.name}: silent for {silence:g} s: no load report taken, the last "
                f"frame refused: {self.last_refusal[:200]}")

    def _refused_by_tower(self, refusal: LinkError) -> None:
        # Logged at most once per REFUSAL_LOG_INTERVAL: a tower may send one per frame.
        self.refused_by_tower += 1
        now = trio.current_time()
        if (self.refusal_logged_at is not None
                and now - self.refusal_logged_at < REFUSAL_LOG_INTERVAL):
            self.refusals_unlogged += 1
            return
        more = (f" (and {self.refusals_unlogged} more since the last logged)"
                if self.refusals_unlogged else "")
        logger.warning("%s refused a frame: %s%s", self.name, _quoted(refusal.message), more)
        self.refusal_logged_at = now
        self.refusals_unlogged = 0

    async def _watch_certificate(self) -> None:
        """Drop the link once the tower's certificate is revoked, or expired without a
        renewal: checked every load interval, whatever the tower sends (or does not)."""
        while True:
            self._check_not_revoked()
            assert self.certificate is not None
            expires = self.certificate.not_valid_after_utc
            if datetime.now(timezone.utc) >= expires:
                raise TowerLinkLost(
                    f"{self.name}: its certificate {self.certificate.serial_number:x} "
                    f"expired at {expires} and was not renewed")
            await trio.sleep(self.settings.tower_load_interval)

    def _check_not_revoked(self) -> None:
        assert self.certificate is not None
        try:
            revoked = self.issuer.is_revoked(self.certificate.serial_number)
        except (CertificateError, OSError) as error:
            # A damaged ledger must not take every tower down; its last good reading
            # stands (kept by the issuer) until it is repaired.
            logger.error("%s: cannot read the revocations: %s", self.name, error)
            return
        if revoked:
            raise TowerLinkLost(
                f"{self.name}: its certificate {self.certificate.serial_number:x} is revoked"
            )

    async def _renew(
        self, connection: TowerConnection, replies: trio.MemoryReceiveChannel[object]
    ) -> None:
        """Renew the tower's certificate at 2/3 of its lifetime, for as long as the link
        lasts; a failed attempt is tried again after a tenth of the time left."""
        while True:
            assert self.certificate is not None
            await sleep_until_renewal(self.certificate)
            try:
                self.renewing = True
                try:
                    await self._renew_once(connection, replies)
                finally:
                    self.renewing = False
            except (RenewalFailed, TowerGone) as error:
                logger.warning("%s: certificate renewal failed: %s", self.name, error)
                left = self.certificate.not_valid_after_utc - datetime.now(timezone.utc)
                await trio.sleep(max(1.0, left.total_seconds() / 10))

    async def _renew_once(
        self, connection: TowerConnection, replies: trio.MemoryReceiveChannel[object]
    ) -> None:
        while True:  # a reply that came after an earlier attempt gave up is stale
            try:
                replies.receive_nowait()
            except trio.WouldBlock:
                break
        await connection.send(RenewCertificate())
        request = await _reply(replies, CertificateRequest)
        assert self.certificate is not None
        try:
            self._check_not_revoked()
            addresses = [self.address.host] if is_ip_address(self.address.host) else []
            certificate = self.issuer.sign(request.csr, self.name, addresses,
                                           replacing=self.certificate.serial_number)
        except OSError as error:
            raise RenewalFailed(f"the ledger cannot be written: {error}") from None
        except LedgerDamaged as error:
            # As for the revocation check: the tower is not to blame; tried again later.
            raise RenewalFailed(str(error)) from None
        except (TowerLinkLost, CertificateError) as error:
            with trio.move_on_after(CLOSE_TIMEOUT):
                await connection.send(CertificateRefused(str(error)))
            raise TowerLinkLost(f"{self.name}: no new certificate: {error}") from None
        await connection.send(CertificateIssued(certificate))
        await _reply(replies, CertificateInstalled)
        self.certificate = connection.certificate = x509.load_pem_x509_certificate(certificate)
        self.renewals += 1
        logger.info("%s: certificate renewed, valid until %s", self.name,
                    connection.certificate_expires)


async def dial_tower(
    nursery: trio.Nursery, host: str, port: int, name: str, tls: ssl.SSLContext
) -> tuple[WebSocketConnection, x509.Certificate]:
    """Open the link to tower ``name`` at ``host:port`` (its agent, or NGINX in front of it):
    mutual TLS, then the link's WebSocket. Returns it and the tower's certificate.

    Raises:
        TowerLinkLost: no connection, a TLS or WebSocket handshake failed (the message
            says why), or it all took over ``CONNECT_TIMEOUT`` seconds.
    """
    stream: trio.SocketStream | None = None
    try:
        with trio.fail_after(CONNECT_TIMEOUT):
            stream = await trio.open_tcp_stream(host, port)
            # The tower's certificate must name the tower, whatever its address.
            tls_stream = trio.SSLStream(stream, tls, server_hostname=name)
            await tls_stream.do_handshake()
            der = tls_stream.getpeercert(binary_form=True)
            assert der is not None  # the context requires a certificate
            websocket = await wrap_client_stream(
                nursery, tls_stream, name, "/link", max_message_size=MAX_FRAME_BYTES,
                receive_buffer_size=RECEIVE_BYTES, subprotocols=[BUNDLES],
            )
            return websocket, x509.load_der_x509_certificate(der)
    except BaseException as error:
        if stream is not None:  # nothing else will close it
            await trio.aclose_forcefully(stream)
        if isinstance(error, trio.TooSlowError):
            raise TowerLinkLost(f"{name}: no link within {CONNECT_TIMEOUT:g} s") from None
        if isinstance(error, HandshakeError):
            raise TowerLinkLost(f"{name}: {host}:{port} refused the link: {error}") from None
        if isinstance(error, (OSError, trio.BrokenResourceError)):
            cause = error.__cause__ if isinstance(error, trio.BrokenResourceError) else None
            raise TowerLinkLost(
                f"{name}: cannot link to {host}:{port}: {cause or error}"
            ) from None
        raise


async def probe_tower(
    host: str, port: int, name: str, tls: ssl.SSLContext, silence: float
) -> x509.Certificate:
    """Link to tower ``name``, take its hello and close: can it serve as a tower now?
    Returns its certificate.

    Raises:
        TowerLinkLost: it cannot (the message says why).
    """
    failure: TowerLinkLost | None = None
    certificate: x509.Certificate | None = None
    try:
        async with trio.open_nursery() as nursery:
            try:
                websocket, certificate = await dial_tower(nursery, host, port, name, tls)
                try:
                    await receive_hello(websocket, name, silence)
                finally:
                    with trio.move_on_after(CLOSE_TIMEOUT):
                        await websocket.aclose()
            except TowerLinkLost as error:
                failure = error
            nursery.cancel_scope.cancel()
    except* HandshakeError as group:
        failure = _refused(name, group)
    if failure is not None:
        raise failure
    assert certificate is not None
    return certificate


def _refused(name: str, group: BaseExceptionGroup) -> TowerLinkLost:
    # The WebSocket handshake's refusal (NGINX's 502 when the agent is not there)
    # surfaces from the connection's reader task, inside the nursery.
    return TowerLinkLost(f"{name}: the link was refused: {group.exceptions[0]!r}")


async def receive_hello(websocket: WebSocketConnection, name: str, silence: float) -> TowerHello:
    """The tower's first frame, which must be the hello of tower ``name``.

    Raises:
        TowerLinkLost: another frame, one that does not decode, none within ``silence``
            seconds, or the link closed.
    """
    with trio.move_on_after(silence):
        try:
            hello = codec.decode(await websocket.get_message())
        except ConnectionClosed as closed:
            raise TowerLinkLost(f"{name}: link closed ({closed.reason})") from None
        except DecodeError as error:
            raise TowerLinkLost(f"{name}: its hello did not decode: {error}") from None
        if not isinstance(hello, TowerHello) or hello.tower != name:
            raise TowerLinkLost(f"{name}: expected its hello, got {_quoted(hello)}")
        return hello
    raise TowerLinkLost(f"{name}: no hello within {silence:g} s")


class RenewalFailed(Exception):
    """A tower did not complete a certificate renewal in time, or answered out of turn."""


async def _reply(replies: trio.MemoryReceiveChannel[object], expected: type) -> Any:
    with trio.move_on_after(RENEWAL_TIMEOUT):
        message = await replies.receive()
        if isinstance(message, LinkError):
            raise RenewalFailed(f"the tower: {message.message[:200]}")
        if not isinstance(message, expected):
            raise RenewalFailed(f"expected {expected.__name__}, got {type(message).__name__}")
        return message
    raise RenewalFailed(f"no {expected.__name__} within {RENEWAL_TIMEOUT:g} s")


def renewal_delay(certificate: x509.Certificate, now: datetime) -> float:
    """Seconds until ``certificate`` is due for renewal: 2/3 of its lifetime, counted from
    its issue (``not_valid_before`` is back-dated by the clock-skew allowance)."""
    issued = certificate.not_valid_before_utc + CLOCK_SKEW
    due = issued + (certificate.not_valid_after_utc - issued) * 2 / 3
    return max(1.0, (due - now).total_seconds())


async def sleep_until_renewal(
    certificate: x509.Certificate,
    wall_clock: Callable[[], datetime] = lambda: datetime.now(timezone.utc),
) -> None:
    """Until ``certificate`` is due for renewal (``renewal_delay``).

    In steps of at most ``RENEWAL_RECHECK`` seconds, the wall clock read again each time:
    one that jumps (NTP at boot, a resumed VM) must not carry renewal past the expiry.
    """
    while True:
        delay = renewal_delay(certificate, wall_clock())
        await trio.sleep(min(delay, RENEWAL_RECHECK))
        if delay <= RENEWAL_RECHECK:
            return


def is_ip_address(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


@dataclass(frozen=True)
class TowerFiles:
    """A local tower's credentials, made by the broker's CA in the state directory."""

    identity: Path  # key and certificate
    ca: Path


class LocalTowerAgent(Actor):
    """Runs a local tower agent as a child process; its end is this actor's crash.

    ``credentials`` makes the tower's key and a fresh short-lived certificate; it is
    called at every start, so a restarted agent never runs on an expired certificate.
    """

    runs_tasks = True

    def __init__(
        self,
        name: str,
        credentials: Callable[[], TowerFiles],
        address: TowerAddress,
        settings: Settings,
    ) -> None:
        self.name = name
        self.credentials = credentials
        self.address = address
        self.settings = settings
        self.pid: int | None = None

    def command(self) -> list[str]:
        return [
            sys.executable, "-m", "broker", "tower", "run",
            "--name", self.name,
            "--listen", f"{self.settings.host}:0",
            "--identity", str(self.files.identity),
            "--ca", str(self.files.ca),
            "--capacity", str(self.settings.tower_capacity),
            "--video-weight", str(self.settings.video_weight),
            "--heartbeat-interval", str(self.settings.heartbeat_interval),
            "--heartbeat-timeout", str(self.settings.heartbeat_timeout),
            "--negotiation-deadline", str(self.settings.negotiation_deadline),
            "--load-interval", str(self.settings.tower_load_interval),
        ]  # fmt: skip

    async def started(self) -> None:
        self.files = self.credentials()
        await self.start(self._run)

    async def _run(self, task_status: trio.TaskStatus[None]) -> None:
        # stdin stays open and unused: the agent exits when it reads end-of-file, which
        # is what happens if this process dies without stopping it.
        process = await trio.lowlevel.open_process(
            self.command(), stdin=subprocess.PIPE, stdout=subprocess.PIPE
        )
        self.pid = process.pid
        try:
            assert process.stdout is not None
            line = "(nothing)"
            with trio.move_on_after(AGENT_START_TIMEOUT):
                line = await _read_line(process.stdout)
            parts = line.split()
            if len(parts) != 3 or parts[0] != "ready":
                raise AgentExited(f"{self.name}: the agent said {line!r} within "
                                  f"{AGENT_START_TIMEOUT:g} s, not ready")
            self.address.host, self.address.port = parts[1], int(parts[2])
            task_status.started()
            async with trio.open_nursery() as nursery:
                # Whatever it prints later must not fill the pipe and block it.
                nursery.start_soon(_discard, process.stdout)
                status = await process.wait()
                nursery.cancel_scope.cancel()
            raise AgentExited(f"{self.name}: the agent process ended with status {status}")
        finally:
            with trio.CancelScope(shield=True):
                await _stop_process(process)


async def _read_line(stream: trio.abc.ReceiveStream) -> str:
    data = b""
    while not data.endswith(b"\n"):
        chunk = await stream.receive_some(1)
        if not chunk:
            break
        data += chunk
    return data.decode(errors="replace").strip()


async def _discard(stream: trio.abc.ReceiveStream) -> None:
    while await stream.receive_some(65536):
        pass


async def _stop_process(process: trio.Process) -> None:
    if process.returncode is not None:
        return
    process.terminate()
    with trio.move_on_after(AGENT_STOP_TIMEOUT):
        await process.wait()
        return
    process.kill()
    await process.wait()


_TOWER_FLAGS = SupervisorFlags(
    strategy=Strategy.REST_FOR_ONE, intensity=5, period=30, backoff=Backoff(initial=0.2, maximum=5)
)


def local_tower_spec(
    name: str, credentials: Callable[[], TowerFiles], context: LinkContext
) -> ChildSpec:
    """The ``tower:<name>`` supervisor of a local tower: its agent process, then its link."""
    address = TowerAddress()
    settings = context.settings
    children = [
        ChildSpec("agent", lambda: LocalTowerAgent(name, credentials, address, settings)),
        ChildSpec("link", lambda: TowerLink(name, address, context)),
    ]
    return ChildSpec(f"tower:{name}", lambda: Supervisor(children, _TOWER_FLAGS))


class RemoteTower(Supervisor):
    """A provisioned tower's supervisor. When its link keeps failing past the restart
    intensity (the agent or NGINX on the host is gone), it stops and calls ``lost`` with
    the reason, so that the host is provisioned again rather than dialled forever."""

    def __init__(
        self, name: str, link: ChildSpec, lost: Callable[[str, str], None]
    ) -> None:
        super().__init__([link], _TOWER_FLAGS)
        self.name = name
        self.lost = lost

    async def escalate(self, child: str, exit: Exit) -> bool:
        self.lost(self.name, str(exit))
        self.stop()
        return False


def remote_tower_spec(
    name: str, host: str, port: int, context: LinkContext, lost: Callable[[str, str], None]
) -> ChildSpec:
    """The ``tower:<name>`` supervisor of a provisioned tower: its link, through NGINX."""
    address = TowerAddress(host, port)
    link = ChildSpec("link", lambda: TowerLink(name, address, context))
    return ChildSpec(
        f"tower:{name}", lambda: RemoteTower(name, link, lost), restart=Restart.TRANSIENT
    )


def towers_spec(specs: Callable[[], list[ChildSpec]]) -> ChildSpec:
    """The ``towers`` supervisor: one child per tower; a failing tower is retried alone."""
    flags = SupervisorFlags(intensity=1000, period=60, backoff=Backoff(initial=1, maximum=30))
    return ChildSpec("towers", lambda: Supervisor(specs(), flags))


_QUOTE = reprlib.Repr()
_QUOTE.maxstring = _QUOTE.maxother = 200


def _quoted(said: object) -> str:
    """What a tower said, for a log line or a crash reason: at most about 200 characters
    (a tower may send a frame of 256 KiB, as often as it likes)."""
    return _QUOTE.repr(said)
