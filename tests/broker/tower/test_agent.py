"""The tower agent's communication server against its broker and against peers that are not.

Each test runs a real agent process (``python -m broker tower run``) with credentials made
here, and speaks to it over real TCP and TLS as the broker does. The scenarios are sync
functions run with ``actors.bridge.run``, so an aiortc client can live on the asyncio side
when one is needed.
"""

from __future__ import annotations

import functools
import ssl
import subprocess
import sys
import weakref
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio
from trio_websocket import ConnectionClosed, WebSocketConnection, wrap_client_stream

from actors import bridge
from broker.client_peer import ClientPeer, new_peer
from broker.link import (
    BUNDLE_FRAMES,
    BUNDLES,
    Bundle,
    MAX_FRAME_BYTES,
    AddCandidate,
    ClosePeer,
    LinkError,
    OpenPeer,
    PeerAnswer,
    PeerRejected,
    PeerState,
    TowerHello,
    TowerLoadReport,
    codec,
)
from broker.pki import (
    CertificateAuthority,
    client_ssl_context,
    generate_key_and_csr,
    write_secret,
)

TOWER = "tower-9"
LOAD_INTERVAL = 0.2
# Functional deadlines only: generous, so a loaded machine does not fail a healthy agent.
DEADLINE = 15.0


def run(main: Callable, *args: object) -> object:
    return bridge.run(main, *args, handle_signals=False)


@dataclass(frozen=True)
class Identity:
    certificate: Path
    key: Path
    combined: Path  # key and certificate in one file, as an agent takes them


@dataclass(frozen=True)
class Credentials:
    """The tower's files, and the client identities the tests present to it."""

    ca: Path
    tower: Identity
    broker: Identity
    stranger_broker: Identity
    other_tower: Identity

    def context(self, identity: Identity | None) -> ssl.SSLContext:
        """A client context that trusts the tower's CA and shows ``identity``, if any."""
        if identity is None:
            return client_ssl_context(self.ca)
        return client_ssl_context(self.ca, identity.certificate, identity.key)


def _write_identity(directory: Path, key: bytes, certificate: bytes) -> Identity:
    write_secret(directory / "key.pem", key)
    write_secret(directory / "certificate.pem", certificate)
    write_secret(directory / "identity.pem", key + certificate)
    return Identity(directory / "certificate.pem", directory / "key.pem",
                    directory / "identity.pem")


@pytest.fixture(scope="module")
def credentials(tmp_path_factory) -> Credentials:
    directory = tmp_path_factory.mktemp("credentials")
    authority = CertificateAuthority.create()
    write_secret(directory / "ca.pem", authority.certificate_pem)
    key, csr = generate_key_and_csr(TOWER)
    certificate = authority.sign_tower_csr(csr, TOWER, addresses=["127.0.0.1"])
    tower = _write_identity(directory / "tower", key, certificate)
    broker = _write_identity(directory / "broker", *authority.issue("broker", client_only=True))
    # Named "broker" too, but by an authority the tower does not trust.
    stranger = CertificateAuthority.create("another broker's CA")
    stranger_broker = _write_identity(
        directory / "stranger", *stranger.issue("broker", client_only=True)
    )
    # The right authority, the wrong holder: another tower's certificate can authenticate
    # a client too, but it is not the broker's.
    other_key, other_csr = generate_key_and_csr("tower-7")
    other_certificate = authority.sign_tower_csr(other_csr, "tower-7", addresses=["127.0.0.1"])
    other_tower = _write_identity(directory / "other-tower", other_key, other_certificate)
    return Credentials(directory / "ca.pem", tower, broker, stranger_broker, other_tower)


@dataclass
class RunningAgent:
    process: subprocess.Popen
    host: str
    port: int
    log: Path


@pytest.fixture
def agent(credentials, tmp_path) -> Iterator[RunningAgent]:
    yield from running_agent(credentials, tmp_path)


# Short, for the test of a peer that never connects; the others connect well within it.
SHORT_NEGOTIATION_DEADLINE = 2.0


@pytest.fixture
def impatient_agent(credentials, tmp_path) -> Iterator[RunningAgent]:
    yield from running_agent(credentials, tmp_path, "--negotiation-deadline",
                             str(SHORT_NEGOTIATION_DEADLINE))


def running_agent(credentials, tmp_path, *options: str) -> Iterator[RunningAgent]:
    log = tmp_path / "agent.log"
    with open(log, "wb") as stderr:
        process = subprocess.Popen(
            [sys.executable, "-m", "broker", "tower", "run", "--name", TOWER,
             "--listen", "127.0.0.1:0",
             "--identity", str(credentials.tower.combined),
             "--ca", str(credentials.ca),
             "--load-interval", str(LOAD_INTERVAL), *options],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr,
        )
    try:
        line = process.stdout.readline().decode().split()
        assert line[:1] == ["ready"], (line, log.read_text()[-3000:])
        yield RunningAgent(process, line[1], int(line[2]), log)
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(10)
        process.stdout.close()
        process.stdin.close()


@asynccontextmanager
async def open_link(agent: RunningAgent, context: ssl.SSLContext
                    ) -> AsyncIterator[WebSocketConnection]:
    """The broker's end of a link: TCP, TLS naming the tower, then the WebSocket."""

    async def connect() -> trio.abc.Stream:
        stream = await trio.open_tcp_stream(agent.host, agent.port)
        tls_stream = trio.SSLStream(stream, context, server_hostname=TOWER)
        await tls_stream.do_handshake()
        return tls_stream

    async with link_over(connect) as websocket:
        yield websocket


@asynccontextmanager
async def link_over(connect: Callable[[], Awaitable[trio.abc.Stream]], **options: object
                    ) -> AsyncIterator[WebSocketConnection]:
    """A link's WebSocket over the stream ``connect`` makes; closed on the way out."""
    async with trio.open_nursery() as nursery:
        with trio.fail_after(DEADLINE):
            # Offering bundles, as the broker does.
            websocket = await wrap_client_stream(
                nursery, await connect(), TOWER, "/link", max_message_size=MAX_FRAME_BYTES,
                subprotocols=[BUNDLES], **options,
            )
        try:
            yield websocket
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(2):
                await websocket.aclose()
            nursery.cancel_scope.cancel()


# What the agent sent in a bundle that a test has not taken yet, per link.
_unread: weakref.WeakKeyDictionary[WebSocketConnection, deque] = weakref.WeakKeyDictionary()


async def next_message(websocket: WebSocketConnection) -> object:
    """The agent's next message, as the broker takes it: a bundle's frames one by one."""
    unread = _unread.setdefault(websocket, deque())
    while not unread:
        message = codec.decode(await websocket.get_message())
        unread.extend([codec.decode(frame) for frame in message.frames]
                      if isinstance(message, Bundle) else [message])
    return unread.popleft()


async def receive(websocket: WebSocketConnection, kind: type, timeout: float = DEADLINE,
                  *, where: Callable[[object], bool] = lambda message: True) -> object:
    """The next message of type ``kind`` (matching ``where``); load reports in between are
    skipped."""
    with trio.fail_after(timeout):
        while True:
            message = await next_message(websocket)
            if isinstance(message, kind) and where(message):
                return message
            if not isinstance(message, TowerLoadReport):
                raise AssertionError(f"expected {kind.__name__}, got {message!r}")


UPGRADE_REQUEST = (
    b"GET /link HTTP/1.1\r\nHost: tower-9\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)


async def assert_refused(agent: RunningAgent, context: ssl.SSLContext) -> None:
    """Try to link with ``context``; fail unless the agent refuses.

    The upgrade request is written by hand: trio-websocket's client waits forever for a
    handshake on a stream that breaks before it.
    """
    received = b""
    with trio.fail_after(DEADLINE):
        stream = await trio.open_tcp_stream(agent.host, agent.port)
        tls_stream = trio.SSLStream(stream, context, server_hostname=TOWER)
        try:
            # With TLS 1.3 the client's side of the handshake may finish before the
            # server has looked at the client's certificate: the refusal then arrives on
            # the first read.
            await tls_stream.do_handshake()
            await tls_stream.send_all(UPGRADE_REQUEST)
            while chunk := await tls_stream.receive_some(4096):
                received += chunk
        except trio.BrokenResourceError:
            pass
        finally:
            await trio.aclose_forcefully(tls_stream)
    assert not received, f"the agent took the link and said {received[:200]!r}"


async def say_hello(agent: RunningAgent, context: ssl.SSLContext) -> TowerHello:
    async with open_link(agent, context) as websocket:
        return await receive(websocket, TowerHello)


@asynccontextmanager
async def client_peer(*, video: bool = False) -> AsyncIterator[ClientPeer]:
    """A client's peer connection (asking for video, or not), closed on the way out."""
    peer = await bridge.call_asyncio(functools.partial(new_peer, video=video))
    try:
        yield peer
    finally:
        with trio.CancelScope(shield=True):
            await bridge.call_asyncio(peer.close)


async def offer_over(link: WebSocketConnection, peer: ClientPeer, negotiation: int = 1, *,
                     session: str = "s-1", application: str = "echo") -> PeerAnswer:
    """Open ``session`` for ``peer`` over ``link``; the client takes the tower's answer."""
    offer = await bridge.call_asyncio(peer.offer)
    await link.send_message(codec.encode(OpenPeer(session, negotiation, offer, application)))
    answer = await receive(link, PeerAnswer)
    await bridge.call_asyncio(peer.accept, answer.sdp)
    return answer


def test_the_broker_gets_the_towers_hello_then_load_reports(agent, credentials):
    async def main():
        async with open_link(agent, credentials.context(credentials.broker)) as link:
            with trio.fail_after(DEADLINE):
                assert link.subprotocol == BUNDLES  # the agent bundles too
                hello = codec.decode(await link.get_message())  # alone, the first frame
                assert isinstance(hello, TowerHello)
                assert hello.tower == TOWER and hello.capacity == 500 and hello.agent_version
                reports = [await next_message(link) for _ in range(3)]
            assert [(report.sessions, report.capacity) for report in reports] == [(0, 500)] * 3
            # What the agent process costs, as it measures itself.
            assert all(report.resident_bytes > 10 * 2**20 for report in reports)
            assert 0 < reports[0].cpu_seconds <= reports[-1].cpu_seconds

    run(main)


@pytest.mark.parametrize("identity", ["none", "stranger_broker", "other_tower"])
def test_a_client_that_is_not_the_broker_is_refused_and_the_agent_stays_up(
    agent, credentials, identity
):
    chosen = None if identity == "none" else getattr(credentials, identity)

    async def main():
        await assert_refused(agent, credentials.context(chosen))
        # Twice: a refusal leaves the server as it was.
        await assert_refused(agent, credentials.context(chosen))
        hello = await say_hello(agent, credentials.context(credentials.broker))
        assert hello.tower == TOWER

    run(main)
    assert agent.process.poll() is None
    assert agent.log.read_text().count("refused a link") == 2


def test_a_client_that_speaks_no_tls_is_dropped_and_the_agent_stays_up(agent, credentials):
    async def main():
        with trio.fail_after(DEADLINE):
            stream = await trio.open_tcp_stream(agent.host, agent.port)
            await stream.send_all(b"GET /link HTTP/1.1\r\nHost: tower-9\r\n\r\n")
            try:
                while await stream.receive_some(4096):
                    pass
            except trio.BrokenResourceError:
                pass
            await stream.aclose()
        hello = await say_hello(agent, credentials.context(credentials.broker))
        assert hello.tower == TOWER

    run(main)
    assert agent.process.poll() is None
    assert agent.log.read_text().count("refused a link") == 1


def test_bad_frames_are_answered_with_link_errors_and_the_link_stays_open(agent, credentials):
    async def main():
        async with open_link(agent, credentials.context(credentials.broker)) as link:
            await receive(link, TowerHello)
            await link.send_message(b"\x00\x01 not msgpack at all \xff")
            assert isinstance(await receive(link, LinkError), LinkError)
            await link.send_message(codec.encode(TowerHello("broker", 1, "0")))
            wrong = await receive(link, LinkError)
            assert "TowerHello" in wrong.message
            await link.send_message(codec.encode(OpenPeer("s-1", 1, "v=0\r\ngarbage", "echo")))
            rejected = await receive(link, PeerRejected)
            assert (rejected.session, rejected.negotiation) == ("s-1", 1)
            assert rejected.code == "invalid_sdp"
            await link.send_message(codec.encode(OpenPeer("s-2", 1, "v=0\r\n", "no-such-app")))
            rejected = await receive(link, PeerRejected)
            assert (rejected.session, rejected.code) == ("s-2", "unknown_application")

    run(main)
    assert agent.process.poll() is None


def test_a_bundle_is_taken_frame_by_frame_and_a_bad_frame_in_it_refused_alone(
    agent, credentials
):
    async def main():
        async with open_link(agent, credentials.context(credentials.broker)) as link:
            await receive(link, TowerHello)
            inner = codec.encode(Bundle((codec.encode(ClosePeer("s-9", 1)),)))
            await link.send_message(codec.encode(Bundle((
                b"\x00 not msgpack \xff",
                codec.encode(OpenPeer("s-1", 1, "v=0\r\ngarbage", "echo")),
                inner,
                codec.encode(OpenPeer("s-2", 1, "v=0\r\n", "no-such-app")),
            ))))
            # Each frame answered as if it had come alone (the peers answer in their time).
            answers = set()
            with trio.fail_after(DEADLINE):
                while len(answers) < 4:
                    message = await next_message(link)
                    if isinstance(message, PeerRejected):
                        answers.add((message.session, message.code))
                    elif isinstance(message, LinkError):
                        answers.add(("refused", "Bundle in a bundle" in message.message))
            assert answers == {
                ("refused", False), ("s-1", "invalid_sdp"),
                ("refused", True), ("s-2", "unknown_application"),
            }
            # More frames than one bundle may hold: refused whole, none of them taken.
            await link.send_message(codec.encode(Bundle(
                (codec.encode(OpenPeer("s-3", 1, "v=0\r\n", "no-such-app")),)
                * (BUNDLE_FRAMES + 1))))
            refusal = await receive(link, LinkError)
            assert f"a bundle of {BUNDLE_FRAMES + 1} frames" in refusal.message

    run(main)
    assert agent.process.poll() is None


def test_an_offer_is_answered_counted_in_the_load_and_closed(agent, credentials):
    async def main():
        async with client_peer() as peer, \
                open_link(agent, credentials.context(credentials.broker)) as link:
            await receive(link, TowerHello)
            answer = await offer_over(link, peer)
            assert (answer.session, answer.negotiation) == ("s-1", 1)
            assert answer.sdp.startswith("v=0")
            state = await receive(link, PeerState, where=lambda m: m.session == "s-1")
            assert (state.negotiation, state.state) == (1, "connected")
            with trio.fail_after(DEADLINE):
                await bridge.call_asyncio(peer.wait_open)
                await bridge.call_asyncio(peer.echo, "over the tower")
            await receive(link, TowerLoadReport, where=lambda m: m.sessions == 1)
            # A close for another negotiation of the session is not this peer's.
            await link.send_message(codec.encode(ClosePeer("s-1", 2)))
            with trio.fail_after(DEADLINE):
                await bridge.call_asyncio(peer.echo, "still open")
            await link.send_message(codec.encode(ClosePeer("s-1", 1)))
            await receive(link, TowerLoadReport, where=lambda m: m.sessions == 0)

    run(main)


def test_a_peer_that_ends_on_its_own_leaves_the_load(agent, credentials):
    async def main():
        async with client_peer() as peer, \
                open_link(agent, credentials.context(credentials.broker)) as link:
            await receive(link, TowerHello)
            await offer_over(link, peer)
            await receive(link, PeerState, where=lambda m: m.state == "connected")
            await receive(link, TowerLoadReport, where=lambda m: m.sessions == 1)
            # The client goes away without the broker closing anything.
            await bridge.call_asyncio(peer.close)
            await receive(link, PeerState, where=lambda m: m.state != "connected")
            await receive(link, TowerLoadReport, where=lambda m: m.sessions == 0)

    run(main)


def test_an_offer_for_an_older_negotiation_leaves_the_live_peer_alone(agent, credentials):
    async def main():
        async with client_peer() as peer, \
                open_link(agent, credentials.context(credentials.broker)) as link:
            await receive(link, TowerHello)
            await offer_over(link, peer, negotiation=2)
            await receive(link, PeerState, where=lambda m: m.state == "connected")
            offer = await bridge.call_asyncio(peer.offer)
            await link.send_message(codec.encode(OpenPeer("s-1", 1, offer, "echo")))
            error = await receive(link, LinkError)
            assert "negotiation 1 of s-1" in error.message
            with trio.fail_after(DEADLINE):
                await bridge.call_asyncio(peer.wait_open)
                await bridge.call_asyncio(peer.echo, "still the live peer")

    run(main)


def test_a_peer_not_connected_within_the_negotiation_deadline_fails_on_its_own(
        impatient_agent, credentials):
    """The broker gave up on it by then; its close may have been lost on the way."""

    async def main():
        async with client_peer() as peer, \
                open_link(impatient_agent, credentials.context(credentials.broker)) as link:
            await receive(link, TowerHello)
            # Candidates still to come, as a browser that trickles them: without the
            # deadline the tower would wait for them for ever.
            offer = "".join(
                line for line in (await bridge.call_asyncio(peer.offer)).splitlines(True)
                if not line.startswith(("a=candidate:", "a=end-of-candidates")))
            await link.send_message(codec.encode(OpenPeer("s-1", 1, offer, "echo")))
            await receive(link, PeerAnswer)
            answered = trio.current_time()
            state = await receive(link, PeerState)
            assert (state.session, state.negotiation, state.state) == ("s-1", 1, "failed")
            assert state.detail == (
                f"not connected {SHORT_NEGOTIATION_DEADLINE:g} s after its answer")
            assert trio.current_time() - answered >= SHORT_NEGOTIATION_DEADLINE - 0.1
            await receive(link, TowerLoadReport, where=lambda m: m.sessions == 0)

    run(main)


@pytest.fixture
def agent_of_one(credentials, tmp_path) -> Iterator[RunningAgent]:
    yield from running_agent(credentials, tmp_path, "--capacity", "1")


def test_an_offer_past_the_towers_capacity_is_refused_as_tower_full(agent_of_one, credentials):
    """The broker's placement counts by load reports, which lag: the tower holds the line."""

    async def main():
        async with client_peer() as first, client_peer() as second, \
                open_link(agent_of_one, credentials.context(credentials.broker)) as link:
            await receive(link, TowerHello)
            await offer_over(link, first)
            await receive(link, PeerState, where=lambda m: m.state == "connected")
            offer = await bridge.call_asyncio(second.offer)
            await link.send_message(codec.encode(OpenPeer("s-2", 1, offer, "echo")))
            rejected = await receive(link, PeerRejected)
            assert rejected == PeerRejected(
                "s-2", 1, "tower_full", f"{TOWER} is full (capacity 1)")
            # The session it holds may negotiate again: its new peer replaces its old one.
            renewed = await bridge.call_asyncio(first.offer)
            await link.send_message(codec.encode(OpenPeer("s-1", 2, renewed, "echo")))
            answer = await receive(link, PeerAnswer)
            assert (answer.session, answer.negotiation) == ("s-1", 2)
            # Once it leaves, there is room.
            await link.send_message(codec.encode(ClosePeer("s-1", 2)))
            await receive(link, TowerLoadReport, where=lambda m: m.sessions == 0)
            await link.send_message(codec.encode(OpenPeer("s-2", 2, offer, "echo")))
            answer = await receive(link, PeerAnswer)
            assert (answer.session, answer.negotiation) == ("s-2", 2)

    run(main)


@pytest.fixture
def agent_for_video(credentials, tmp_path) -> Iterator[RunningAgent]:
    yield from running_agent(credentials, tmp_path, "--capacity", "26", "--video-weight", "25")


def test_a_session_sent_video_takes_the_video_weight_of_the_capacity(
        agent_for_video, credentials):
    """Drawing and encoding a stream costs the tower far more than a data session: what it
    admits and the load it reports count that, from the offer on."""

    async def main():
        async with client_peer(video=True) as watcher, client_peer(video=True) as second, \
                client_peer() as chat, client_peer() as another, client_peer() as quiet, \
                client_peer() as fourth, \
                open_link(agent_for_video, credentials.context(credentials.broker)) as link:
            await receive(link, TowerHello)
            # The first video offer is not answered yet when the second comes: it already
            # counts as video, so the second finds no room.
            offers = [await bridge.call_asyncio(peer.offer) for peer in (watcher, second)]
            for session, offer in zip(("s-1", "s-2"), offers):
                await link.send_message(codec.encode(OpenPeer(session, 1, offer, "demo")))
            answer, rejected = await answer_and_refusal(link)
            assert answer.session == "s-1"
            assert (rejected.session, rejected.code) == ("s-2", "tower_full")
            await bridge.call_asyncio(watcher.accept, answer.sdp)
            await receive(link, PeerState, where=lambda m: m.state == "connected")
            report = await receive(link, TowerLoadReport, where=lambda m: m.sessions == 1)
            assert report.used == 25
            # Room for one data session, then none.
            await offer_over(link, chat, session="s-3")
            await receive(link, PeerState, where=lambda m: m.state == "connected")
            report = await receive(link, TowerLoadReport, where=lambda m: m.sessions == 2)
            assert report.used == 26
            offer = await bridge.call_asyncio(another.offer)
            await link.send_message(codec.encode(OpenPeer("s-4", 1, offer, "echo")))
            rejected = await receive(link, PeerRejected)
            assert (rejected.session, rejected.code) == ("s-4", "tower_full")
            # The video session leaves: its whole weight is free again. A session of the
            # video application that asked for none counts as one once answered.
            await link.send_message(codec.encode(ClosePeer("s-1", 1)))
            await receive(link, TowerLoadReport, where=lambda m: m.sessions == 1)
            await offer_over(link, quiet, session="s-5", application="demo")
            await receive(link, PeerState, where=lambda m: m.state == "connected")
            report = await receive(link, TowerLoadReport, where=lambda m: m.sessions == 2)
            assert report.used == 2
            # Negotiating again, it may get video: 25, with the data session's 1 and
            # another's, is past 26. It is refused; its peer stays until it moves.
            await offer_over(link, fourth, session="s-6")
            await receive(link, PeerState, where=lambda m: m.state == "connected")
            offer = await bridge.call_asyncio(quiet.offer)
            await link.send_message(codec.encode(OpenPeer("s-5", 2, offer, "demo")))
            rejected = await receive(link, PeerRejected)
            assert (rejected.session, rejected.negotiation, rejected.code) == (
                "s-5", 2, "tower_full")
            report = await receive(link, TowerLoadReport, where=lambda m: m.sessions == 3)
            assert report.used == 3

    run(main)


async def answer_and_refusal(link: WebSocketConnection) -> tuple[PeerAnswer, PeerRejected]:
    """The next ``PeerAnswer`` and ``PeerRejected``, in whichever order they come."""
    found: dict[type, object] = {}
    with trio.fail_after(DEADLINE):
        while len(found) < 2:
            message = await next_message(link)
            if isinstance(message, (PeerAnswer, PeerRejected)):
                found[type(message)] = message
    return found[PeerAnswer], found[PeerRejected]


async def refusals_until(link: WebSocketConnection, enough: Callable[[list], bool],
                         done: Callable[[object], bool] = lambda message: False) -> list:
    """The ``PeerRejected`` frames that arrive until ``enough`` of them, or a ``done``
    frame; the rest is skipped."""
    refusals: list[PeerRejected] = []
    with trio.fail_after(DEADLINE):
        while not enough(refusals):
            message = await next_message(link)
            if isinstance(message, PeerRejected):
                refusals.append(message)
            elif done(message):
                break
    return refusals


def test_candidates_past_the_hundredth_for_one_offer_are_refused(agent, credentials):
    async def main():
        async with client_peer() as peer, \
                open_link(agent, credentials.context(credentials.broker)) as link:
            await receive(link, TowerHello)
            offer = await bridge.call_asyncio(peer.offer)
            await link.send_message(codec.encode(OpenPeer("s-1", 1, offer, "echo")))
            # Before the answer and after it, as they come.
            for port in range(10_000, 10_102):
                await link.send_message(codec.encode(AddCandidate(
                    "s-1", 1, f"candidate:{port} 1 udp 2113937151 127.0.0.1 {port} typ host",
                    "0", 0)))
            # The peer takes its messages in order: once the last two are refused, every
            # refusal there is has been sent; the rest come before the peer's close.
            refusals = await refusals_until(link, lambda refused: len(refused) == 2)
            await link.send_message(codec.encode(ClosePeer("s-1", 1)))
            refusals += await refusals_until(
                link, lambda refused: False,
                done=lambda m: isinstance(m, TowerLoadReport) and m.sessions == 0)
            assert refusals == [
                PeerRejected("s-1", 1, "invalid_message", "more than 100 candidates for one offer")
            ] * 2

    run(main)


def test_a_text_frame_is_answered_with_a_link_error_and_the_link_stays_open(agent, credentials):
    async def main():
        async with open_link(agent, credentials.context(credentials.broker)) as link:
            await receive(link, TowerHello)
            await link.send_message("a text frame")
            await receive(link, LinkError)
            await link.send_message(codec.encode(OpenPeer("s-1", 1, "v=0\r\ngarbage", "echo")))
            assert (await receive(link, PeerRejected)).code == "invalid_sdp"
        hello = await say_hello(agent, credentials.context(credentials.broker))
        assert hello.tower == TOWER

    run(main)


def test_a_broker_gone_before_the_upgrade_is_answered_leaves_the_agent_serving(
    agent, credentials
):
    async def main():
        context = credentials.context(credentials.broker)
        # Whether the agent answers before it notices the broker is gone is up to its
        # scheduler, so the broker leaves that way many times.
        for _ in range(20):
            try:
                with trio.fail_after(DEADLINE):
                    stream = await trio.open_tcp_stream(agent.host, agent.port)
                    tls_stream = trio.SSLStream(stream, context, server_hostname=TOWER)
                    await tls_stream.do_handshake()
                    await tls_stream.send_all(UPGRADE_REQUEST)
                    await trio.aclose_forcefully(tls_stream)
            except (OSError, trio.BrokenResourceError):
                break
        hello = await say_hello(agent, context)
        assert hello.tower == TOWER

    run(main)
    assert agent.process.poll() is None


def test_a_new_broker_connection_replaces_the_old_and_closes_its_peers(agent, credentials):
    async def main():
        context = credentials.context(credentials.broker)
        async with client_peer() as peer, open_link(agent, context) as old:
            await receive(old, TowerHello)
            await offer_over(old, peer)
            await receive(old, PeerState, where=lambda m: m.state == "connected")
            await receive(old, TowerLoadReport, where=lambda m: m.sessions == 1)
            async with open_link(agent, context) as new:
                await receive(new, TowerHello)
                with trio.fail_after(DEADLINE):
                    with pytest.raises(ConnectionClosed):
                        while True:
                            await old.get_message()
                # The old connection's peers go with it, at once.
                await receive(new, TowerLoadReport, 5.0, where=lambda m: m.sessions == 0)

    run(main)


def test_the_agent_exits_when_its_stdin_closes(agent):
    agent.process.stdin.close()
    assert agent.process.wait(DEADLINE) == 0
