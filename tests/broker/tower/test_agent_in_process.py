"""The tower agent's communication server in this process, on the asyncio-host/trio-guest
runner, linked as NGINX links it (a plain WebSocket, the client's certificate subject in
a header): for the races that need a hand inside the agent. ``test_agent`` runs the real
agent process over TLS."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path

import trio
from trio_websocket import WebSocketConnection

from actors import ActorSystem, ChildSpec, Supervisor, SupervisorFlags, bridge, open_system
from broker.client_peer import new_peer
from broker.link import (
    CertificateIssued,
    ClosePeer,
    CertificateRequest,
    LinkError,
    OpenPeer,
    PeerAnswer,
    RenewCertificate,
    TowerHello,
    TowerLoadReport,
    codec,
)
from broker.pki import CertificateAuthority
from broker.tower import application
from broker.tower import peer as tower_peer
from broker.tower.agent import AgentSettings, CommunicationServer
from broker.tower.peer import PeerSettings

from .test_agent import DEADLINE, TOWER, link_over, receive


@asynccontextmanager
async def agent(peer: PeerSettings = PeerSettings()) -> AsyncIterator[tuple[ActorSystem, int]]:
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    settings = AgentSettings(name=TOWER, identity=Path("/nonexistent"),
                             socket=Path("/nonexistent"), load_interval=0.2, peer=peer)
    peers = SupervisorFlags(intensity=1_000_000, period=1)
    children = [
        ChildSpec("peers", lambda: Supervisor((), peers)),
        ChildSpec("link", lambda: CommunicationServer(settings, listeners)),
    ]
    async with open_system(TOWER, children=children) as system:
        yield system, port


def peer_actors(system: ActorSystem) -> list[str]:
    return [child.name for child in system.lookup(f"/{TOWER}/peers").which_children()]


def link(port: int) -> AbstractAsyncContextManager[WebSocketConnection]:
    """The broker's end of a link as NGINX passes it on: no TLS, the broker's subject."""

    async def connect() -> trio.abc.Stream:
        return await trio.open_tcp_stream("127.0.0.1", port)

    return link_over(connect, extra_headers=[(b"x-client-subject", b"CN=broker")])


def test_a_link_replaced_while_a_peer_starts_leaves_no_peer_behind(monkeypatch):
    """The broker gave the old link's sessions up: the peer it was opening is closed
    with them, not left running where nobody tracks or counts it."""
    started = tower_peer.Peer.started
    starting, replaced = trio.Event(), trio.Event()

    async def slow_started(self):
        # The peers' supervisor busy elsewhere (closing other peers, say) until the link
        # that asked for this peer has been replaced.
        starting.set()
        await replaced.wait()
        await started(self)

    monkeypatch.setattr(tower_peer.Peer, "started", slow_started)

    async def main():
        client = await bridge.call_asyncio(new_peer)
        offer = await bridge.call_asyncio(client.offer)
        async with agent() as (system, port):
            async with link(port) as old:
                await receive(old, TowerHello)
                await old.send_message(codec.encode(OpenPeer("s-1", 1, offer, "echo")))
                with trio.fail_after(DEADLINE):
                    await starting.wait()
                async with link(port) as new:
                    await receive(new, TowerHello)
                    replaced.set()
                    await receive(new, TowerLoadReport, where=lambda m: m.sessions == 0)
                    with trio.fail_after(DEADLINE):
                        while peer_actors(system):
                            await trio.sleep(0.05)
        await bridge.call_asyncio(client.close)

    bridge.run(main, handle_signals=False)


def test_a_session_is_reported_once_its_offer_is_answered(monkeypatch):
    """Until its answer the broker counts the session itself: counted in the tower's
    reports too, it would be counted twice (a video session 50 of a tower's places)."""
    answer_offer = tower_peer.answer_offer
    answering, answer = asyncio.Event(), asyncio.Event()

    async def held_answer(*args, **kwargs):
        answering.set()
        await answer.wait()
        return await answer_offer(*args, **kwargs)

    async def let_it_answer() -> None:
        answer.set()

    monkeypatch.setattr(tower_peer, "answer_offer", held_answer)

    async def main():
        client = await bridge.call_asyncio(new_peer)
        offer = await bridge.call_asyncio(client.offer)
        async with agent() as (system, port), link(port) as broker:
            await receive(broker, TowerHello)
            await broker.send_message(codec.encode(OpenPeer("s-1", 1, offer, "echo")))
            await bridge.call_asyncio(answering.wait)  # its peer taken, not answered
            for _ in range(3):  # reports while the offer is being answered
                report = await receive(broker, TowerLoadReport)
                assert (report.sessions, report.used) == (0, 0)
            await bridge.call_asyncio(let_it_answer)
            await receive(broker, PeerAnswer)
            report = await receive(broker, TowerLoadReport, where=lambda m: m.sessions == 1)
            assert report.used == 1
        await bridge.call_asyncio(client.close)

    bridge.run(main, handle_signals=False)


def test_peers_closing_slowly_hold_up_neither_the_link_nor_the_next_peer(monkeypatch):
    """Closes went one after another through the peers' supervisor, each waited for in
    full, and the next offer's peer was started behind them on the link's reader (a
    peer's close waits for its TURN server, where there is one)."""
    close = application.TowerPeer._close
    closing, let_close = asyncio.Event(), asyncio.Event()

    async def slow_close(self) -> None:
        closing.set()
        await let_close.wait()
        await close(self)

    async def release() -> None:
        let_close.set()

    monkeypatch.setattr(application.TowerPeer, "_close", slow_close)

    async def main():
        client = await bridge.call_asyncio(new_peer)
        offer = await bridge.call_asyncio(client.offer)
        async with agent() as (system, port), link(port) as broker:
            await receive(broker, TowerHello)
            for session in ("s-1", "s-2"):
                await broker.send_message(codec.encode(OpenPeer(session, 1, offer, "echo")))
                await receive(broker, PeerAnswer)
            try:
                for session in ("s-1", "s-2"):
                    await broker.send_message(codec.encode(ClosePeer(session, 1)))
                await bridge.call_asyncio(closing.wait)
                await broker.send_message(codec.encode(OpenPeer("s-3", 1, offer, "echo")))
                answer = await receive(broker, PeerAnswer)
                assert answer.session == "s-3" and not let_close.is_set()
                # A peer ends within its wait for the close; the close goes on meanwhile.
                with trio.fail_after(DEADLINE):
                    while len(peer_actors(system)) > 1:
                        await trio.sleep(0.05)
                assert not let_close.is_set()
            finally:
                await bridge.call_asyncio(release)
        await bridge.call_asyncio(client.close)

    bridge.run(main, handle_signals=False)


def test_the_brokers_link_error_is_logged_not_answered(caplog):
    async def main():
        async with agent() as (_, port):
            async with link(port) as broker:
                await receive(broker, TowerHello)
                await broker.send_message(codec.encode(LinkError("a report it refused")))
                # What comes next is a load report, not a LinkError about the LinkError.
                await receive(broker, TowerLoadReport)
                await receive(broker, TowerLoadReport)

    bridge.run(main, handle_signals=False)
    said = [record.getMessage() for record in caplog.records]
    assert f"{TOWER}: the broker refused a frame: a report it refused" in said


def test_a_certificate_that_cannot_be_installed_fails_the_renewal_not_the_link():
    """The identity file cannot be written (here: it cannot even be read): the broker is
    told, and tries the renewal again later; the link and its sessions stay."""
    authority = CertificateAuthority.create()
    seen = {}

    async def main():
        client = await bridge.call_asyncio(new_peer)
        offer = await bridge.call_asyncio(client.offer)
        async with agent() as (system, port):
            async with link(port) as broker:
                await receive(broker, TowerHello)
                await broker.send_message(codec.encode(OpenPeer("s-1", 1, offer, "echo")))
                await receive(broker, PeerAnswer)
                await broker.send_message(codec.encode(RenewCertificate()))
                request = await receive(broker, CertificateRequest)
                certificate = authority.sign_tower_csr(request.csr, TOWER)
                await broker.send_message(codec.encode(CertificateIssued(certificate)))
                seen["error"] = (await receive(broker, LinkError)).message
                seen["report"] = await receive(broker, TowerLoadReport)
                seen["restarts"] = system.lookup(f"/{TOWER}/link").snapshot().restarts
                seen["peers"] = peer_actors(system)
        await bridge.call_asyncio(client.close)

    bridge.run(main, handle_signals=False)
    assert "a certificate renewal step failed" in seen["error"]
    assert seen["report"].sessions == 1
    assert seen["restarts"] == 0
    assert len(seen["peers"]) == 1


def test_a_server_that_crashed_closes_the_peers_of_its_previous_incarnation(monkeypatch):
    """Their broker connection ended with the server that opened them: nothing would
    track, count or close them."""
    async def bug(self) -> None:
        raise RuntimeError("a bug in a renewal step")

    monkeypatch.setattr(CommunicationServer, "_request_certificate", bug)

    async def main():
        client = await bridge.call_asyncio(new_peer)
        offer = await bridge.call_asyncio(client.offer)
        # A peer that would not end by itself (never connected) before the test does.
        patient = PeerSettings(negotiation_deadline=10 * DEADLINE)
        async with agent(patient) as (system, port):
            async with link(port) as broker:
                await receive(broker, TowerHello)
                await broker.send_message(codec.encode(OpenPeer("s-1", 1, offer, "echo")))
                await receive(broker, PeerAnswer)
                await broker.send_message(codec.encode(RenewCertificate()))
                with trio.fail_after(DEADLINE):
                    while not system.lookup(f"/{TOWER}/link").snapshot().restarts:
                        await trio.sleep(0.05)
            with trio.fail_after(DEADLINE):
                while peer_actors(system):
                    await trio.sleep(0.05)
        await bridge.call_asyncio(client.close)

    bridge.run(main, handle_signals=False)
