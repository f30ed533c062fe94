"""The asyncio side of a tower's peer: one session's RTCPeerConnection and its application.

Theory of operation: the tower's actors live in trio; aiortc lives in asyncio. An actor
calls :func:`answer_offer` through ``actors.bridge.call_asyncio`` and gets a
:class:`TowerPeer` back. From then on everything per message stays here: the session
application (echo by default) answers data-channel messages itself, and the heartbeat
timer pings the client on its ``heartbeat`` channel. Only control events cross back to
trio, as :class:`PeerEvent` values handed to a plain synchronous callback (in production
``actors.bridge.post_to(actor_ref)``), each kind at most once and none after
:meth:`TowerPeer.close`.

The heartbeat (PROTOCOL.md, "Data channels"): the tower listens to every channel the
client opened. Whenever it has heard nothing from the client for ``heartbeat_interval``
seconds, it sends ``ping <n>`` on the client's ``heartbeat`` channel, and the client
sends the same text back. A session with traffic of its own is never pinged: its
messages prove it alive, and a ping would double the tower's work per session. The
silence clock starts when the connection becomes connected, so a client that never
opens the channel is caught as surely as one that stops answering: nothing heard for
``heartbeat_timeout`` seconds means the peer is silent. The heartbeat is one timer per
session, not a task.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from aiortc import (
    MediaStreamTrack,
    RTCConfiguration,
    RTCDataChannel,
    RTCIceCandidate,
    RTCIceServer,
    RTCSessionDescription,
)
from aiortc.rtcsctptransport import (
    LOCAL_MAX_MESSAGE_SIZE,
    SCTP_DATA_FIRST_FRAG,
    SCTP_DATA_LAST_FRAG,
    RTCSctpTransport,
    tsn_plus_one,
)
from aiortc.sdp import SessionDescription, candidate_from_sdp

from ..config import check_ice_servers
from ..link import MAX_CANDIDATES, MAX_MEDIA_SECTIONS
from .dtls import peer_connection
from .media import SyntheticVideoTrack
from .sctp import bundle_acknowledgements, received_already, track_received_tsns

__all__ = [
    "APPLICATIONS",
    "HEARTBEAT_LABEL",
    "Application",
    "EchoApplication",
    "PeerEvent",
    "TowerPeer",
    "answer_offer",
    "rtc_configuration",
]

logger = logging.getLogger(__name__)

HEARTBEAT_LABEL = "heartbeat"
MAX_MDNS_CANDIDATES = 16
# The most data channels a client may have open in one session (PROTOCOL.md asks for
# two), and the longest label and protocol each: every one is kept while it is open.
MAX_CHANNELS = 16
MAX_CHANNEL_NAMING = 1024
# The most SCTP streams a client may send on. Then what the tower holds for a client at
# once, waiting to be delivered: chunks in all (each costs memory whatever its size, and
# the receive window counts only bytes: a burst of small messages behind one lost packet
# is a few thousand), and fragments of unfinished messages (aiortc looks through all of
# them again for each one that arrives; the receive window lets a largest message in
# fragments of a packet hold about 900).
MAX_INBOUND_STREAMS = 2 * MAX_CHANNELS
MAX_CHUNKS_HELD = 8192
# Chunks received past a TSN the client has not sent (delivered at once if unordered):
# aiortc sorts and goes through them all for each acknowledgement it sends, about
# 0.4 ms at this bound, two or three echoes' worth. A browser's burst behind one lost
# packet is a little over a thousand.
MAX_CHUNKS_PAST_A_GAP = 2048
MAX_FRAGMENTS_HELD = 1024
# With more chunks held than that, the fragments are counted again this often.
_FRAGMENT_COUNT_EVERY = 64
# The largest message a client may send: what the tower's answer advertises
# (a=max-message-size).
MAX_MESSAGE_SIZE = LOCAL_MAX_MESSAGE_SIZE
# What a client may send, as in the signaling's frames: a message takes one, and one more
# per 16 KiB; a bucket of MESSAGE_BURST, refilled at MESSAGES_PER_SECOND. All of a
# tower's sessions share its loop: past that, one client would take it from the others
# (echoing a message costs a tower about a quarter of a millisecond).
MESSAGES_PER_SECOND = 256
MESSAGE_BURST = 4096


def message_cost(size: int) -> int:
    """What a message of ``size`` bytes takes from its client's bucket."""
    return 1 + size // 16384



class Application(Protocol):
    """A session application: what the tower does with a session's data channels, and
    the media it sends.

    Applications are made by the factories in ``APPLICATIONS``, called with the
    keyword arguments ``session`` (the session id) and ``tower`` (the tower's name).
    """

    def media(self, kinds: frozenset[str]) -> Sequence[MediaStreamTrack]:
        """The tracks to send, given the kinds of media the client offered to receive.

        Called once, before the answer is made. An application that sends nothing
        returns no tracks, and then costs no encoding.
        """
        ...

    def channel_opened(self, channel: RTCDataChannel) -> None:
        """Take over a data channel, other than ``heartbeat``, that the client opened.

        Called from aiortc's event emitter with the channel already open; an exception
        raised here is logged and otherwise ignored.
        """
        ...

    async def close(self) -> None:
        """Release whatever the application holds; called once, before the peer
        connection closes."""
        ...


# What a session's data channels may hold unsent, together, before the application
# gives up on a channel: a client that sends and never reads would otherwise grow the
# tower's memory without end.
CHANNEL_BUFFER_LIMIT = 1024 * 1024


def send_or_close(channel: RTCDataChannel, message: str | bytes) -> None:
    """Send ``message`` on ``channel``, or close the channel if the client cannot take it:
    more than ``CHANNEL_BUFFER_LIMIT`` unsent already on the session's channels (the
    client does not read), or a message over the client's own ``max-message-size``."""
    unsent = sum(other.bufferedAmount for other in channel.transport._data_channels.values())
    if unsent > CHANNEL_BUFFER_LIMIT:
        logger.info("closed channel %r: the client left %d bytes unread", channel.label,
                    unsent)
        channel.close()
        return
    try:
        channel.send(message)
    except ValueError as error:  # larger than the client said it takes
        logger.info("closed channel %r: %s", channel.label, error)
        channel.close()


class EchoApplication:
    """The default application: sends every message (text or bytes) back on the channel
    it came from, in order. A channel whose client does not read its echoes (over
    ``CHANNEL_BUFFER_LIMIT`` unsent), or sent a message larger than it can take back,
    is closed."""

    def __init__(self, session: str = "", tower: str = "") -> None:
        self.session = session
        self.tower = tower
        self._closed = False

    def media(self, kinds: frozenset[str]) -> Sequence[MediaStreamTrack]:
        return ()

    def channel_opened(self, channel: RTCDataChannel) -> None:
        """Echo every message received on ``channel`` until :meth:`close`."""

        def echo(message: str | bytes) -> None:
            if not self._closed and channel.readyState == "open":
                send_or_close(channel, message)

        channel.on("message", echo)

    async def close(self) -> None:
        """Stop echoing; the channels themselves close with the peer connection."""
        self._closed = True


class DemoApplication(EchoApplication):
    """Echo, plus a live synthetic video stream for a client that asks for video."""

    def media(self, kinds: frozenset[str]) -> Sequence[MediaStreamTrack]:
        if "video" not in kinds:
            return ()
        return (SyntheticVideoTrack(self.session, self.tower),)


APPLICATIONS: dict[str, Callable[..., Application]] = {
    "echo": EchoApplication,
    "demo": DemoApplication,
}


@dataclass(frozen=True)
class PeerEvent:
    """Something the trio side must know about a session's peer connection.

    Attributes:
        kind: ``"connected"``, ``"failed"``, ``"closed"`` (by the client or the
            network, never by :meth:`TowerPeer.close`) or ``"silent"`` (nothing heard
            from the client, heartbeat answers included, within the timeout).
        detail: A short human-readable explanation, e.g. ``"nothing heard from the
            client for 5 s"``; empty when the kind says it all.
    """

    kind: str
    detail: str = ""


def rtc_configuration(ice_servers: Sequence[Mapping[str, Any]] = ()) -> RTCConfiguration:
    """Build the explicit RTCConfiguration a tower's peer connection uses.

    An empty list really means no STUN or TURN server: aiortc's own default (used when
    ``iceServers`` is left as ``None``) contacts ``stun.l.google.com``, which on a
    closed network delays every answer by seconds.

    Args:
        ice_servers: Mappings like ``{"urls": "turn:turn.example.net:3478",
            "username": ..., "credential": ...}``; ``urls`` is a string or a list of
            strings, ``username`` and ``credential`` are optional.

    Returns:
        An RTCConfiguration whose ``iceServers`` is a list (possibly empty).

    Raises:
        ValueError: An entry lacks ``urls``, has unknown keys, values of the wrong type
            or a URL that is not a valid ``stun:``, ``stuns:``, ``turn:`` or ``turns:``
            URL.
    """
    check_ice_servers(ice_servers)
    servers = [
        RTCIceServer(
            urls=entry["urls"] if isinstance(entry["urls"], str) else list(entry["urls"]),
            username=entry.get("username"), credential=entry.get("credential"),
        )
        for entry in ice_servers
    ]
    return RTCConfiguration(iceServers=servers)


class TowerPeer:
    """One session's RTCPeerConnection on the tower, its application and its heartbeat.

    Made by :func:`answer_offer`; not meant to be constructed directly.

    Attributes:
        answer_sdp: The SDP answer for the client, with all of the tower's candidates
            (aiortc gathers them all before answering).
    """

    answer_sdp: str
    # Whether the application sends the client video (known once answered).
    sends_video: bool

    def __init__(
        self,
        configuration: RTCConfiguration,
        *,
        application: Application,
        on_event: Callable[[PeerEvent], None],
        heartbeat_interval: float,
        heartbeat_timeout: float,
    ) -> None:
        self.answer_sdp = ""
        self.sends_video = False
        self._configuration = configuration
        self._connection = peer_connection(configuration)
        self._application = application
        self._on_event = on_event
        self._heartbeat_interval = heartbeat_interval
        self._heartbeat_timeout = heartbeat_timeout
        self._reported: set[str] = set()
        self._closed = False
        self._closing: asyncio.Task[None] | None = None
        self._loop = asyncio.get_running_loop()
        self._heartbeat_started = False
        self._heartbeat: asyncio.TimerHandle | None = None  # pending, if any
        self._heartbeat_channel: RTCDataChannel | None = None
        self._last_heard = 0.0
        self._stall_allowed = False
        self._pings_sent = 0
        self._last_ping_sent_at = 0.0
        self._background: set[asyncio.Future[None]] = set()
        # Each mDNS name costs a multicast query on the tower's network: a few per
        # session are real (one per interface), more are someone's flood.
        self._mdns_candidates = 0
        self._channels = 0
        self._connection.on("connectionstatechange", self._connection_state_changed)
        self._connection.on("datachannel", self._channel_opened)

    @property
    def configuration(self) -> RTCConfiguration:
        """The configuration the peer connection was made with (its ICE servers)."""
        return self._configuration

    async def add_candidate(
        self, candidate: str, sdp_mid: str | None, sdp_mline_index: int | None
    ) -> None:
        """Add an ICE candidate the client trickled after its offer.

        Candidates arriving after :meth:`close` are ignored: they race with the close
        on the signaling path and are nobody's fault.

        Args:
            candidate: The candidate attribute, with or without the ``candidate:`` (or
                ``a=candidate:``) prefix; ``""`` marks the end of the candidates.
            sdp_mid: The media section's ``mid`` the candidate belongs to.
            sdp_mline_index: The media section's index the candidate belongs to.

        Raises:
            ValueError: The candidate does not parse, or names no media section.
        """
        if self._closed:
            return
        text = candidate.strip()
        for prefix in ("a=", "candidate:"):
            text = text.removeprefix(prefix)
        if not text:
            await self._connection.addIceCandidate(None)
            return
        try:
            parsed = candidate_from_sdp(text)
        except (AssertionError, IndexError, ValueError):
            raise ValueError(f"not an ICE candidate: {candidate[:200]!r}") from None
        if sdp_mid is None and sdp_mline_index is None:
            raise ValueError("an ICE candidate needs sdp_mid or sdp_mline_index")
        parsed.sdpMid = sdp_mid
        parsed.sdpMLineIndex = sdp_mline_index
        if parsed.ip.endswith(".local"):
            if self._mdns_candidates >= MAX_MDNS_CANDIDATES:
                raise ValueError(f"more than {MAX_MDNS_CANDIDATES} mDNS candidates")
            self._mdns_candidates += 1
            self._add_in_background(parsed)
            return
        await self._connection.addIceCandidate(parsed)

    async def _answer(self, offer_sdp: str) -> str:
        offer_sdp, later = _set_mdns_candidates_aside(offer_sdp)
        try:
            await self._connection.setRemoteDescription(RTCSessionDescription(offer_sdp, "offer"))
        except Exception as error:
            raise ValueError(f"the offer was not accepted: {error}") from None
        # What the client offered to receive (its recvonly is the tower's sendonly).
        kinds = frozenset(
            transceiver.kind for transceiver in self._connection.getTransceivers()
            if transceiver._offerDirection in ("sendonly", "sendrecv")
        )
        sctp = self._connection.sctp
        if sctp is not None:  # an offer with data channels
            self._guard_messages(sctp)
            track_received_tsns(sctp)
            bundle_acknowledgements(sctp)
        for track in self._application.media(kinds):
            self._connection.addTrack(track)
            self.sends_video = self.sends_video or track.kind == "video"
        for transceiver in self._connection.getTransceivers():
            # The tower takes no media from a client: what it does not send is inactive.
            # Received, a client's video would be decoded into a queue nobody reads.
            has_track = transceiver.sender.track is not None
            transceiver.direction = "sendonly" if has_track else "inactive"
        try:
            await self._connection.setLocalDescription(await self._connection.createAnswer())
        except Exception as error:  # e.g. a BUNDLE group naming a section that is not there
            raise ValueError(f"the offer could not be answered ({type(error).__name__}: "
                             f"{str(error)[:200]})") from None
        for candidate in later:
            if candidate is not None:
                if self._mdns_candidates == MAX_MDNS_CANDIDATES:
                    continue  # a host with more interfaces than that: the rest go unused
                self._mdns_candidates += 1
            self._add_in_background(candidate)
        return self._connection.localDescription.sdp

    def _add_in_background(self, candidate: RTCIceCandidate | None) -> None:
        # Resolving a browser's mDNS host name takes from 100 ms to a timeout of over a
        # second; the peer-reflexive candidate from the browser's first check needs no
        # resolving, so the answer and the checks never wait for it.
        task = asyncio.ensure_future(self._add_quietly(candidate))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _guard_messages(self, sctp: RTCSctpTransport) -> None:
        """Fail the peer when its client sends a message over the tower's advertised
        ``max-message-size``, ignores the SCTP receive window, or sends faster than
        ``MESSAGES_PER_SECOND``.

        aiortc enforces neither on receipt: it keeps every fragment of an unfinished
        message, and looks through all of them again for each one that arrives, so one
        endless message took the whole tower's CPU and memory.
        """
        receive, deliver = sctp._receive_data_chunk, sctp._receive
        forward = sctp._receive_forward_tsn_chunk
        window = sctp._advertised_rwnd
        too_large = f"the client sent a message over {MAX_MESSAGE_SIZE} bytes"
        too_many_streams = f"the client sent on more than {MAX_INBOUND_STREAMS} streams"
        count_fragments_at = MAX_FRAGMENTS_HELD
        whole = SCTP_DATA_FIRST_FRAG | SCTP_DATA_LAST_FRAG
        loop = asyncio.get_running_loop()
        allowance, counted_at = float(MESSAGE_BURST), loop.time()

        def fail(why: str) -> None:
            self._stop_heartbeat()
            self._report(PeerEvent("failed", why))

        def failing() -> bool:
            return self._closed or bool(self._reported & {"failed", "closed"})

        async def guarded(chunk: Any) -> None:
            nonlocal count_fragments_at
            if failing():
                return  # on its way out: nothing more is reassembled
            if not chunk.user_data:
                # RFC 9260, 6.2: an error. Taking no window, it slipped past the rest.
                fail("the client sent a DATA chunk with no data")
                return
            duplicate = received_already(sctp, chunk.tsn)
            await receive(chunk)
            if duplicate:
                return  # nothing held changed: a client may send one again and again
            streams = sctp._inbound_streams
            if len(streams) > MAX_INBOUND_STREAMS:
                fail(too_many_streams)
                return
            if len(sctp._sack_misordered) > MAX_CHUNKS_PAST_A_GAP:
                fail(f"the client sent more than {MAX_CHUNKS_PAST_A_GAP} chunks past one "
                     "it has not sent")
                return
            chunks = sum(len(stream.reassembly) for stream in streams.values())
            if chunks > MAX_CHUNKS_HELD:
                fail(f"the client left more than {MAX_CHUNKS_HELD} chunks waiting")
                return
            if chunks <= MAX_FRAGMENTS_HELD:
                count_fragments_at = MAX_FRAGMENTS_HELD
            elif chunks >= count_fragments_at:
                count_fragments_at = chunks + _FRAGMENT_COUNT_EVERY
                fragments = sum((held.flags & whole) != whole for stream in streams.values()
                                for held in stream.reassembly)
                if fragments > MAX_FRAGMENTS_HELD:
                    fail(f"the client left more than {MAX_FRAGMENTS_HELD} fragments unfinished")
                    return
            held = window - sctp._advertised_rwnd
            if held <= MAX_MESSAGE_SIZE:
                return  # the usual case: less than one message's worth held in all
            if sctp._advertised_rwnd < 0:
                fail("the client ignored the receive window")
                return
            # Only the message this chunk is part of can have grown past the limit; a
            # whole message in one chunk is far below it.
            stream = streams.get(chunk.stream_id)
            if stream is None or (chunk.flags & whole) == whole:
                return
            fragments = stream.reassembly
            if fragments and fragments[-1] is chunk:
                at = len(fragments) - 1  # the usual place: after every TSN before it
            elif chunk in fragments:
                at = fragments.index(chunk)
            else:
                return  # delivered: whole, and checked as such
            if _message_held(fragments, at) > MAX_MESSAGE_SIZE:
                fail(too_large)

        async def checked(stream_id: int, pp_id: int, data: bytes) -> None:
            nonlocal allowance, counted_at
            # One whose last fragment took it over: whole, but still too large.
            if len(data) > MAX_MESSAGE_SIZE:
                fail(too_large)
            now = loop.time()
            allowance = min(float(MESSAGE_BURST),
                            allowance + (now - counted_at) * MESSAGES_PER_SECOND)
            counted_at = now
            allowance -= message_cost(len(data))
            if allowance < 0 and not failing():
                fail(f"the client sent faster than {MESSAGES_PER_SECOND} messages a second")
            if not failing():
                await deliver(stream_id, pp_id, data)

        async def guarded_forward(chunk: Any) -> None:
            # A FORWARD-TSN opens a stream for each it names, as a DATA chunk does, and
            # aiortc then goes through every stream for each one that comes.
            if failing():
                return
            streams = sctp._inbound_streams
            named = {stream_id for stream_id, _ in chunk.streams}
            if len(streams.keys() | named) > MAX_INBOUND_STREAMS:
                fail(too_many_streams)
                return
            await forward(chunk)

        sctp._receive_data_chunk = guarded
        sctp._receive_forward_tsn_chunk = guarded_forward
        sctp._receive = checked

    async def _add_quietly(self, candidate: RTCIceCandidate | None) -> None:
        try:
            await self._connection.addIceCandidate(candidate)
        except Exception as error:
            logger.info("a remote candidate was not added: %s", type(error).__name__)

    async def close(self) -> None:
        """Stop the heartbeat, close the application and the peer connection.

        Idempotent and safe to call concurrently: every call returns once the peer is
        fully closed. No event is reported once this has been called. Cancelling a
        caller does not interrupt the closing itself.
        """
        self._closed = True
        if self._closing is None:
            self._closing = asyncio.ensure_future(self._close())
        await asyncio.shield(self._closing)

    async def _close(self) -> None:
        self._stop_heartbeat()
        await _close_application(self._application)
        try:
            await self._connection.close()
        except Exception as error:  # one its offer left half made: closed as far as it goes
            logger.info("closing a peer connection raised %s", type(error).__name__)

    def _report(self, event: PeerEvent) -> None:
        if self._closed or event.kind in self._reported:
            return
        self._reported.add(event.kind)
        # The callback runs inside aiortc's event emitter or the heartbeat timer; an
        # exception escaping it would break either.
        try:
            self._on_event(event)
        except Exception as error:
            logger.warning(
                "peer event callback raised %s on a %r event", type(error).__name__, event.kind
            )

    def _connection_state_changed(self) -> None:
        if self._closed:
            return
        state = self._connection.connectionState
        if state == "connected":
            self._report(PeerEvent("connected"))
            if not self._heartbeat_started:
                self._heartbeat_started = True
                self._last_heard = self._loop.time()
                self._check_heartbeat()
        elif state == "failed":
            # The failure is the news; a "silent" on top of it would only be noise.
            self._stop_heartbeat()
            self._report(PeerEvent("failed", "connection state failed"))
        elif state == "closed":
            self._stop_heartbeat()
            self._report(PeerEvent("closed"))

    def _channel_opened(self, channel: RTCDataChannel) -> None:
        if self._closed:
            return
        self._channels += 1
        channel.on("close", self._channel_closed)
        naming = len(channel.label) + len(channel.protocol)
        if self._channels > MAX_CHANNELS or naming > MAX_CHANNEL_NAMING:
            self._stop_heartbeat()
            self._report(PeerEvent("failed", (
                f"the client had more than {MAX_CHANNELS} data channels open"
                if self._channels > MAX_CHANNELS else
                f"the client named a data channel in more than {MAX_CHANNEL_NAMING} "
                "characters")))
            return
        channel.on("message", self._heard)
        if channel.label == HEARTBEAT_LABEL:
            self._heartbeat_channel = channel
            if self._heartbeat is not None:
                # Until now the timer was waiting for the channel, or for silence.
                self._heartbeat.cancel()
                self._check_heartbeat()
            return
        # An exception escaping here would surface in aiortc's SCTP receive path.
        try:
            self._application.channel_opened(channel)
        except Exception as error:
            logger.warning(
                "session application failed to take a channel: %s", type(error).__name__
            )

    def _channel_closed(self) -> None:
        self._channels -= 1

    def _heard(self, message: object) -> None:
        self._last_heard = self._loop.time()
        self._stall_allowed = False

    def _stop_heartbeat(self) -> None:
        self._heartbeat_started = True
        if self._heartbeat is not None:
            self._heartbeat.cancel()
            self._heartbeat = None

    def _heartbeat_due(self, due: float) -> None:
        if self._loop.time() - due > self._heartbeat_interval / 2 and not self._stall_allowed:
            # The loop stalled: what the client sent meanwhile may be unread yet, and the
            # ping due meanwhile was not sent. It has an interval from now, and a ping:
            # once until it is heard from (a loop that is often late does not keep a
            # client that has gone for ever).
            self._stall_allowed = True
            self._last_heard = max(self._last_heard, self._loop.time() - self._heartbeat_interval)
        self._check_heartbeat()

    def _check_heartbeat(self) -> None:
        """Ping if the client has been quiet for an interval, report it silent if for
        the timeout; then set the timer for whichever comes next."""
        self._heartbeat = None
        now = self._loop.time()
        silent_at = self._last_heard + self._heartbeat_timeout
        if now >= silent_at:
            detail = f"nothing heard from the client for {self._heartbeat_timeout:g} s"
            self._report(PeerEvent("silent", detail))
            return
        # Without an open channel the timer waits for the timeout; a channel opening
        # wakes it at once (_channel_opened).
        wake_at = silent_at
        channel = self._heartbeat_channel
        if channel is not None and channel.readyState == "open":
            ping_at = max(self._last_heard, self._last_ping_sent_at) + self._heartbeat_interval
            if now >= ping_at:
                self._pings_sent += 1
                self._last_ping_sent_at = now
                ping_at = now + self._heartbeat_interval
                # A client that cannot take a ping (a max-message-size of a few bytes)
                # is left to the timeout: the timer is set again whatever the send does.
                with contextlib.suppress(ValueError, ConnectionError):
                    channel.send(f"ping {self._pings_sent}")
            wake_at = min(ping_at, silent_at)
        self._heartbeat = self._loop.call_at(wake_at, self._heartbeat_due, wake_at)


def _message_held(fragments: Sequence[Any], at: int) -> int:
    """The bytes held of the message ``fragments[at]`` is part of, among a stream's
    fragments waiting for reassembly (in order of their TSNs; later messages may wait
    behind a lost one): the run of consecutive TSNs from its first fragment, counted up
    to just past ``MAX_MESSAGE_SIZE``. 0 when its first fragment is not held: a gap ends
    a run, as the fragments on either side of a lost packet may be two messages'."""
    start = at
    while not fragments[start].flags & SCTP_DATA_FIRST_FRAG:
        before = fragments[start - 1] if start else None
        if (before is None or before.flags & SCTP_DATA_LAST_FRAG
                or fragments[start].tsn != tsn_plus_one(before.tsn)):
            return 0
        start -= 1
    length = 0
    for position in range(start, len(fragments)):
        fragment = fragments[position]
        if position > start and (fragment.flags & SCTP_DATA_FIRST_FRAG or fragment.tsn
                                 != tsn_plus_one(fragments[position - 1].tsn)):
            break
        length += len(fragment.user_data)
        if fragment.flags & SCTP_DATA_LAST_FRAG or length > MAX_MESSAGE_SIZE:
            break
    return length


async def _close_application(application: Application) -> None:
    try:
        await application.close()
    except Exception as error:
        # A broken application must not keep the peer connection (and its ports) open.
        logger.warning("session application failed to close: %s", type(error).__name__)


def _set_mdns_candidates_aside(offer_sdp: str) -> tuple[str, list[RTCIceCandidate | None]]:
    """The offer without its mDNS (``.local``) host candidates, and those candidates.

    aiortc resolves every remote candidate before ``setRemoteDescription`` returns, so
    a browser's mDNS names (Chromium's default) would hold the answer back. The
    end-of-candidates of a section they came from goes aside with them: it must follow
    them, not precede them; one ends them all (``None``, last). Candidate lines before
    the first media section belong to none; they stay, and aiortc ignores them.

    Raises:
        ValueError: a media section's mDNS candidate does not parse.
    """
    description = SessionDescription.parse(offer_sdp)
    later: list[RTCIceCandidate | None] = []
    lines = []
    index = -1
    set_aside_in_section = ended = False
    for line in offer_sdp.splitlines():
        if line.startswith("m="):
            index += 1
            set_aside_in_section = False
        if index >= 0 and line.startswith("a=candidate:") and _is_mdns(line):
            try:
                candidate = candidate_from_sdp(line[len("a=candidate:"):])
            except (AssertionError, IndexError, ValueError):
                raise ValueError(f"not an ICE candidate: {line[:200]!r}") from None
            candidate.sdpMLineIndex = index
            candidate.sdpMid = _mid_of(description, index)
            later.append(candidate)
            set_aside_in_section = True
            continue
        if line == "a=end-of-candidates" and set_aside_in_section:
            ended = True
            continue
        lines.append(line)
    if not later:
        return offer_sdp, []
    if ended:
        later.append(None)
    return "\r\n".join(lines) + "\r\n", later


def _is_mdns(candidate_line: str) -> bool:
    """Whether an ``a=candidate`` line's address is an mDNS name (fields split on any
    white space, as aiortc splits them)."""
    fields = candidate_line.split()
    return len(fields) > 4 and fields[4].endswith(".local")


def _mid_of(description: SessionDescription, index: int) -> str | None:
    return description.media[index].rtp.muxId if index < len(description.media) else None


def _check_offer(offer_sdp: str) -> None:
    try:
        description = SessionDescription.parse(offer_sdp)
    except Exception as error:
        raise ValueError(f"the offer is not valid SDP ({type(error).__name__})") from None
    if not description.media:
        raise ValueError("the offer is not valid SDP: it has no media sections")
    if len(description.media) > MAX_MEDIA_SECTIONS:
        # Answered, more would not fit the link's frame (300 sections: 314 KB).
        raise ValueError(f"more than {MAX_MEDIA_SECTIONS} media and data sections")
    if sum(len(media.ice_candidates) for media in description.media) > MAX_CANDIDATES:
        raise ValueError(f"more than {MAX_CANDIDATES} candidates in the offer")
    mids = {media.rtp.muxId for media in description.media}
    for group in description.group:
        unknown = [str(mid) for mid in group.items if str(mid) not in mids]
        if group.semantic == "BUNDLE" and unknown:
            raise ValueError(f"the offer bundles media sections it does not have: "
                             f"{' '.join(unknown)[:100]}")
    for index, media in enumerate(description.media):
        if media.dtls is None:
            raise ValueError(f"the offer's media section {index} has no a=setup attribute")
        if media.dtls.role != "auto":
            # RFC 8842: an offerer must say actpass; active or passive is an answer's.
            raise ValueError(
                f"not an offer: media section {index} has a=setup other than actpass "
                "(is this an answer?)"
            )


async def answer_offer(
    offer_sdp: str,
    *,
    ice_servers: Sequence[Mapping[str, Any]] = (),
    application: Application,
    on_event: Callable[[PeerEvent], None],
    heartbeat_interval: float = 2.0,
    heartbeat_timeout: float = 5.0,
) -> TowerPeer:
    """Answer a client's offer with a new peer connection running ``application``.

    The returned peer owns ``application``: :meth:`TowerPeer.close` closes it, and so
    does this function when it fails.

    Args:
        offer_sdp: The client's SDP offer.
        ice_servers: STUN/TURN servers, see :func:`rtc_configuration`; none by default.
        application: What to do with the client's data channels other than
            ``heartbeat``.
        on_event: Called synchronously with each :class:`PeerEvent`, at most once per
            kind and never after :meth:`TowerPeer.close`; exceptions it raises are
            logged and swallowed.
        heartbeat_interval: Seconds of quiet from the client before a ping on the
            heartbeat channel, and between two pings while the quiet lasts.
        heartbeat_timeout: Seconds without a message from the client on any channel,
            counted from the connection becoming connected, before the peer is
            reported silent.

    Returns:
        The running peer; send its ``answer_sdp`` to the client.

    Raises:
        ValueError: ``offer_sdp`` does not parse, is not an offer or cannot be
            accepted, or ``ice_servers`` is malformed. Nothing is left running.
    """
    try:
        configuration = rtc_configuration(ice_servers)
        _check_offer(offer_sdp)
    except ValueError:
        await _close_application(application)
        raise
    peer = TowerPeer(
        configuration,
        application=application,
        on_event=on_event,
        heartbeat_interval=heartbeat_interval,
        heartbeat_timeout=heartbeat_timeout,
    )
    answering = asyncio.ensure_future(peer._answer(offer_sdp))
    try:
        peer.answer_sdp = await asyncio.shield(answering)
    except asyncio.CancelledError:
        if answering.done():
            await peer.close()
        else:
            # aioice keeps the sockets of the candidates it is gathering where closing
            # the peer connection cannot reach them until the gathering is over.
            _close_once_answered(answering, peer)
        raise
    except BaseException:
        await peer.close()
        raise
    return peer


# Peers whose answer was cancelled, until the answer is over and they are closed.
_closing: set[asyncio.Future[Any]] = set()


def _close_once_answered(answering: asyncio.Future[str], peer: TowerPeer) -> None:
    def close(_: asyncio.Future[str]) -> None:
        # Its outcome no longer matters (``asyncio.shield`` marked it retrieved).
        closing = asyncio.ensure_future(peer.close())
        _closing.add(closing)
        closing.add_done_callback(_closing.discard)

    answering.add_done_callback(close)
