"""The tower's peer against a real aiortc client in the same process, on plain asyncio.

pytest runs in trio mode, so these tests are sync functions that run their scenario with
``asyncio.run``: the tower's peer lives in asyncio, as it does in production.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import psutil
import pytest
from aiortc import (
    RTCConfiguration,
    RTCIceServer,
    RTCPeerConnection,
    RTCSessionDescription,
    VideoStreamTrack,
)
from aiortc.rtcsctptransport import (
    SCTP_DATA_FIRST_FRAG,
    SCTP_DATA_LAST_FRAG,
    SCTP_DATA_UNORDERED,
    WEBRTC_BINARY,
    DataChunk,
    ForwardTsnChunk,
)

from broker.tower import application as tower_application
from broker.tower import dtls
from broker.tower.dtls import SharedCertificate, tower_certificate
from broker.tower.sctp import packet
from broker.tower.application import (
    APPLICATIONS,
    CHANNEL_BUFFER_LIMIT,
    EchoApplication,
    PeerEvent,
    TowerPeer,
    answer_offer,
    rtc_configuration,
)

from ..test_signaling import with_candidates, with_sections

INTERVAL = 0.2
TIMEOUT = 1.0
# Generous: loaded CI machines stall; a healthy run is far below these.
DEADLINE = 10.0
WAIT = 5.0


def run(scenario: Callable[[], Awaitable[None]]) -> None:
    async def bounded() -> None:
        async with asyncio.timeout(DEADLINE):
            await scenario()

    asyncio.run(bounded())


class Events:
    """Records the tower's PeerEvents and lets a test wait for one kind."""

    def __init__(self) -> None:
        self.seen: list[PeerEvent] = []
        self._arrived: dict[str, asyncio.Event] = {}

    def __call__(self, event: PeerEvent) -> None:
        self.seen.append(event)
        self._flag(event.kind).set()

    def kinds(self) -> list[str]:
        return [event.kind for event in self.seen]

    async def wait_for(self, kind: str) -> PeerEvent:
        async with asyncio.timeout(WAIT):
            await self._flag(kind).wait()
        return next(event for event in self.seen if event.kind == kind)

    def _flag(self, kind: str) -> asyncio.Event:
        return self._arrived.setdefault(kind, asyncio.Event())


class Client:
    """A browser stand-in: opens "heartbeat" and "echo" and answers pings if told to."""

    def __init__(self, *, open_heartbeat: bool = True) -> None:
        self.connection = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        self.answering = True
        self.pings: list[str] = []
        self.echoed: list[str | bytes] = []
        self.echo_opened = asyncio.Event()
        self.closed = asyncio.Event()
        self._ping_arrived = asyncio.Event()
        self._echo_arrived = asyncio.Event()
        if open_heartbeat:
            heartbeat = self.connection.createDataChannel("heartbeat")
            heartbeat.on("message", lambda message: self._pinged(heartbeat, message))
        self.echo = self.connection.createDataChannel("echo")
        self.echo.on("open", self.echo_opened.set)
        self.echo.on("message", self._echo_received)
        self.connection.on("connectionstatechange", self._state_changed)

    async def offer(self) -> str:
        await self.connection.setLocalDescription(await self.connection.createOffer())
        return self.connection.localDescription.sdp

    async def accept(self, answer_sdp: str) -> None:
        await self.connection.setRemoteDescription(RTCSessionDescription(answer_sdp, "answer"))

    async def wait_for_pings(self, count: int) -> None:
        async with asyncio.timeout(WAIT):
            while len(self.pings) < count:
                self._ping_arrived.clear()
                await self._ping_arrived.wait()

    async def wait_for_echoes(self, count: int) -> None:
        async with asyncio.timeout(WAIT):
            while len(self.echoed) < count:
                self._echo_arrived.clear()
                await self._echo_arrived.wait()

    def _pinged(self, channel, message: str) -> None:
        self.pings.append(message)
        self._ping_arrived.set()
        if self.answering:
            channel.send(message)

    def _echo_received(self, message: str | bytes) -> None:
        self.echoed.append(message)
        self._echo_arrived.set()

    def _state_changed(self) -> None:
        if self.connection.connectionState == "closed":
            self.closed.set()


@asynccontextmanager
async def session(
    client: Client | None = None, *, on_event: Callable[[PeerEvent], None] | None = None, **options
) -> AsyncIterator[tuple[Client, TowerPeer, Events]]:
    """A tower peer answering a client, connected; both are closed on the way out."""
    client = client or Client()
    events = Events()
    options.setdefault("heartbeat_interval", INTERVAL)
    options.setdefault("heartbeat_timeout", TIMEOUT)
    peer = await answer_offer(
        await client.offer(),
        application=EchoApplication(),
        on_event=on_event or events,
        **options,
    )
    try:
        await client.accept(peer.answer_sdp)
        async with asyncio.timeout(WAIT):
            await client.echo_opened.wait()
        yield client, peer, events
    finally:
        await peer.close()
        await client.connection.close()


def test_echo_returns_text_and_bytes_in_order():
    sent = [f"message {n}" if n % 2 else f"bytes {n}".encode() for n in range(100)]

    async def scenario():
        async with session() as (client, _, _):
            for message in sent:
                client.echo.send(message)
            await client.wait_for_echoes(len(sent))
            assert client.echoed == sent

    run(scenario)


def test_sessions_share_the_towers_dtls_certificate_and_each_echoes(monkeypatch):
    contexts = []
    made = SharedCertificate._create_ssl_context

    def recording(certificate, *args, **kwargs):
        contexts.append(made(certificate, *args, **kwargs))
        return contexts[-1]

    monkeypatch.setattr(SharedCertificate, "_create_ssl_context", recording)

    async def scenario():
        async with session() as (first, peer_one, _), session() as (second, peer_two, _):
            expected = {
                f"a=fingerprint:{fingerprint.algorithm} {fingerprint.value}"
                for fingerprint in tower_certificate().getFingerprints()
            }
            for peer in (peer_one, peer_two):
                lines = {line for line in peer.answer_sdp.splitlines()
                         if line.startswith("a=fingerprint:")}
                assert lines and lines <= expected
            for client in (first, second):
                client.echo.send("mine")
            await first.wait_for_echoes(1)
            await second.wait_for_echoes(1)
            assert first.echoed == second.echoed == ["mine"]
        # Both DTLS transports took their OpenSSL context from the shared certificate: an
        # aiortc that stopped asking its certificate for one would fail here, not quietly
        # go back to a context per session.
        assert len(contexts) == 2 and contexts[0] is contexts[1]

    run(scenario)


def test_the_default_application_is_echo():
    assert APPLICATIONS["echo"] is EchoApplication


def test_a_quiet_client_is_pinged_with_numbered_pings():
    async def scenario():
        async with session() as (client, _, events):
            await client.wait_for_pings(3)
            assert client.pings[:3] == ["ping 1", "ping 2", "ping 3"]
            assert events.kinds() == ["connected"]

    run(scenario)


def test_a_client_with_traffic_of_its_own_is_alive_without_answering_pings():
    async def scenario():
        client = Client()
        client.answering = False
        async with session(client) as (_, _, events):
            # Three timeouts of messages every quarter interval, pings unanswered.
            for _ in range(round(3 * TIMEOUT / (INTERVAL / 4))):
                client.echo.send("still here")
                await asyncio.sleep(INTERVAL / 4)
            assert events.kinds() == ["connected"]
            # A ping needs an interval of quiet: a heartbeat that pinged regardless
            # would have sent 15 by now.
            assert len(client.pings) < 5
            # Quiet again: the pings come back, and unanswered they end in silence.
            silent = await events.wait_for("silent")
            assert silent.detail == "nothing heard from the client for 1 s"
            assert len(client.pings) >= 1

    run(scenario)


def test_connected_is_reported_once():
    async def scenario():
        async with session() as (client, _, events):
            await events.wait_for("connected")
            # Keep the connection busy for a while: more traffic, still one report.
            await client.wait_for_pings(2)
            assert events.seen == [PeerEvent("connected")]

    run(scenario)


def test_a_client_that_stops_answering_is_declared_silent_once():
    async def scenario():
        async with session() as (client, _, events):
            await client.wait_for_pings(1)
            client.answering = False
            silent = await events.wait_for("silent")
            assert silent.detail == "nothing heard from the client for 1 s"
            assert events.kinds() == ["connected", "silent"]

    run(scenario)


def test_a_client_that_cannot_take_a_ping_is_still_declared_silent():
    # Its offer says it takes messages of 4 bytes at most: every ping fails to send, and
    # the heartbeat's timer must go on regardless.
    class TinyClient(Client):
        async def offer(self) -> str:
            return _with_max_message_size(await super().offer(), 4)

    async def scenario():
        client = TinyClient()
        client.answering = False
        async with session(client) as (_, _, events):
            silent = await events.wait_for("silent")
            assert silent.detail == "nothing heard from the client for 1 s"

    run(scenario)


def _with_max_message_size(offer: str, size: int | None) -> str:
    """The offer with its a=max-message-size set to ``size`` (None: left out, which
    means 64 KiB)."""
    lines = [line for line in offer.split("\r\n") if not line.startswith("a=max-message-size:")]
    if size is not None:
        at = next(index for index, line in enumerate(lines) if line.startswith("a=sctp-port"))
        lines.insert(at + 1, f"a=max-message-size:{size}")
    return "\r\n".join(lines)


@pytest.mark.parametrize("size", [300_000, 262_144 + 500])
def test_a_message_over_the_towers_max_message_size_fails_the_peer(size):
    # The answer says 262144 bytes; aiortc would reassemble any size, for ever. Just over
    # it, the message is whole before the fragments held are over it: checked then.
    async def scenario():
        async with session() as (client, peer, events):
            # Past the client's own check of the tower's limit, straight into SCTP.
            await client.connection.sctp._send(client.echo.id, WEBRTC_BINARY, b"z" * size)
            failed = await events.wait_for("failed")
            assert failed.detail == "the client sent a message over 262144 bytes"
            assert client.echoed == []

    run(scenario)


def _fragments(first_tsn: int, size: int, fragment: int = 1000) -> list[DataChunk]:
    """One message of ``size`` bytes, as SCTP carries it."""
    count = size // fragment
    chunks = []
    for index in range(count):
        flags = (SCTP_DATA_FIRST_FRAG if index == 0 else 0) | (
            SCTP_DATA_LAST_FRAG if index == count - 1 else 0)
        chunk = DataChunk(flags=flags)
        chunk.tsn, chunk.user_data = first_tsn + index, b"x" * fragment
        chunks.append(chunk)
    return chunks


def test_fragments_either_side_of_a_lost_packet_are_not_taken_for_one_message():
    # Two messages of 200 kB back to back; the packet with the first one's last fragment
    # and the second one's first fragment is lost: 398 kB wait, in no message over 256 KiB.
    first, second = _fragments(1, 200_000), _fragments(201, 200_000)
    waiting = first[:-1] + second[1:]
    held = [tower_application._message_held(waiting, at) for at in range(len(waiting))]
    assert held == [199_000] * 199 + [0] * 199
    # One message over the limit, whole but for its last fragment, is one; counting
    # stops past the limit.
    over = _fragments(1, 300_000)[:-1]
    assert tower_application._message_held(over, 0) == 263_000
    assert tower_application._message_held(over, 298) == 263_000
    # A gap ends the run: what follows a lost fragment is not known to be that message.
    assert tower_application._message_held(first[:50] + first[51:], 120) == 0
    assert tower_application._message_held(first[:50] + first[51:], 10) == 50_000


def test_a_message_larger_than_the_client_takes_back_closes_its_channel_only():
    # Without a=max-message-size a client takes 64 KiB; the tower takes 256 KiB.
    class PlainClient(Client):
        async def offer(self) -> str:
            return _with_max_message_size(await super().offer(), None)

    async def scenario():
        async with session(PlainClient()) as (client, _, events):
            closed = asyncio.Event()
            client.echo.on("close", closed.set)
            client.echo.send(b"y" * 100_000)
            async with asyncio.timeout(WAIT):
                await closed.wait()
            # The session goes on: its heartbeat still answers.
            pings = len(client.pings)
            await client.wait_for_pings(pings + 2)
            assert events.kinds() == ["connected"]

    run(scenario)


def test_a_client_that_does_not_read_its_echoes_loses_the_channel():
    # It sends and sends, and never takes (acknowledges) what the tower sends back: the
    # tower would hold every echo in memory.
    async def scenario():
        async with session() as (client, peer, events):
            async def dropped(chunk) -> None:
                return None

            client.connection.sctp._receive_data_chunk = dropped
            [echo] = [channel for channel in peer._connection.sctp._data_channels.values()
                      if channel.label == "echo"]

            async def flood_while(going_on: Callable[[], bool]) -> None:
                while going_on():
                    if client.echo.bufferedAmount < 2**20:  # the client's own limit
                        client.echo.send(b"x" * 60_000)
                    await asyncio.sleep(0.01)

            async with asyncio.timeout(WAIT):
                await flood_while(lambda: echo.readyState == "open")
            # The tower closes its end (the close waits on what the client never took)
            # and echoes no more, however much more comes.
            loop = asyncio.get_running_loop()
            until = loop.time() + 0.5
            await flood_while(lambda: loop.time() < until)
            assert echo.readyState in ("closing", "closed")
            assert echo.bufferedAmount <= CHANNEL_BUFFER_LIMIT + 60_000

    run(scenario)


def test_a_client_answering_pings_is_not_declared_silent_for_a_stall_of_the_towers_loop():
    # The timer, late, judged the client before reading what it had sent meanwhile, and
    # the ping due meanwhile had not gone out: every quiet session on the tower failed.
    async def scenario():
        async with session(heartbeat_interval=0.5, heartbeat_timeout=1.2) as (
                client, _, events):
            await client.wait_for_pings(1)
            await asyncio.sleep(0.05)
            time.sleep(1.3)  # the loop every session of the tower shares stalls
            await client.wait_for_pings(3)  # past the next timer, which would judge it
            assert events.kinds() == ["connected"]

    run(scenario)


class _LateLoop:
    """A loop whose timers fire as late as ``lateness`` (of the timer's number) says."""

    def __init__(self, lateness: Callable[[int], float]) -> None:
        self.now, self.timers, self.lateness = 0.0, 0, lateness
        self.due: tuple[float, Callable[..., None], tuple] | None = None

    def time(self) -> float:
        return self.now

    def call_at(self, when: float, callback: Callable[..., None], *args) -> "_LateLoop":
        self.due = (when, callback, args)
        return self

    def cancel(self) -> None:
        self.due = None

    def run(self, until: Callable[[], bool], horizon: float) -> None:
        while not until() and self.now < horizon and self.due is not None:
            when, callback, args = self.due
            self.now = when + self.lateness(self.timers)
            self.timers += 1
            callback(*args)


@pytest.mark.parametrize("lateness", [
    lambda timer: 0.0, lambda timer: 1.1, lambda timer: 1.1 if timer % 2 else 0.0,
    lambda timer: 1.1 if timer % 2 == 0 else 0.0,
], ids=["on time", "always late", "late every other timer", "late every other, first"])
def test_a_client_that_has_gone_is_declared_silent_however_late_the_loop_is(lateness):
    # Each late timer forgave the client the stall: a loop late at every other timer
    # kept a client that had gone for ever.
    class Channel:
        readyState = "open"

        def send(self, message: str) -> None:
            pass

    peer = TowerPeer.__new__(TowerPeer)  # its heartbeat alone, without a connection
    peer._loop = loop = _LateLoop(lateness)
    peer._heartbeat_interval, peer._heartbeat_timeout = 2.0, 5.0
    peer._last_heard, peer._stall_allowed, peer._heartbeat_channel = 0.0, False, Channel()
    peer._pings_sent, peer._last_ping_sent_at = 0, 0.0
    silent = []
    peer._report = lambda event: silent.append((event.kind, loop.now))
    peer._check_heartbeat()
    loop.run(until=lambda: bool(silent), horizon=120.0)
    # At most the timeout, the interval forgiven once, and two timers late.
    [(kind, at)] = silent
    assert kind == "silent" and at <= 5.0 + 2.0 + 2 * 1.1 + 1e-9


def test_a_client_without_a_heartbeat_channel_is_declared_silent():
    async def scenario():
        async with session(Client(open_heartbeat=False)) as (_, _, events):
            await events.wait_for("silent")
            assert events.kinds() == ["connected", "silent"]

    run(scenario)


def test_a_client_closing_its_side_is_reported_as_closed():
    async def scenario():
        async with session() as (client, _, events):
            await client.connection.close()
            await events.wait_for("closed")
            assert events.kinds() == ["connected", "closed"]

    run(scenario)


def test_close_is_idempotent_and_silences_all_events():
    async def scenario():
        client = Client()
        client.answering = False
        async with session(client, heartbeat_timeout=0.3) as (_, peer, events):
            await peer.close()
            await asyncio.gather(peer.close(), peer.close())
            await peer.close()
            async with asyncio.timeout(WAIT):
                await client.closed.wait()
            # Well past the heartbeat timeout: a running heartbeat would have spoken.
            await asyncio.sleep(0.6)
            assert events.kinds() == ["connected"]
            await peer.add_candidate("", None, 0)

    run(scenario)


def test_an_on_event_that_raises_breaks_nothing(caplog):
    def broken(event: PeerEvent) -> None:
        raise RuntimeError("the actor is gone")

    async def scenario():
        async with session(on_event=broken) as (client, _, _):
            client.echo.send("still here")
            await client.wait_for_echoes(1)
            assert client.echoed == ["still here"]

    with caplog.at_level(logging.WARNING, logger=tower_application.__name__):
        run(scenario)
    assert "RuntimeError" in caplog.text
    assert "the actor is gone" not in caplog.text


@pytest.fixture
def made_connections(monkeypatch) -> list[tuple[RTCPeerConnection, RTCConfiguration | None]]:
    """Every peer connection the tower makes, with the configuration it was given."""
    made: list[tuple[RTCPeerConnection, RTCConfiguration | None]] = []

    class RecordedConnection(RTCPeerConnection):
        def __init__(self, configuration: RTCConfiguration | None = None) -> None:
            super().__init__(configuration)
            made.append((self, configuration))

    monkeypatch.setattr(dtls, "RTCPeerConnection", RecordedConnection)
    return made


class RecordingApplication(EchoApplication):
    def __init__(self) -> None:
        super().__init__()
        self.closed = False

    async def close(self) -> None:
        self.closed = True
        await super().close()


async def _offer_from_a_client() -> str:
    client = Client()
    try:
        return await client.offer()
    finally:
        await client.connection.close()


def _without_ice_password(offer: str) -> str:
    return "".join(line for line in offer.splitlines(True) if not line.startswith("a=ice-pwd"))


@pytest.mark.parametrize(
    ("spoil", "message"),
    [
        (lambda offer: "garbage", "no media sections"),
        (lambda offer: "", "no media sections"),
        (lambda offer: "m=application\r\n", "not valid SDP"),
        (_without_ice_password, "not accepted"),
        (lambda offer: with_candidates(offer, 101), "more than 100 candidates in the offer"),
    ],
    ids=["garbage", "empty", "broken media line", "no ICE password", "101 candidates"],
)
def test_a_bad_offer_raises_and_leaves_nothing_running(made_connections, spoil, message):
    async def scenario():
        offer = spoil(await _offer_from_a_client())
        application = RecordingApplication()
        events = Events()
        with pytest.raises(ValueError, match=message):
            await answer_offer(offer, application=application, on_event=events)
        assert application.closed
        assert all(connection.signalingState == "closed" for connection, _ in made_connections)
        assert asyncio.all_tasks() == {asyncio.current_task()}
        assert events.seen == []

    run(scenario)


def test_an_answer_is_not_an_offer():
    async def scenario():
        client = Client()
        other = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        try:
            await other.setRemoteDescription(
                RTCSessionDescription(await client.offer(), "offer")
            )
            await other.setLocalDescription(await other.createAnswer())
            with pytest.raises(ValueError, match="not an offer"):
                await answer_offer(
                    other.localDescription.sdp,
                    application=EchoApplication(),
                    on_event=Events(),
                )
        finally:
            await other.close()
            await client.connection.close()

    run(scenario)


def test_trickled_candidates_are_parsed_and_garbage_is_refused():
    async def scenario():
        async with session() as (client, peer, _):
            candidate = next(
                line.removeprefix("a=")
                for line in client.connection.localDescription.sdp.splitlines()
                if line.startswith("a=candidate:")
            )
            await peer.add_candidate(candidate, "0", 0)
            await peer.add_candidate(candidate.removeprefix("candidate:"), None, 0)
            for garbage in ("candidate:garbage", "1 1 udp notanumber 192.0.2.1 9 typ host"):
                with pytest.raises(ValueError, match="not an ICE candidate"):
                    await peer.add_candidate(garbage, "0", 0)
            with pytest.raises(ValueError, match="sdp_mid or sdp_mline_index"):
                await peer.add_candidate(candidate, None, None)
            await peer.add_candidate("", "0", 0)

    run(scenario)


def test_no_ice_servers_by_default_so_no_public_stun_is_contacted(made_connections):
    async def scenario():
        async with session() as (_, peer, _):
            # None would make aiortc fall back to stun.l.google.com.
            [(_, configuration)] = made_connections
            assert configuration is not None
            assert configuration.iceServers == []
            assert peer.configuration is configuration
            candidates = [
                line for line in peer.answer_sdp.splitlines() if line.startswith("a=candidate:")
            ]
            assert candidates
            assert all(" typ host" in line for line in candidates)

    run(scenario)


def test_ice_servers_become_an_rtc_configuration():
    configuration = rtc_configuration(
        [
            {"urls": "stun:stun.example.net:3478"},
            {
                "urls": ["turn:turn.example.net:3478?transport=tcp"],
                "username": "tower",
                "credential": "secret",
            },
        ]
    )
    assert configuration.iceServers == [
        RTCIceServer(urls="stun:stun.example.net:3478"),
        RTCIceServer(
            urls=["turn:turn.example.net:3478?transport=tcp"],
            username="tower",
            credential="secret",
        ),
    ]
    assert rtc_configuration().iceServers == []


@pytest.mark.parametrize(
    "servers",
    [
        [{}],
        [{"urls": []}],
        [{"urls": "http://example.net"}],
        [{"urls": "stun:example.net", "password": "x"}],
        [{"urls": "turn:example.net", "username": 7}],
    ],
    ids=["no urls", "empty urls", "not stun or turn", "unknown key", "non-string username"],
)
def test_malformed_ice_servers_are_refused(servers):
    with pytest.raises(ValueError, match="ICE server 0"):
        rtc_configuration(servers)


MDNS_OFFER = (
    "v=0\r\no=- 1 1 IN IP4 0.0.0.0\r\ns=-\r\nt=0 0\r\na=group:BUNDLE 0\r\n"
    "m=application 9 UDP/DTLS/SCTP webrtc-datachannel\r\nc=IN IP4 0.0.0.0\r\na=mid:0\r\n"
    "a=sctp-port:5000\r\na=setup:actpass\r\na=ice-ufrag:abcd\r\n"
    "a=ice-pwd:abcdefghijklmnopqrstuvwx\r\na=fingerprint:sha-256 AA:BB\r\n"
    "a=candidate:1 1 udp 2113937151 3b1e1c1a-6a5e-4b1e-9d8c-0f1e2d3c4b5a.local 54321 typ host\r\n"
    "a=candidate:2 1 udp 2113937151 192.0.2.9 54322 typ host\r\n"
    "a=end-of-candidates\r\n"
)


def test_mdns_candidates_and_the_end_of_candidates_after_them_are_set_aside():
    offer, later = tower_application._set_mdns_candidates_aside(MDNS_OFFER)
    assert ".local" not in offer and "end-of-candidates" not in offer
    assert "192.0.2.9 54322" in offer
    [mdns, end] = later
    assert mdns.ip.endswith(".local") and mdns.port == 54321
    assert (mdns.sdpMid, mdns.sdpMLineIndex) == ("0", 0)
    assert end is None


def test_an_offer_without_mdns_candidates_is_left_alone():
    plain = MDNS_OFFER.replace(
        "a=candidate:1 1 udp 2113937151 3b1e1c1a-6a5e-4b1e-9d8c-0f1e2d3c4b5a.local 54321 "
        "typ host\r\n", "")
    assert tower_application._set_mdns_candidates_aside(plain) == (plain, [])


def test_an_offer_whose_only_candidate_is_mdns_is_answered_without_waiting_for_it():
    """Resolving the name would hold the answer for the mDNS timeout; the answer must not
    wait for it (the browser's first check brings a peer-reflexive candidate instead)."""

    async def scenario():
        client = Client()
        offer = await client.offer()
        lines = [line for line in offer.split("\r\n") if not line.startswith("a=candidate:")]
        index = lines.index("a=end-of-candidates")
        lines.insert(index, "a=candidate:9 1 udp 2113937151 "
                            "0b1e1c1a-6a5e-4b1e-9d8c-0f1e2d3c4b5a.local 9 typ host")
        peer = await answer_offer("\r\n".join(lines), application=EchoApplication(),
                                  on_event=Events())
        # The answer is out while the name is still being resolved, in the background.
        still_resolving = len(peer._background)
        await peer.close()
        await client.connection.close()
        assert peer.answer_sdp.startswith("v=0") and still_resolving >= 1

    run(scenario)


def _with_mdns_candidates(offer: str, count: int) -> str:
    lines = [line for line in offer.split("\r\n") if not line.startswith("a=candidate:")]
    index = lines.index("a=end-of-candidates")
    lines[index:index] = [f"a=candidate:{n} 1 udp 2113937151 {n:08x}-6a5e-4b1e-9d8c-"
                          f"0f1e2d3c4b5a.local 9 typ host" for n in range(count)]
    return "\r\n".join(lines)


def test_at_most_16_mdns_candidates_of_an_offer_are_resolved(monkeypatch):
    added: list[str | None] = []
    add = TowerPeer._add_in_background

    def recording(peer, candidate):
        added.append(None if candidate is None else candidate.ip)
        add(peer, candidate)

    monkeypatch.setattr(TowerPeer, "_add_in_background", recording)

    async def scenario():
        client = Client()
        offer = _with_mdns_candidates(await client.offer(), 20)
        peer = await answer_offer(offer, application=EchoApplication(), on_event=Events())
        await peer.close()
        await client.connection.close()

    run(scenario)
    # The first 16 names, then the end of the candidates after them.
    assert added == [f"{n:08x}-6a5e-4b1e-9d8c-0f1e2d3c4b5a.local" for n in range(16)] + [None]


def test_a_candidate_before_the_first_media_section_is_left_to_aiortc():
    """It belongs to no media section: aiortc ignores it, and so does the tower, even
    an mDNS one that does not parse."""

    async def scenario():
        client = Client()
        offer = await client.offer()
        first_media = offer.index("m=")
        offer = offer[:first_media] + "a=candidate:x .local \r\n" + offer[first_media:]
        peer = await answer_offer(offer, application=EchoApplication(), on_event=Events())
        try:
            await client.accept(peer.answer_sdp)
            async with asyncio.timeout(WAIT):
                await client.echo_opened.wait()
        finally:
            await peer.close()
            await client.connection.close()

    run(scenario)


def _udp_sockets() -> int:
    return len(psutil.Process().net_connections(kind="udp"))


def test_an_answer_cancelled_at_any_point_leaves_no_socket_open():
    """aioice binds a socket per host address while it gathers and keeps them out of the
    peer connection's reach until the last one is bound: a cancel in between (a
    ``ClosePeer`` racing the answer) must still close them all."""

    async def scenario():
        offer = await _offer_from_a_client()
        before = _udp_sockets()
        for steps in range(40):
            answering = asyncio.ensure_future(
                answer_offer(offer, application=EchoApplication(), on_event=Events()))
            for _ in range(steps):
                await asyncio.sleep(0)
            if answering.done():
                await answering.result().close()
                continue
            answering.cancel()
            with pytest.raises(asyncio.CancelledError):
                await answering
        async with asyncio.timeout(WAIT):
            while tower_application._closing or _udp_sockets() > before:
                await asyncio.sleep(0.01)

    run(scenario)


def test_the_demo_application_sends_video_only_to_a_client_that_asks_for_it():
    demo = APPLICATIONS["demo"](session="s-1", tower="tower-1")
    assert demo.media(frozenset()) == ()
    [track] = demo.media(frozenset({"video"}))
    assert track.kind == "video"
    first, later = track.draw(0), track.draw(30)
    assert first.size == (320, 240) and first.tobytes() != later.tobytes()


def test_the_broker_offers_exactly_the_applications_towers_run():
    from broker.link import APPLICATIONS as OFFERED

    assert set(OFFERED) == set(APPLICATIONS)


# What a hostile client sends, past what a browser would.


def test_media_a_client_sends_is_not_taken_and_the_video_asked_for_goes_one_way():
    # Received, a client's video was decoded into a queue nobody read: 145 MB in 10 s.
    async def scenario():
        client = Client()
        client.connection.addTrack(VideoStreamTrack())  # sendrecv: it sends and asks
        offer = await client.offer()
        for application, direction in ((EchoApplication(), "a=inactive"),
                                       (APPLICATIONS["demo"](session="s-1"), "a=sendonly")):
            peer = await answer_offer(offer, application=application, on_event=Events())
            try:
                video = peer.answer_sdp.split("m=video", 1)[1].split("m=", 1)[0]
                assert direction in video.split("\r\n")
                assert all(transceiver.direction in ("inactive", "sendonly")
                           for transceiver in peer._connection.getTransceivers())
            finally:
                await peer.close()
        await client.connection.close()

    run(scenario)


def _raw_data(client: Client, count: int, stream: int, payload: bytes) -> list[bytes]:
    """``count`` DATA chunks on ``stream``, each a first fragment of a message that never
    ends, as packets of at most 40 chunks, with TSNs the client will not use again."""
    sctp = client.connection.sctp
    first = sctp._local_tsn
    sctp._local_tsn = (first + count) % 2**32
    chunks = []
    for index in range(count):
        chunk = DataChunk(flags=SCTP_DATA_FIRST_FRAG if index == 0 else 0)
        chunk.tsn, chunk.stream_id, chunk.protocol = first + index, stream, WEBRTC_BINARY
        chunk.user_data = payload
        chunks.append(chunk)
    return [packet(sctp, *chunks[at:at + 40]) for at in range(0, count, 40)]


@pytest.mark.parametrize(("count", "payload", "why"), [
    # Taking no receive window, empty ones slipped past every other check: 10,000 of
    # them (160 kB) cost the tower 6.6 s of CPU.
    (1, b"", "the client sent a DATA chunk with no data"),
    (1100, b"x", "the client left more than 1024 fragments unfinished"),
], ids=["empty", "endless fragments"])
def test_fragments_that_cost_more_than_they_weigh_fail_the_peer(count, payload, why):
    async def scenario():
        async with session() as (client, peer, events):
            for datagram in _raw_data(client, count, 1000, payload):
                await client.connection.sctp.transport._send_data(datagram)
                await asyncio.sleep(0)
            failed = await events.wait_for("failed")
            assert failed.detail == why

    run(scenario)


def test_a_client_sending_faster_than_its_share_of_the_tower_fails_its_peer():
    # Echoing is a quarter of a millisecond of the loop every session shares: one client
    # sending as fast as it can took the tower from the others.
    async def scenario():
        async with session() as (client, peer, events):
            await _send_in_packets(client, _complete_messages(client, 4500))
            failed = await events.wait_for("failed")
            assert failed.detail == "the client sent faster than 256 messages a second"

    run(scenario)


def test_a_client_with_more_than_16_data_channels_open_fails_its_peer():
    async def scenario():
        async with session() as (client, peer, events):
            for number in range(20):
                client.connection.createDataChannel(f"extra {number}")
            failed = await events.wait_for("failed")
            assert failed.detail == "the client had more than 16 data channels open"

    run(scenario)


def test_a_data_channel_named_at_length_fails_its_peer():
    async def scenario():
        async with session() as (client, peer, events):
            client.connection.createDataChannel("x" * 2000)
            failed = await events.wait_for("failed")
            assert failed.detail == ("the client named a data channel in more than 1024 "
                                     "characters")

    run(scenario)


def test_an_mdns_candidate_is_known_whatever_the_white_space():
    # A tab before the port took 60 of them past the cap of 16 (aiortc splits on any).
    offer = MDNS_OFFER.replace(".local 54321", ".local\t54321")
    _, later = tower_application._set_mdns_candidates_aside(offer)
    assert [candidate.port for candidate in later if candidate is not None] == [54321]


def test_an_offer_of_more_sections_than_an_answer_can_carry_is_refused():
    # Answered, 300 sections made 314 KB, over the link's largest frame: the peer
    # crashed sending it, and no refusal reached the broker.
    async def scenario():
        offer = with_sections(await _offer_from_a_client(), 17)
        with pytest.raises(ValueError, match="more than 16 media and data sections"):
            await answer_offer(offer, application=EchoApplication(), on_event=Events())

    run(scenario)


def test_an_offer_bundling_a_section_it_does_not_have_is_refused():
    # aiortc failed on it inside createAnswer, past the refusals a broker expects.
    async def scenario():
        offer = (await _offer_from_a_client()).replace("a=group:BUNDLE ", "a=group:BUNDLE zz ")
        with pytest.raises(ValueError, match="bundles media sections it does not have: zz"):
            await answer_offer(offer, application=EchoApplication(), on_event=Events())

    run(scenario)


def _complete_messages(client: Client, count: int, flags: int = 0) -> list[DataChunk]:
    """``count`` small whole messages on the echo channel, in order, with TSNs and
    sequence numbers the client will not use again (``flags``: also these)."""
    sctp = client.connection.sctp
    stream = client.echo.id
    first, sequence = sctp._local_tsn, sctp._outbound_stream_seq.get(stream, 0)
    sctp._local_tsn = (first + count) % 2**32
    sctp._outbound_stream_seq[stream] = (sequence + count) % 65536
    chunks = []
    for index in range(count):
        chunk = DataChunk(flags=SCTP_DATA_FIRST_FRAG | SCTP_DATA_LAST_FRAG | flags)
        chunk.tsn, chunk.stream_id, chunk.protocol = first + index, stream, WEBRTC_BINARY
        chunk.stream_seq = (sequence + index) % 65536
        chunk.user_data = b"m%d" % index
        chunks.append(chunk)
    return chunks


async def _send_in_packets(client: Client, chunks: list[DataChunk]) -> None:
    """Send ``chunks`` from the client's association, 40 to a packet."""
    sctp = client.connection.sctp
    for at in range(0, len(chunks), 40):
        await sctp.transport._send_data(packet(sctp, *chunks[at:at + 40]))
        await asyncio.sleep(0)


PAST_A_GAP = "the client sent more than 2048 chunks past one it has not sent"


@pytest.mark.parametrize(("count", "flags", "why"), [
    # A browser's burst behind one lost packet: delivered once it comes.
    (1100, 0, None),
    (1100, SCTP_DATA_UNORDERED, None),
    # Held, or delivered at once if unordered: each chunk past the gap is listed in
    # every acknowledgement, and aiortc went through all of them again for each chunk
    # (3 ms a chunk at 30,000, on the loop of every session of the tower).
    (4200, 0, PAST_A_GAP),
    (4200, SCTP_DATA_UNORDERED, PAST_A_GAP),
], ids=["burst", "unordered burst", "endless", "endless unordered"])
def test_small_messages_behind_a_lost_packet_wait_up_to_a_bound(count, flags, why):
    async def scenario():
        async with session() as (client, peer, events):
            sctp = client.connection.sctp
            lost, *rest = _complete_messages(client, count, flags)
            await _send_in_packets(client, rest)
            if why is not None:
                assert (await events.wait_for("failed")).detail == why
                return
            await sctp.transport._send_data(packet(sctp, lost))  # its retransmission
            await client.wait_for_echoes(count)
            assert "failed" not in events.kinds()

    run(scenario)


def test_messages_held_behind_one_never_finished_fail_the_peer_past_a_bound():
    # In order, no gap: the stream waits for a message whose last fragment never comes.
    async def scenario():
        async with session() as (client, peer, events):
            unfinished, *rest = _complete_messages(client, 8300)
            unfinished.flags = SCTP_DATA_FIRST_FRAG
            await _send_in_packets(client, [unfinished, *rest])
            failed = await events.wait_for("failed")
            assert failed.detail == "the client left more than 8192 chunks waiting"

    run(scenario)


def test_only_a_chunk_of_an_unfinished_message_has_its_message_measured(monkeypatch):
    # Past 256 KiB held, every DATA chunk had every chunk held looked through again: a
    # client holding small messages behind a skipped sequence number, then sending one
    # old TSN over and over, kept the loop of every session on the tower busy.
    measured = []
    measure = tower_application._message_held
    monkeypatch.setattr(tower_application, "_message_held",
                        lambda fragments, at: measured.append(at) or measure(fragments, at))

    async def scenario():
        async with session() as (client, peer, events):
            sctp, tower = client.connection.sctp, peer._connection.sctp
            held = _complete_messages(client, 2300)
            for chunk in held:  # 276 kB in all, waiting for a sequence number never sent
                chunk.stream_seq, chunk.user_data = (chunk.stream_seq + 1) % 65536, b"x" * 120
            for at in range(0, len(held), 8):  # within a datagram
                await sctp.transport._send_data(packet(sctp, *held[at:at + 8]))
                await asyncio.sleep(0)
            handled = 0
            receive = tower._receive_data_chunk

            async def counted(chunk: DataChunk) -> None:
                nonlocal handled
                await receive(chunk)
                handled += 1

            tower._receive_data_chunk = counted
            for _ in range(5):
                await sctp.transport._send_data(packet(sctp, *[held[0]] * 8))  # duplicates
            [fragment] = _complete_messages(client, 1)
            fragment.flags = SCTP_DATA_FIRST_FRAG
            await sctp.transport._send_data(packet(sctp, fragment))
            async with asyncio.timeout(WAIT):
                while handled < 41:
                    await asyncio.sleep(0.01)
            assert sum(len(stream.reassembly) for stream in tower._inbound_streams.values()) \
                == 2301
            assert measured == [2300]  # the fragment, at the end of what its stream holds
            assert events.kinds() == ["connected"]

    run(scenario)


def test_a_forward_tsn_naming_more_streams_than_a_client_may_use_fails_the_peer():
    # Each stream it names is opened, past the cap DATA chunks are held to, and aiortc
    # then goes through every stream for each FORWARD-TSN (36 ms each at 60,000).
    async def scenario():
        async with session() as (client, peer, events):
            sctp = client.connection.sctp
            forward = ForwardTsnChunk()
            forward.cumulative_tsn = sctp._local_tsn
            forward.streams = [(stream, 0) for stream in range(100, 400)]
            await sctp.transport._send_data(packet(sctp, forward))
            failed = await events.wait_for("failed")
            assert failed.detail == "the client sent on more than 32 streams"
            assert len(peer._connection.sctp._inbound_streams) <= 32

    run(scenario)


def test_data_channels_closed_make_room_for_new_ones():
    async def scenario():
        async with session() as (client, peer, events):
            for number in range(20):
                extra = client.connection.createDataChannel(f"request {number}")
                opened, closed = asyncio.Event(), asyncio.Event()
                extra.on("open", opened.set)
                extra.on("close", closed.set)
                async with asyncio.timeout(WAIT):
                    await opened.wait()
                    extra.close()  # closed once the tower has reset its stream too
                    await closed.wait()
            client.echo.send("still here")
            await client.wait_for_echoes(1)
            assert "failed" not in events.kinds()

    run(scenario)


def test_a_client_that_sends_video_and_asks_for_none_is_sent_none():
    async def scenario():
        client = Client()
        client.connection.addTransceiver(VideoStreamTrack(), direction="sendonly")
        peer = await answer_offer(await client.offer(), application=APPLICATIONS["demo"](),
                                  on_event=Events())
        try:
            assert not peer.sends_video
            video = peer.answer_sdp.split("m=video", 1)[1].split("m=", 1)[0]
            assert "a=inactive" in video.split("\r\n")
        finally:
            await peer.close()
            await client.connection.close()

    run(scenario)
