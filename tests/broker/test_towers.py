"""The broker's end of a tower link, against real agent processes over real TLS.

Which towers the broker accepts (only a current certificate from its own CA naming the
tower it dials, never a revoked one), and renewal of a tower's certificate over a live
link: the tower makes the key, the broker signs, the link stays up, and new handshakes
show the new certificate.
"""

from __future__ import annotations

import functools
import math
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

import msgpack
import pytest
import trio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from trio_websocket import ConnectionClosed, serve_websocket

from actors import Backoff, ChildSpec, SupervisorFlags, bridge, open_system
from broker import outbox
from broker.config import Settings
from broker.issuer import Issuer
from broker.pki import (
    BROKER_NAME,
    CLOCK_SKEW,
    CertificateAuthority,
    client_ssl_context,
    generate_key_and_csr,
    server_ssl_context,
    write_secret,
)
from broker import towers
from broker.link import (
    BUNDLE_FRAMES,
    BUNDLES,
    LINK_VERSION,
    Bundle,
    ClosePeer,
    LinkError,
    OpenPeer,
    PeerAnswer,
    PeerRejected,
    PeerState,
    RenewCertificate,
    TowerHello,
    TowerLoadReport,
    codec,
)
from broker.metrics import ProcessUsage
from broker.towers import (
    REFUSED_FRAMES_BURST,
    LinkContext,
    TowerAddress,
    TowerConnection,
    TowerDirectory,
    TowerLink,
    TowerLinkLost,
    dial_tower,
    receive_hello,
    renewal_delay,
    sleep_until_renewal,
)

from .test_sessions import RecordingSocket

TOWER = "tower-5"
DEADLINE = 15.0


def run(main, *args):
    return bridge.run(main, *args, handle_signals=False)


@dataclass
class Authority:
    directory: Path
    authority: CertificateAuthority
    issuer: Issuer
    broker_tls: object  # ssl.SSLContext

    def identity(self, name: str, *, not_after: timedelta = timedelta(hours=1),
                 issued_ago: timedelta = timedelta(0),
                 authority: CertificateAuthority | None = None) -> Path:
        """A tower's key and certificate in one file, with the validity asked for."""
        authority = authority or self.authority
        key_pem, _ = generate_key_and_csr(name)
        key = serialization.load_pem_private_key(key_pem, password=None)
        now = datetime.now(timezone.utc)
        certificate = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, name)]))
            .issuer_name(authority.certificate.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - issued_ago - CLOCK_SKEW)
            .not_valid_after(now + not_after)
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([x509.ExtendedKeyUsageOID.SERVER_AUTH]),
                           critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                authority.certificate.public_key()), critical=False)
            .sign(authority._private_key, hashes.SHA256())
        )
        path = self.directory / f"{name}-{certificate.serial_number:x}.pem"
        write_secret(path, key_pem + certificate.public_bytes(serialization.Encoding.PEM))
        return path


@pytest.fixture
def authority(tmp_path) -> Authority:
    ca = CertificateAuthority.create()
    ca.save(tmp_path / "ca")
    key, certificate = ca.issue(BROKER_NAME, client_only=True)
    write_secret(tmp_path / "broker.pem", key + certificate)
    issuer = Issuer(ca, tmp_path / "ca", timedelta(hours=1))
    tls = client_ssl_context(tmp_path / "ca" / "ca.pem", tmp_path / "broker.pem")
    return Authority(tmp_path, ca, issuer, tls)


@dataclass
class Agent:
    process: subprocess.Popen
    address: TowerAddress
    identity: Path


@pytest.fixture
def start_agent(authority) -> Iterator:
    started: list[subprocess.Popen] = []

    def start(identity: Path, name: str = TOWER) -> Agent:
        process = subprocess.Popen(
            [sys.executable, "-m", "broker", "tower", "run", "--name", name,
             "--listen", "127.0.0.1:0", "--identity", str(identity),
             "--ca", str(authority.directory / "ca" / "ca.pem"), "--load-interval", "0.2"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
        )
        started.append(process)
        line = process.stdout.readline().decode().split()
        assert line[:1] == ["ready"], line
        return Agent(process, TowerAddress(line[1], int(line[2])), identity)

    yield start
    for process in started:
        process.kill()
        process.wait(10)
        process.stdout.close()
        process.stdin.close()


def dial(authority: Authority, agent: Agent, name: str = TOWER) -> x509.Certificate:
    """Link as the broker does and take the hello; returns the tower's certificate."""
    async def main():
        outcome: dict = {}
        async with trio.open_nursery() as nursery:
            try:
                with trio.fail_after(DEADLINE):
                    websocket, outcome["certificate"] = await dial_tower(
                        nursery, agent.address.host, agent.address.port, name,
                        authority.broker_tls)
                    await receive_hello(websocket, name, silence=5.0)
                    await websocket.aclose()
            except TowerLinkLost as error:
                outcome["error"] = error
        if "error" in outcome:
            raise outcome["error"]
        return outcome["certificate"]

    return run(main)


def test_a_current_certificate_of_the_broker_ca_naming_the_tower_links(authority, start_agent):
    agent = start_agent(authority.identity(TOWER))
    assert dial(authority, agent).subject.rfc4514_string() == f"CN={TOWER}"


@pytest.mark.parametrize("case, expected", [
    ("expired", "certificate has expired"),
    ("another CA", "unable to get local issuer certificate"),
    ("another tower", "Hostname mismatch"),
])
def test_a_tower_that_cannot_prove_it_is_the_tower_does_not_link(
    authority, start_agent, case, expected
):
    if case == "expired":
        identity = authority.identity(TOWER, not_after=-timedelta(minutes=1),
                                      issued_ago=timedelta(hours=1))
    elif case == "another CA":
        identity = authority.identity(TOWER, authority=CertificateAuthority.create("rogue"))
    else:
        identity = authority.identity("tower-6")
    agent = start_agent(identity, name=TOWER)
    with pytest.raises(TowerLinkLost) as refused:
        dial(authority, agent)
    assert expected in str(refused.value)


def test_renewal_replaces_the_certificate_over_the_live_link_then_revocation_closes_it(
    authority, start_agent
):
    # Issued long enough ago that its renewal is due at once.
    first = authority.identity(TOWER, not_after=timedelta(minutes=10),
                               issued_ago=timedelta(hours=1))
    agent = start_agent(first)
    first_key = first.read_bytes().split(b"-----END PRIVATE KEY-----")[0]
    settings = Settings(tower_silence=1.0, tower_load_interval=0.2)
    directory = TowerDirectory(stale_after=settings.tower_silence)
    context = LinkContext(directory, authority.broker_tls, settings, authority.issuer)
    seen = {}

    async def main():
        children = [ChildSpec("link", lambda: TowerLink(TOWER, agent.address, context))]
        flags = SupervisorFlags(intensity=100, period=1, backoff=Backoff(initial=0.2))
        async with open_system("broker", children=children, flags=flags) as system:
            with trio.fail_after(DEADLINE):
                while directory.get(TOWER) is None:
                    await trio.sleep(0.05)
                connection = directory.get(TOWER)
                original_expiry = connection.certificate_expires
                while connection.certificate_expires == original_expiry:
                    await trio.sleep(0.05)
            seen["renewed_expiry"] = connection.certificate_expires
            seen["still_linked"] = directory.get(TOWER) is connection
            # A new handshake shows the renewed certificate (and, as any new broker
            # connection would, takes the agent over: the link reconnects).
            seen["new_handshake"] = await trio.to_thread.run_sync(dial, authority, agent)
            [record] = [r for r in authority.issuer.records() if r.tower == TOWER]
            seen["record"] = record
            with trio.fail_after(DEADLINE):
                while directory.get(TOWER) in (None, connection):
                    await trio.sleep(0.05)
            relinked = directory.get(TOWER)
            authority.issuer.revoke(TOWER)
            with trio.fail_after(DEADLINE):
                while not relinked.closed.is_set():
                    await trio.sleep(0.05)
            await trio.sleep(1.0)  # relinks are refused too
            seen["relinked"] = directory.get(TOWER) is not None
            seen["failure"] = str(system.lookup("/broker/link").snapshot().last_failure)

    run(main)
    assert seen["still_linked"]
    assert seen["renewed_expiry"] > datetime.now(timezone.utc) + timedelta(minutes=50)
    assert format(seen["new_handshake"].serial_number, "x") == seen["record"].serial
    assert agent.identity.read_bytes().split(b"-----END PRIVATE KEY-----")[0] != first_key
    assert not seen["relinked"]
    assert "revoked" in seen["failure"]


def test_renewal_is_due_at_two_thirds_of_the_lifetime(authority):
    ca = authority.authority
    _, csr = generate_key_and_csr(TOWER)
    certificate = x509.load_pem_x509_certificate(
        ca.sign_tower_csr(csr, TOWER, lifetime=timedelta(hours=24)))
    now = datetime.now(timezone.utc)
    assert renewal_delay(certificate, now) == pytest.approx(16 * 3600, abs=5)
    assert renewal_delay(certificate, now + timedelta(hours=20)) == 1.0


async def test_renewal_follows_a_wall_clock_that_jumps(autojump_clock, authority):
    ca = authority.authority
    _, csr = generate_key_and_csr(TOWER)
    certificate = x509.load_pem_x509_certificate(
        ca.sign_tower_csr(csr, TOWER, lifetime=timedelta(hours=24)))
    start = datetime.now(timezone.utc)

    def wall_clock() -> datetime:
        # Two minutes in, the machine learns it is 20 hours later (a VM resumed, say).
        elapsed = trio.current_time()
        return start + timedelta(seconds=elapsed, hours=20 if elapsed >= 120 else 0)

    await sleep_until_renewal(certificate, wall_clock)
    # Due at 16 hours; renewed within a minute of the jump, not 16 hours after the start.
    assert 120 <= trio.current_time() <= 181


def linked_directory() -> tuple[TowerDirectory, TowerConnection]:
    directory = TowerDirectory(stale_after=3.0)
    connection = TowerConnection(TOWER, None, TowerHello(TOWER, 100, "test"))
    directory.connected(connection)
    return directory, connection


def opened(socket: RecordingSocket) -> list[str]:
    return [message.session for message in socket.received if isinstance(message, OpenPeer)]


async def offer(connection: TowerConnection, session: str) -> None:
    """As a negotiation offers: its turn, then its offer."""
    await connection.offer_turn(session, 1)
    await connection.send(OpenPeer(session, 1, "v=0", "echo"))


async def test_offers_past_the_window_wait_their_turn_in_order(autojump_clock):
    socket = RecordingSocket()
    connection = TowerConnection(TOWER, socket, TowerHello(TOWER, 100, "test"),
                                 offers_at_once=2)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(connection.outbox.write_all)
        for session in "abcd":
            nursery.start_soon(offer, connection, session)
            await trio.sleep(0.1)
        late = trio.CancelScope()

        async def give_up() -> None:
            with late:
                await offer(connection, "e")

        nursery.start_soon(give_up)
        await trio.sleep(1)
        assert opened(socket) == ["a", "b"]
        assert connection.waiting_offers() == 3
        late.cancel()  # its negotiation ended: it leaves the queue, taking no turn
        # A candidate refused, and an earlier negotiation's last word: neither settles.
        connection.deliver(PeerRejected("a", 1, "invalid_message", "a bad candidate"))
        connection.deliver(PeerState("b", 0, "closed"))
        await trio.sleep(1)
        assert opened(socket) == ["a", "b"]
        connection.deliver(PeerAnswer("a", 1, "v=0"))
        await trio.sleep(1)
        assert opened(socket) == ["a", "b", "c"]
        connection.deliver(PeerRejected("b", 1, "invalid_sdp", "not an offer"))
        await trio.sleep(1)
        assert opened(socket) == ["a", "b", "c", "d"]
        assert connection.waiting_offers() == 0
        # An answered offer settles once; a negotiation gone before its answer settles too.
        connection.deliver(PeerAnswer("a", 1, "v=0"))
        negotiation = object()
        connection.route("c", negotiation)
        connection.unroute("c", negotiation)
        assert set(connection.offers_out) == {"d"}
        nursery.start_soon(offer, connection, "f")
        await trio.sleep(1)
        assert opened(socket)[-1] == "f" and connection.waiting_offers() == 0
        # The turns handed over along the way kept the window full: two out, one waits.
        nursery.start_soon(offer, connection, "g")
        await trio.sleep(1)
        assert opened(socket)[-1] == "f" and connection.waiting_offers() == 1
        nursery.cancel_scope.cancel()


async def test_a_towers_reported_usage_is_kept_while_it_is_linked(autojump_clock):
    directory, connection = linked_directory()
    directory.report(TOWER, TowerLoadReport(3, 100, cpu_seconds=1.5, resident_bytes=2**26))
    directory.report(TOWER, TowerLoadReport(4, 100, cpu_seconds=2.5, resident_bytes=2**27))
    assert directory.usage == {TOWER: ProcessUsage(2.5, 2**27)}
    assert directory.placement.load_of(TOWER).sessions == 4
    # A report without usage (a tower older than it) changes only the load.
    directory.report(TOWER, TowerLoadReport(1, 100))
    assert directory.usage == {TOWER: ProcessUsage(2.5, 2**27)}
    assert directory.placement.load_of(TOWER).sessions == 1
    directory.disconnected(connection)
    assert directory.usage == {}
    # A report from a tower that is not linked is not taken.
    directory.report(TOWER, TowerLoadReport(1, 100, cpu_seconds=3.0, resident_bytes=1))
    assert directory.usage == {} and directory.placement.load_of(TOWER) is None


async def test_a_towers_state_is_draining_stale_or_ready_full_or_not(autojump_clock):
    directory, _ = linked_directory()
    directory.report(TOWER, TowerLoadReport(100, 100))
    # Full: placement does not choose it, but it is no less alive for that.
    assert directory.choose() is None
    assert directory.state_of(TOWER, trio.current_time()) == "ready"
    await trio.sleep(3)
    assert directory.state_of(TOWER, trio.current_time()) == "stale"
    directory.drain(TOWER)
    assert directory.state_of(TOWER, trio.current_time()) == "draining"


@pytest.mark.parametrize("figures", [
    {"cpu_seconds": -1.0}, {"cpu_seconds": math.nan}, {"cpu_seconds": math.inf},
    {"resident_bytes": -1}, {"sessions": -1}, {"capacity": -5},
    {"capacity": 2**63 - 1},  # more than its hello's: it would draw every session
])
async def test_a_load_report_with_impossible_figures_is_refused_whole(autojump_clock, figures):
    directory, _ = linked_directory()
    directory.report(TOWER, TowerLoadReport(2, 100, cpu_seconds=1.0, resident_bytes=10))
    before = directory.placement.reported_at(TOWER)
    await trio.sleep(1)
    report = {"sessions": 5, "capacity": 100, "cpu_seconds": 2.0, "resident_bytes": 20}
    with pytest.raises(ValueError, match=TOWER):
        directory.report(TOWER, TowerLoadReport(**(report | figures)))
    # Neither its usage nor its load, nor its time as the tower's latest report.
    assert directory.usage == {TOWER: ProcessUsage(1.0, 10)}
    assert directory.placement.load_of(TOWER).sessions == 2
    assert directory.placement.reported_at(TOWER) == before


def test_a_load_report_with_impossible_figures_gets_a_link_error_and_the_link_stays(
    authority,
):
    """A tower speaking the link protocol by hand sends one bad report."""
    seen = {}

    async def tower(request) -> None:
        websocket = await request.accept()
        await websocket.send_message(codec.encode(TowerHello(TOWER, 100, "test")))
        await websocket.send_message(codec.encode(
            TowerLoadReport(1, 100, cpu_seconds=-1.0, resident_bytes=2**20)))
        seen["answer"] = codec.decode(await websocket.get_message())
        try:
            while True:
                await websocket.send_message(codec.encode(
                    TowerLoadReport(2, 100, cpu_seconds=1.5, resident_bytes=2**20)))
                await trio.sleep(0.2)
        except ConnectionClosed:
            pass  # the broker's system closed at the end of the test

    async def main():
        async with linked_by_hand(authority, tower) as (_, directory):
            with trio.fail_after(DEADLINE):
                while directory.usage.get(TOWER) is None:
                    await trio.sleep(0.05)
            connection = directory.get(TOWER)
            seen["linked"] = connection is not None and not connection.closed.is_set()
            seen["load"] = directory.placement.load_of(TOWER)
            seen["usage"] = directory.usage[TOWER]

    run(main)
    assert isinstance(seen["answer"], LinkError)
    assert "impossible usage" in seen["answer"].message
    # The link stayed up; the next, sound report was taken.
    assert seen["linked"]
    assert seen["load"].sessions == 2
    assert seen["usage"] == ProcessUsage(1.5, 2**20)


def test_a_tower_that_stops_reading_is_dropped_not_kept_ready(authority, monkeypatch):
    """A tower that reports its load but never reads what it is sent."""
    monkeypatch.setattr(outbox, "WRITE_TIMEOUT", 1.0)
    seen = {}

    async def tower(request) -> None:
        websocket = await request.accept()
        await websocket.send_message(codec.encode(TowerHello(TOWER, 100, "test")))
        with trio.move_on_after(DEADLINE):
            try:
                while True:
                    await websocket.send_message(codec.encode(TowerLoadReport(0, 100)))
                    await trio.sleep(0.2)
            except ConnectionClosed:
                pass  # the broker dropped it

    async def main():
        async with linked_by_hand(authority, tower) as (system, directory):
            with trio.fail_after(DEADLINE):
                connection = await linked(directory)
                # More than the socket buffers hold, never read.
                while connection.send_nowait(LinkError("x" * 200_000)):
                    await trio.sleep(0)
                await connection.closed.wait()
                seen["ready"] = directory.placement.ready(trio.current_time())
                link = system.lookup("/broker/link")
                while not link.snapshot().failures:
                    await trio.sleep(0.05)
            seen["failure"] = link.snapshot().failures[0].reason

    run(main)
    assert TOWER not in seen["ready"]
    assert "the other side does not read" in seen["failure"]


async def paused() -> None:
    time.sleep(1.5)  # the whole process, trio's loop included, stands still


async def paused_past_three_silences() -> None:
    time.sleep(3.5)  # the reports wait in the socket: read before the link is judged


async def busy() -> None:
    for _ in range(10):
        time.sleep(0.7)  # the whole loop: every task waits this pass out
        await trio.lowlevel.checkpoint()


@pytest.mark.parametrize("delay", [paused, paused_past_three_silences, busy],
                         ids=["paused", "paused long", "busy"])
def test_the_brokers_own_delay_is_not_taken_for_its_towers_silence(authority, delay):
    """The broker's process stops for longer than the tower's silence (a VM paused,
    swapping), or its loop takes 0.7 s a pass for 7 s (2,000 sessions ending at once,
    say), where its link's reader takes a pass or two per frame: a report less often
    than the silence, though the tower sends one every 0.2 s. The link stays."""
    seen = {}
    report = codec.encode(TowerLoadReport(0, 100))

    async def main():
        async with linked_by_hand(authority, sends_forever(report), silence=1.0) as (
                system, directory):
            connection = await linked(directory)
            before = directory.placement.reported_at(TOWER)
            await delay()
            with trio.fail_after(DEADLINE):  # until a report has been read since
                while directory.placement.reported_at(TOWER) in (None, before):
                    await trio.sleep(0.05)
            seen["open"] = not connection.closed.is_set()
            seen["restarts"] = system.lookup("/broker/link").snapshot().restarts

    run(main)
    assert seen == {"open": True, "restarts": 0}


# A link that fails again and again while the test looks at its first failure.
PATIENT = SupervisorFlags(intensity=100, period=1, backoff=Backoff(initial=0.2))


async def first_failure(system) -> str:
    """Why the broker's link (of ``linked_by_hand``) first ended."""
    link = system.lookup("/broker/link")
    with trio.fail_after(DEADLINE):
        while not link.snapshot().failures:
            await trio.sleep(0.05)
    return str(link.snapshot().failures[0].reason)


def sends_forever(frame: bytes, hello: TowerHello = TowerHello(TOWER, 100, "test")):
    """A tower that says ``hello``, then ``frame`` every 0.2 s until the link ends."""
    async def tower(request) -> None:
        websocket = await request.accept()
        await websocket.send_message(codec.encode(hello))
        try:
            while True:
                await websocket.send_message(frame)
                await trio.sleep(0.2)
        except ConnectionClosed:
            pass

    return tower


async def linked(directory: TowerDirectory) -> TowerConnection:
    """The tower's connection, once its link is up."""
    with trio.fail_after(DEADLINE):
        while (connection := directory.get(TOWER)) is None:
            await trio.sleep(0.05)
    return connection


async def linked_then_dropped(directory: TowerDirectory) -> None:
    connection = await linked(directory)
    with trio.fail_after(DEADLINE):
        await connection.closed.wait()


@pytest.mark.parametrize("frame, why", [
    # Anything but load reports: a tower that is broken, or not what it claims.
    (codec.encode(PeerState("s-1", 1, "closed")), "silent for 1 s: no load report"),
    # Reports that are all refused: a tower that is broken.
    (codec.encode(TowerLoadReport(0, 100, cpu_seconds=-1.0)), "impossible usage"),
    # A newer tower than this broker: its reports have a field this broker does not know.
    (msgpack.packb([LINK_VERSION, "tower.load", {"sessions": 0, "capacity": 100, "gpu": 1}]),
     "unknown field 'gpu'"),
    # Its report in a bundle in a bundle: a tower that bundles sends its frames flat.
    (codec.encode(Bundle((codec.encode(Bundle((codec.encode(TowerLoadReport(0, 100)),))),))),
     "does not send Bundle in a bundle"),
    # Its reports in a bundle of more frames than one may hold: refused whole.
    (codec.encode(Bundle((codec.encode(TowerLoadReport(0, 100)),) * (BUNDLE_FRAMES + 1))),
     f"a bundle of {BUNDLE_FRAMES + 1} frames"),
], ids=["other frames", "refused reports", "newer agent", "bundle in a bundle", "big bundle"])
def test_only_a_load_report_taken_keeps_a_tower_linked(authority, frame, why):
    """Whatever else a tower sends, without a load report taken it is as good as silent:
    dropped (its sessions moved), not kept linked but never chosen."""
    seen = {}

    async def main():
        async with linked_by_hand(authority, sends_forever(frame), silence=1.0,
                                  flags=PATIENT) as (system, directory):
            await linked_then_dropped(directory)
            seen["failure"] = await first_failure(system)

    run(main)
    assert "silent for 1 s: no load report" in seen["failure"]
    assert why in seen["failure"]


def test_a_towers_bundle_is_taken_frame_by_frame(authority):
    """A report in a bundle keeps the tower linked and is taken; a frame in it that does
    not decode is refused alone."""
    seen = {}
    bundled = codec.encode(Bundle((
        codec.encode(PeerState("s-1", 1, "closed")),
        b"\xc1 not a frame",
        codec.encode(TowerLoadReport(3, 100)),
    )))

    async def main():
        async with linked_by_hand(authority, sends_forever(bundled), silence=1.0) as (
                _, directory):
            connection = await linked(directory)
            await trio.sleep(2.5)  # past the silence, with a report in every bundle
            seen["open"] = not connection.closed.is_set()
            seen["load"] = directory.placement.load_of(TOWER).sessions
            seen["undeliverable"] = connection.undeliverable

    run(main)
    assert seen["open"] and seen["load"] == 3
    assert seen["undeliverable"] > 0  # the state, taken and routed (to no session)


@pytest.mark.parametrize("takes_bundles", [True, False], ids=["bundling", "older tower"])
def test_the_broker_bundles_only_to_a_tower_that_takes_bundles(authority, takes_bundles):
    """Frames queued together go as one message to a tower that took the subprotocol
    the broker offers, and one by one to an older tower; in order either way. The first
    goes alone."""
    seen: dict = {"messages": 0, "frames": []}
    queued = trio.Event()

    async def tower(request) -> None:
        seen["offered"] = request.proposed_subprotocols
        websocket = await request.accept(subprotocol=BUNDLES if takes_bundles else None)
        await websocket.send_message(codec.encode(TowerHello(TOWER, 100, "test")))
        await websocket.send_message(codec.encode(TowerLoadReport(0, 100)))
        await queued.wait()
        while len(seen["frames"]) < 50:
            message = codec.decode(await websocket.get_message())
            seen["messages"] += 1
            seen["frames"].extend([codec.decode(frame) for frame in message.frames]
                                  if isinstance(message, Bundle) else [message])
        await trio.sleep_forever()  # linked until the test ends

    async def main():
        async with linked_by_hand(authority, tower) as (_, directory):
            with trio.fail_after(DEADLINE):
                connection = await linked(directory)
                for number in range(50):  # no checkpoint: all wait for the writer
                    assert connection.send_nowait(ClosePeer(f"s-{number}", 1))
                queued.set()
                while len(seen["frames"]) < 50:
                    await trio.sleep(0.05)

    run(main)
    assert seen["offered"] == (BUNDLES,)
    assert seen["frames"] == [ClosePeer(f"s-{number}", 1) for number in range(50)]
    assert seen["messages"] == (2 if takes_bundles else 50)


def test_a_tower_flooding_frames_without_a_report_is_silent_all_the_same(authority):
    """Bundles of frames back to back leave the broker's reader no time waiting: the
    time it spends taking them counts toward the silence too."""
    seen = {}
    flood = codec.encode(Bundle((codec.encode(PeerState("s-1", 1, "closed")),) * BUNDLE_FRAMES))

    async def tower(request) -> None:
        websocket = await request.accept()
        await websocket.send_message(codec.encode(TowerHello(TOWER, 100, "test")))
        try:
            while True:
                await websocket.send_message(flood)
        except ConnectionClosed:
            pass

    async def main():
        async with linked_by_hand(authority, tower, silence=1.0, flags=PATIENT) as (
                system, directory):
            await linked_then_dropped(directory)
            seen["failure"] = await first_failure(system)

    run(main)
    assert "silent for 1 s: no load report" in seen["failure"]


def test_a_silent_tower_is_dropped_within_three_silences_however_busy_the_broker(authority):
    """The broker's own delay is not counted against a tower, up to three silences of
    the wall clock: a tower that went quiet is not kept for as long as the broker is
    busy (here 1 s a pass, in which the silence counts 0.1 s: ten passes to a silence)."""
    seen = {}

    async def tower(request) -> None:
        websocket = await request.accept()
        await websocket.send_message(codec.encode(TowerHello(TOWER, 100, "test")))
        await websocket.send_message(codec.encode(TowerLoadReport(0, 100)))
        await trio.sleep_forever()

    async def main():
        async with linked_by_hand(authority, tower, silence=1.0, flags=PATIENT) as (
                _, directory):
            connection = await linked(directory)
            for _ in range(9):  # past three silences, and a pass or two to end the link
                time.sleep(1.0)
                await trio.lowlevel.checkpoint()
                if connection.closed.is_set():
                    break
            seen["dropped"] = connection.closed.is_set()

    run(main)
    assert seen["dropped"]


def test_a_revoked_tower_is_dropped_whatever_it_sends(authority):
    """``broker ca revoke`` reaches a link with no load reports too, and says why."""
    key, csr = generate_key_and_csr(TOWER)
    identity = authority.directory / "ledgered.pem"
    write_secret(identity, key + authority.issuer.sign(csr, TOWER))
    seen = {}

    async def main():
        tower = sends_forever(codec.encode(PeerState("s-1", 1, "closed")))
        async with linked_by_hand(authority, tower, silence=DEADLINE, identity=identity,
                                  flags=PATIENT) as (system, directory):
            with trio.fail_after(DEADLINE):
                while directory.get(TOWER) is None:
                    await trio.sleep(0.05)
            authority.issuer.revoke(TOWER)
            seen["failure"] = await first_failure(system)

    run(main)
    assert "is revoked" in seen["failure"]


def test_a_link_ends_when_its_certificate_expires_unrenewed(authority):
    """A tower that reports its load but never answers a renewal: its link does not
    outlive the certificate it was opened with."""
    identity = authority.identity(TOWER, not_after=timedelta(seconds=3),
                                  issued_ago=timedelta(hours=1))
    seen = {}

    async def main():
        tower = sends_forever(codec.encode(TowerLoadReport(0, 100)))
        async with linked_by_hand(authority, tower, silence=1.0, identity=identity,
                                  flags=PATIENT) as (system, directory):
            await linked_then_dropped(directory)
            seen["failure"] = await first_failure(system)

    run(main)
    assert "expired at" in seen["failure"] and "not renewed" in seen["failure"]


def test_a_renewal_the_tower_cannot_install_fails_at_once_with_its_reason(authority, caplog):
    """The tower says so in a LinkError; the broker used to wait 30 s for an answer that
    would never come, and log only that."""
    identity = authority.identity(TOWER, not_after=timedelta(minutes=10),
                                  issued_ago=timedelta(hours=1))  # due at once

    async def tower(request) -> None:
        websocket = await request.accept()
        await websocket.send_message(codec.encode(TowerHello(TOWER, 100, "test")))
        try:
            while True:
                await websocket.send_message(codec.encode(TowerLoadReport(0, 100)))
                with trio.move_on_after(0.2):
                    if isinstance(codec.decode(await websocket.get_message()),
                                  RenewCertificate):
                        await websocket.send_message(codec.encode(
                            LinkError("a certificate renewal step failed: disk full")))
        except ConnectionClosed:
            pass

    def failures() -> list[str]:
        return [r.getMessage() for r in caplog.records if "renewal failed" in r.getMessage()]

    async def main():
        async with linked_by_hand(authority, tower, identity=identity):
            with trio.fail_after(towers.RENEWAL_TIMEOUT / 2):
                while not failures():
                    await trio.sleep(0.05)

    run(main)
    assert failures()[0] == (f"{TOWER}: certificate renewal failed: the tower: "
                             "a certificate renewal step failed: disk full")


def test_a_hello_claiming_more_than_tower_capacity_is_refused(authority):
    """Every tower is given ``tower_capacity``: one claiming more would draw every new
    session and hide the load from the scaler."""
    claim = Settings().tower_capacity + 1
    hello = TowerHello(TOWER, claim, "test")
    seen = {}

    async def main():
        tower = sends_forever(codec.encode(TowerLoadReport(0, claim)), hello)
        async with linked_by_hand(authority, tower, flags=PATIENT) as (system, directory):
            seen["failure"] = await first_failure(system)
            seen["linked"] = directory.get(TOWER)

    run(main)
    assert f"claims a capacity of {claim}" in seen["failure"]
    assert "tower_capacity" in seen["failure"]
    assert seen["linked"] is None


def test_a_tower_whose_refused_frames_keep_the_broker_busy_is_dropped(authority):
    """Frames cheap to make and costly to decode (a quarter MiB of empty maps), each
    followed by a load report, which keeps the tower from looking silent."""
    costly = msgpack.packb([LINK_VERSION, "tower.load", [[{}] * 1000] * 255])
    seen = {}

    async def tower(request) -> None:
        websocket = await request.accept()
        await websocket.send_message(codec.encode(TowerHello(TOWER, 100, "test")))
        try:
            while True:
                await websocket.send_message(codec.encode(TowerLoadReport(0, 100)))
                await websocket.send_message(costly)
        except ConnectionClosed:
            pass

    async def main():
        async with linked_by_hand(authority, tower, flags=PATIENT) as (system, _):
            seen["failure"] = await first_failure(system)

    run(main)
    assert (f"{TOWER}: the frames it sent that were refused took over 10% of the broker's "
            "time; the last refused: 'tower.load': expected a map of fields, got array"
            ) in seen["failure"]


def test_a_few_refused_frames_between_reports_leave_the_link_up(authority):
    link_survives(authority, rounds=10, bad_frames=20)


def test_a_pause_of_the_broker_while_it_refuses_a_frame_is_not_the_towers(
        authority, monkeypatch):
    """The refused frames' budget is the broker's CPU time: a process paused (a VM, swap)
    while it decodes one bad frame must not cost the tower its link."""
    decode = codec.decode

    def paused_on_bad_frames(data):
        if data.startswith(b"\xc1"):
            time.sleep(REFUSED_FRAMES_BURST + 0.2)  # wall time, no CPU
        return decode(data)

    monkeypatch.setattr(codec, "decode", paused_on_bad_frames)
    link_survives(authority, rounds=1, bad_frames=1)


def link_survives(authority: Authority, rounds: int, bad_frames: int) -> None:
    """A tower sends ``rounds`` of ``bad_frames`` frames that are not msgpack, each round
    followed by a load report: its link is still up after them."""
    rounds_done = trio.Event()

    async def tower(request) -> None:
        websocket = await request.accept()
        await websocket.send_message(codec.encode(TowerHello(TOWER, 100, "test")))
        try:
            for _ in range(rounds):
                for _ in range(bad_frames):
                    await websocket.send_message(b"\xc1 not msgpack")
                await websocket.send_message(codec.encode(TowerLoadReport(0, 100)))
                await trio.sleep(0.1)
            rounds_done.set()
            while True:
                await websocket.send_message(codec.encode(TowerLoadReport(0, 100)))
                await trio.sleep(0.1)
        except ConnectionClosed:
            pass

    async def main():
        async with linked_by_hand(authority, tower) as (system, directory):
            with trio.fail_after(DEADLINE):
                await rounds_done.wait()
                # Frames are read in order: a report taken since, and the rounds were read.
                since = trio.current_time()
                while directory.placement.reported_at(TOWER) <= since:
                    await trio.sleep(0.05)
            assert system.lookup("/broker/link").snapshot().failures == ()
            assert directory.get(TOWER) is not None

    run(main)


def test_a_towers_refusals_are_logged_once_not_per_frame(authority, caplog):
    async def tower(request) -> None:
        websocket = await request.accept()
        await websocket.send_message(codec.encode(TowerHello(TOWER, 100, "test")))
        try:
            for number in range(1000):
                await websocket.send_message(codec.encode(LinkError(f"refusal {number}")))
            while True:
                await websocket.send_message(codec.encode(TowerLoadReport(0, 100)))
                await trio.sleep(0.2)
        except ConnectionClosed:
            pass

    async def main():
        async with linked_by_hand(authority, tower) as (_, directory):
            # Frames are read in order: once a report is taken, every refusal was read.
            with trio.fail_after(DEADLINE):
                while directory.placement.load_of(TOWER) is None:
                    await trio.sleep(0.05)

    run(main)
    lines = [r.getMessage() for r in caplog.records if "refused a frame" in r.getMessage()]
    assert lines == [f"{TOWER} refused a frame: 'refusal 0'"]


async def test_refusals_past_the_first_are_summed_up_once_per_interval(autojump_clock, caplog):
    directory, _ = linked_directory()
    context = LinkContext(directory, None, Settings(), None)
    link = TowerLink(TOWER, TowerAddress(), context)
    for number in range(1000):
        link._refused_by_tower(LinkError(f"refusal {number}"))
        await trio.sleep(0.01)
    await trio.sleep(towers.REFUSAL_LOG_INTERVAL)
    link._refused_by_tower(LinkError("refusal 1000"))
    lines = [r.getMessage() for r in caplog.records if "refused a frame" in r.getMessage()]
    assert lines == [
        f"{TOWER} refused a frame: 'refusal 0'",
        f"{TOWER} refused a frame: 'refusal 1000' (and 999 more since the last logged)",
    ]
    assert link.refused_by_tower == 1001


@asynccontextmanager
async def linked_by_hand(authority: Authority, tower, silence: float = 5.0,
                         identity: Path | None = None,
                         flags: SupervisorFlags = SupervisorFlags()) -> AsyncIterator[tuple]:
    """The broker's own link (``TowerLink``) to a tower of our own CA whose end is
    ``tower``, a WebSocket handler speaking the link protocol by hand; yields the system
    and the tower directory. The tower shows ``identity`` (by default, a certificate of
    an hour made outside the issuer's ledger); ``flags`` are the link's supervisor's."""
    identity = identity or authority.identity(TOWER)
    tower_tls = server_ssl_context(identity, identity,
                                   client_ca_file=authority.directory / "ca" / "ca.pem")
    settings = Settings(tower_silence=silence, tower_load_interval=0.2)
    directory = TowerDirectory(stale_after=settings.tower_silence)
    context = LinkContext(directory, authority.broker_tls, settings, authority.issuer)
    async with trio.open_nursery() as nursery:
        server = await nursery.start(functools.partial(
            serve_websocket, tower, "127.0.0.1", 0, tower_tls))
        address = TowerAddress("127.0.0.1", server.port)
        children = [ChildSpec("link", lambda: TowerLink(TOWER, address, context))]
        async with open_system("broker", children=children, flags=flags) as system:
            yield system, directory
        nursery.cancel_scope.cancel()
