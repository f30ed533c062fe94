"""Session and Negotiation actors as thin shells, on trio's virtual clock.

The tower side is played in memory: each fake tower is a real ``TowerConnection`` over a
socket that records the link messages the broker sends, and the test speaks for the
tower by delivering ``PeerAnswer`` and ``PeerState`` to the connection.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import pytest
import trio
import trio.testing

from actors import (
    Actor, ActorCrashed, ActorRef, ActorSystem, ChildSpec, Restart, SupervisorRef, open_system,
)
from broker.collector import Collector
from broker.config import Settings
from broker.link import (
    AddCandidate,
    ClosePeer,
    OpenPeer,
    PeerAnswer,
    PeerRejected,
    PeerState,
    TowerHello,
    TowerLoadReport,
    codec,
)
from broker.lifecycle import FailureReason
from broker import endpoint
from broker.endpoint import BrokerApi
from broker.metrics import SessionCounters
from broker.sessions import (
    AttachClient,
    ClientCandidate,
    ClientOffer,
    CloseSession,
    Describe,
    DetachClient,
    Failed,
    Negotiation,
    Session,
    session_spec,
    sessions_spec,
)
from broker.signaling import SignalingTokens
from broker.towers import TowerConnection, TowerDirectory

ICE_SERVERS = ({"urls": "stun:stun.example.org:3478"},)
OFFER = "v=0 offer"
ANSWER = "v=0 answer"


class RecordingSocket:
    """The broker's end of a tower link: decodes and keeps every frame sent to the tower."""

    def __init__(self) -> None:
        self.received: list[Any] = []

    async def send_message(self, data: bytes) -> None:
        self.received.append(codec.decode(data))


@dataclass
class FakeTower:
    name: str
    socket: RecordingSocket
    connection: TowerConnection

    def got(self, kind: type, session: str | None = None) -> list[Any]:
        """The messages of type ``kind`` the tower got (about ``session``, if given)."""
        return [
            message
            for message in self.socket.received
            if isinstance(message, kind) and (session is None or message.session == session)
        ]

    def answer(self, session: str, negotiation: int, sdp: str = ANSWER) -> None:
        self.connection.deliver(PeerAnswer(session, negotiation, sdp))

    def peer(self, session: str, negotiation: int, state: str, detail: str = "") -> None:
        self.connection.deliver(PeerState(session, negotiation, state, detail))


@dataclass
class Client:
    """A signaling connection as the session sees it: an outbox, read by the test."""

    session_id: str
    ref: ActorRef
    frames: trio.MemoryReceiveChannel[dict[str, Any]]
    seen: list[dict[str, Any]] = field(default_factory=list)

    async def new_frames(self) -> list[dict[str, Any]]:
        """The frames that arrived since the last call, once the actors are idle."""
        await trio.testing.wait_all_tasks_blocked()
        frames = drain(self.frames)
        self.seen.extend(frames)
        return frames

    async def wait_for_repair(self) -> dict[str, Any]:
        """Read frames until the session asks for a new offer or fails; return that frame."""
        with trio.fail_after(300):
            async for frame in self.frames:
                self.seen.append(frame)
                if frame["type"] == "reoffer" or frame.get("state") == "failed":
                    return frame
        raise AssertionError("the outbox was closed before a reoffer or a failure")

    @property
    def closed(self) -> bool:
        """Whether the session let go of this outbox (closed its send side)."""
        return self.frames.statistics().open_send_channels == 0

    async def tell(self, message: Any) -> None:
        await self.ref.tell(message)
        await trio.testing.wait_all_tasks_blocked()


@dataclass
class Broker:
    system: ActorSystem
    directory: TowerDirectory
    settings: Settings
    counters: SessionCounters
    towers: dict[str, FakeTower]

    async def open_session(
        self, session_id: str = "s-1", tower: str = "tower-1", outbox_size: int = 64,
        application: str = "echo",
    ) -> Client:
        """Start a session as the endpoint does and attach a client to it."""
        session = Session(session_id, "key", application, tower, self.directory,
                          self.settings, self.counters)
        sessions = self.system.lookup("/broker/sessions")
        assert isinstance(sessions, SupervisorRef)
        ref = await sessions.start_child(session_spec(session))
        assert ref.path == f"/broker/sessions/session:{session_id}"
        outbox, frames = trio.open_memory_channel[dict[str, Any]](outbox_size)
        await ref.ask(AttachClient(outbox))
        return Client(session_id, ref, frames)

    def session(self, session_id: str) -> ActorRef | None:
        return self.system.lookup(f"/broker/sessions/session:{session_id}")

    def lose(self, name: str) -> None:
        self.directory.disconnected(self.towers[name].connection)


def short_settings(tmp_path) -> Settings:
    return Settings(
        state_dir=tmp_path,
        negotiation_deadline=10,
        heartbeat_timeout=5,
        negotiation_restarts=2,
        negotiation_restart_period=60,
        placements_per_session=2,
        ice_servers=ICE_SERVERS,
    )


async def _report_load(directory: TowerDirectory, names: list[str]) -> None:
    # The load reports are the towers' heartbeat: without them a tower goes stale.
    while True:
        for name in names:
            directory.report(name, TowerLoadReport(0, 100))
        await trio.sleep(1)


@asynccontextmanager
async def running_broker(tmp_path, shutdown_timeout: float = 10.0) -> AsyncIterator[Broker]:
    """The broker's sessions supervisor, with two fake towers ready in its directory."""
    directory = TowerDirectory(stale_after=3.0)
    towers = {}
    for name in ("tower-1", "tower-2"):
        socket = RecordingSocket()
        connection = TowerConnection(name, socket, TowerHello(name, 100, "test"))
        directory.connected(connection)
        towers[name] = FakeTower(name, socket, connection)
    async with open_system("broker", children=[sessions_spec()],
                           shutdown_timeout=shutdown_timeout) as system:
        broker = Broker(system, directory, short_settings(tmp_path),
                        SessionCounters(Collector()), towers)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_report_load, directory, list(towers))
            for tower in towers.values():
                # As the link does: one writer per connection.
                nursery.start_soon(tower.connection.outbox.write_all)
            yield broker
            nursery.cancel_scope.cancel()


@pytest.fixture
async def broker(tmp_path):
    async with running_broker(tmp_path) as broker:
        yield broker


def state(frame: dict[str, Any]) -> tuple[str, int, str]:
    assert frame["type"] == "state", frame
    return frame["state"], frame["negotiation"], frame["tower"]


async def offer(client: Client, tower: FakeTower, negotiation: int) -> OpenPeer:
    await client.tell(ClientOffer(OFFER))
    opened = tower.got(OpenPeer, client.session_id)[-1]
    assert opened.negotiation == negotiation
    return opened


async def connect(client: Client, tower: FakeTower, negotiation: int) -> None:
    """Offer, answer, connected: negotiation ``negotiation`` comes up on ``tower``."""
    await offer(client, tower, negotiation)
    tower.answer(client.session_id, negotiation)
    tower.peer(client.session_id, negotiation, "connected")
    frames = await client.new_frames()
    assert [frame["type"] for frame in frames] == ["answer", "state"]
    assert state(frames[1]) == ("connected", negotiation, tower.name)


async def fail_current(broker: Broker, client: Client, how: str = "peer") -> int:
    """Make the session's current negotiation fail on its tower; return its number.

    ``how`` is ``"peer"`` (the tower's peer fails after the offer) or ``"deadline"``
    (the offer gets no answer). Returns once the session asked for a new offer or failed.
    """
    described = await client.ref.ask(Describe("key"))
    assert described["state"] == "negotiating", described
    negotiation, tower = described["negotiation"], broker.towers[described["tower"]]
    await offer(client, tower, negotiation)
    if how == "peer":
        tower.peer(client.session_id, negotiation, "failed", "ICE failed")
    await client.wait_for_repair()
    return negotiation


def negotiations_at(tower: FakeTower, session: str = "s-1") -> list[int]:
    return [message.negotiation for message in tower.got(OpenPeer, session)]


async def test_happy_path_relays_offer_and_answer_until_connected(autojump_clock, broker):
    tower = broker.towers["tower-1"]
    client = await broker.open_session()
    assert await client.new_frames() == [
        {"type": "state", "state": "negotiating", "negotiation": 1, "tower": "tower-1",
         "reason": ""},
    ]

    opened = await offer(client, tower, 1)
    assert opened == OpenPeer("s-1", 1, OFFER, "echo", ICE_SERVERS)
    assert await client.new_frames() == []

    tower.answer("s-1", 1)
    assert await client.new_frames() == [{"type": "answer", "negotiation": 1, "sdp": ANSWER}]
    tower.peer("s-1", 1, "connected")
    assert await client.new_frames() == [
        {"type": "state", "state": "connected", "negotiation": 1, "tower": "tower-1",
         "reason": ""},
    ]

    described = await client.ref.ask(Describe("key"))
    assert described["state"] == "connected"
    assert described["placements"] == 1
    assert described["negotiation"] == 1
    assert described["tower"] == "tower-1"


async def test_candidates_must_follow_the_offer(autojump_clock, broker):
    tower = broker.towers["tower-1"]
    client = await broker.open_session()
    await client.new_frames()

    await client.tell(ClientCandidate("candidate:1 1 udp 1 192.0.2.1 9 typ host", "0", 0))
    [error] = await client.new_frames()
    assert error["type"] == "error"
    assert error["code"] == "unexpected_message"
    assert error["fatal"] is False
    assert tower.got(AddCandidate) == []

    await offer(client, tower, 1)
    await client.tell(ClientCandidate("candidate:1 1 udp 1 192.0.2.1 9 typ host", "0", 0))
    await client.tell(ClientCandidate("", None, None))
    assert tower.got(AddCandidate) == [
        AddCandidate("s-1", 1, "candidate:1 1 udp 1 192.0.2.1 9 typ host", "0", 0),
        AddCandidate("s-1", 1, "", None, None),
    ]
    assert await client.new_frames() == []


async def test_a_negotiation_past_its_deadline_is_repaired(autojump_clock, broker):
    tower = broker.towers["tower-1"]
    client = await broker.open_session()
    await client.new_frames()
    await offer(client, tower, 1)
    tower.answer("s-1", 1)
    assert [frame["type"] for frame in await client.new_frames()] == ["answer"]

    await trio.sleep(9.9)
    assert await client.new_frames() == []
    await trio.sleep(1)
    repairing, negotiating, reoffer = await client.new_frames()
    assert state(repairing) == ("repairing", 1, "tower-1")
    assert "deadline" in repairing["reason"]
    assert state(negotiating) == ("negotiating", 2, "tower-1")
    assert reoffer["type"] == "reoffer"
    assert reoffer["negotiation"] == 2
    assert "deadline" in reoffer["reason"]
    assert tower.got(ClosePeer) == [ClosePeer("s-1", 1)]

    tower.answer("s-1", 1, "v=0 late")
    assert await client.new_frames() == []
    await offer(client, tower, 2)
    tower.answer("s-1", 2)
    assert await client.new_frames() == [{"type": "answer", "negotiation": 2, "sdp": ANSWER}]


async def test_restarts_used_up_on_one_tower_move_the_session(autojump_clock, broker):
    first, second = broker.towers["tower-1"], broker.towers["tower-2"]
    client = await broker.open_session()
    for _ in range(3):
        await fail_current(broker, client)
    frames = client.seen
    assert [state(frame) for frame in frames if frame["type"] == "state"] == [
        ("negotiating", 1, "tower-1"),
        ("repairing", 1, "tower-1"),
        ("negotiating", 2, "tower-1"),
        ("repairing", 2, "tower-1"),
        ("negotiating", 3, "tower-1"),
        ("repairing", 3, "tower-1"),
        ("negotiating", 4, "tower-2"),
    ]
    assert frames[-1] == {"type": "reoffer", "negotiation": 4,
                          "reason": "peer_failed: ICE failed"}
    assert negotiations_at(first) == [1, 2, 3]
    assert first.got(ClosePeer) == [ClosePeer("s-1", n) for n in (1, 2, 3)]
    assert second.got(OpenPeer) == []

    await offer(client, second, 4)
    described = await client.ref.ask(Describe("key"))
    assert (described["state"], described["tower"], described["placements"]) == (
        "negotiating", "tower-2", 2
    )


async def test_an_operators_restart_ends_a_session_once(autojump_clock, broker):
    # As the endpoint counts it, and the session gives it back when it ends.
    broker.counters.by_key["key"] += 1
    client = await broker.open_session()
    sessions = broker.system.lookup("/broker/sessions")
    assert isinstance(sessions, SupervisorRef)
    with pytest.raises(ActorCrashed, match="does not start again"):
        await sessions.restart_child("session:s-1")
    await trio.testing.wait_all_tasks_blocked()
    assert broker.session("s-1") is None
    closed = (await client.new_frames())[-1]
    assert (closed["state"], closed["reason"]) == ("closed", "an operator stopped the session")
    assert client.closed
    assert broker.counters.by_key["key"] == 0
    assert broker.counters.live() == 0


async def test_a_broker_shutting_down_says_so_to_its_clients(autojump_clock, tmp_path):
    async with running_broker(tmp_path) as broker:
        client = await broker.open_session()
        await client.new_frames()
    assert [(frame["state"], frame["reason"]) for frame in await client.new_frames()] == [
        ("closed", "the broker is shutting down")
    ]
    assert client.closed


async def test_a_broker_whose_shutdown_overran_says_so_to_its_clients(autojump_clock,
                                                                       tmp_path):
    # No time to stop in order: the sessions are killed, and their clients told why.
    async with running_broker(tmp_path, shutdown_timeout=0) as broker:
        client = await broker.open_session()
        await client.new_frames()
    assert [(frame["state"], frame["reason"]) for frame in await client.new_frames()] == [
        ("closed", "the broker is shutting down")
    ]
    assert client.closed


async def test_a_killed_session_gives_back_what_it_held(autojump_clock, broker):
    # As the endpoint counts it, and the session gives it back when it ends.
    broker.counters.by_key["key"] += 1
    tower = broker.towers["tower-1"]
    client = await broker.open_session()
    await offer(client, tower, 1)
    assert "s-1" in tower.connection._routes
    await client.new_frames()
    broker.session("s-1").kill("killed from the operators' shell")
    await trio.testing.wait_all_tasks_blocked()
    assert broker.session("s-1") is None
    last = broker.counters.last_word("s-1", "key", trio.current_time())
    assert (last["state"], last["reason"]) == ("closed", "an operator stopped the session")
    # Its client is told so, then its socket closes.
    [closed] = await client.new_frames()
    assert (closed["state"], closed["reason"]) == ("closed", "an operator stopped the session")
    assert client.closed
    assert broker.counters.by_key["key"] == 0
    assert broker.counters.live() == 0
    assert "s-1" not in tower.connection._routes
    # The tower closes its peer: the client's connection does not outlive the session.
    assert tower.got(ClosePeer) == [ClosePeer("s-1", 1)]


async def test_a_session_that_fails_to_start_gives_back_its_key_once(
        autojump_clock, broker, monkeypatch):
    async def broken(self):
        raise RuntimeError("no negotiation today")

    monkeypatch.setattr(Negotiation, "started", broken)
    broker.counters.by_key["key"] += 1
    session = Session("s-1", "key", "echo", "tower-1", broker.directory, broker.settings,
                      broker.counters)
    sessions = broker.system.lookup("/broker/sessions")
    assert isinstance(sessions, SupervisorRef)
    with pytest.raises(ActorCrashed):
        await sessions.start_child(session_spec(session))
    assert session.released
    assert broker.counters.by_key["key"] == 0
    assert dict(broker.counters.by_state) == {}


async def test_past_its_placements_a_session_fails(autojump_clock, broker):
    first, second = broker.towers["tower-1"], broker.towers["tower-2"]
    client = await broker.open_session()
    for _ in range(6):
        last = await fail_current(broker, client, "deadline")
    await client.ref.join()
    assert broker.session("s-1") is None

    await client.new_frames()
    failed = client.seen[-1]
    assert state(failed) == ("failed", 6, "tower-2")
    assert failed["reason"] == (
        "the restarts on each tower were used up"
        " (last failure: deadline: not connected within 10 s)"
    )
    assert client.closed
    # Each tower had its first negotiation and the two retries the restart intensity allows.
    assert negotiations_at(first) == [1, 2, 3]
    assert negotiations_at(second) == [4, 5, 6]
    assert second.got(ClosePeer)[-1] == ClosePeer("s-1", last)
    assert broker.counters.failed == 1
    assert broker.counters.live() == 0


def counted_on(broker: Broker) -> dict[str, int]:
    """Each tower's load in placement's eyes: the fake towers report no session."""
    placement = broker.directory.placement
    loads = {name: placement.load_of(name) for name in broker.towers}
    return {name: load.sessions for name, load in loads.items() if load is not None}


async def test_a_session_that_may_get_video_counts_so_until_its_tower_weighs_it(
    autojump_clock, broker
):
    client = await broker.open_session(application="demo")
    await client.new_frames()
    await trio.sleep(1)  # a load report since the session was placed
    load = broker.directory.placement.load_of("tower-1")
    assert (load.sessions, load.taken) == (1, broker.settings.video_weight)
    await connect(client, broker.towers["tower-1"], 1)
    # Answered, it counts until the tower's next report, which would have its peer.
    load = broker.directory.placement.load_of("tower-1")
    assert (load.sessions, load.taken) == (1, broker.settings.video_weight)
    await trio.sleep(1.5)  # past the next report
    load = broker.directory.placement.load_of("tower-1")
    assert (load.sessions, load.taken) == (0, 0)  # the fake tower reports no peer


async def test_a_session_counts_on_its_tower_until_its_offer_is_answered(
    autojump_clock, broker
):
    client = await broker.open_session()
    await client.new_frames()
    await offer(client, broker.towers["tower-1"], 1)
    await trio.sleep(3)  # reports in which the tower has no peer for it: not answered
    assert counted_on(broker) == {"tower-1": 1, "tower-2": 0}
    broker.towers["tower-1"].answer(client.session_id, 1)
    broker.towers["tower-1"].peer(client.session_id, 1, "connected")
    await client.new_frames()
    await trio.sleep(1.5)  # past the next report
    assert counted_on(broker) == {"tower-1": 0, "tower-2": 0}
    # A repair counts from the client's new offer (a client gone without a word never
    # offers: it holds no place while its negotiations wait for it) to its answer.
    broker.towers["tower-1"].peer(client.session_id, 1, "failed", "ICE failed")
    await client.wait_for_repair()
    await trio.sleep(1.5)
    assert counted_on(broker) == {"tower-1": 0, "tower-2": 0}
    await offer(client, broker.towers["tower-1"], 2)
    await trio.sleep(1.5)
    assert counted_on(broker) == {"tower-1": 1, "tower-2": 0}
    broker.towers["tower-1"].answer(client.session_id, 2)
    await client.new_frames()
    await trio.sleep(1.5)
    assert counted_on(broker) == {"tower-1": 0, "tower-2": 0}
    # An offer refused, then sent again corrected: counted again until answered.
    refused = await broker.open_session("s-2", "tower-2")
    await offer(refused, broker.towers["tower-2"], 1)
    broker.towers["tower-2"].connection.deliver(PeerRejected("s-2", 1, "invalid_sdp", "no"))
    await refused.new_frames()
    await offer(refused, broker.towers["tower-2"], 1)
    await trio.sleep(1.5)
    assert counted_on(broker) == {"tower-1": 0, "tower-2": 1}


async def test_a_lost_tower_moves_the_session_at_once(autojump_clock, broker):
    first, second = broker.towers["tower-1"], broker.towers["tower-2"]
    client = await broker.open_session()
    await client.new_frames()
    await trio.sleep(1)  # a load report since the session was placed
    # Before its offer is answered, the session counts on its tower's load; from the
    # tower's next report on, the reports count it (its peer: the fake towers report none).
    assert counted_on(broker) == {"tower-1": 1, "tower-2": 0}
    await connect(client, first, 1)
    await trio.sleep(1.5)  # past the next report
    assert counted_on(broker) == {"tower-1": 0, "tower-2": 0}

    broker.lose("tower-1")
    [repairing] = await client.new_frames()
    assert state(repairing) == ("repairing", 1, "tower-1")
    assert repairing["reason"].startswith("tower_lost")
    await trio.sleep(0.2)  # the restart's backoff (0.1 s), between two load reports
    negotiating, reoffer = await client.new_frames()
    assert state(negotiating) == ("negotiating", 2, "tower-2")
    assert reoffer["type"] == "reoffer"
    assert reoffer["negotiation"] == 2
    # Placed there, it counts on its new tower before it offers, and once only after.
    assert counted_on(broker) == {"tower-2": 1}
    await offer(client, second, 2)
    assert counted_on(broker) == {"tower-2": 1}
    second.answer(client.session_id, 2)
    second.peer(client.session_id, 2, "connected")
    assert [frame["type"] for frame in await client.new_frames()] == ["answer", "state"]
    assert negotiations_at(first) == [1]
    assert negotiations_at(second) == [2]
    assert first.got(ClosePeer) == []
    described = await client.ref.ask(Describe("key"))
    assert (described["state"], described["tower"], described["placements"]) == (
        "connected", "tower-2", 2
    )

    # One that never offers counts until it ends.
    waiting = await broker.open_session("s-2", "tower-2")
    await trio.sleep(1.5)  # past a report, which would have s-1's peer
    assert counted_on(broker) == {"tower-2": 1}  # tower-1 is gone
    await waiting.tell(CloseSession("closed by the client"))
    assert counted_on(broker) == {"tower-2": 0}


def unanswered(broker: Broker) -> dict[str, int]:
    placement = broker.directory.placement
    return {name: placement.unanswered(name) for name in broker.towers}


async def test_an_offer_counts_against_its_tower_until_answered(autojump_clock, broker):
    first, second = broker.towers["tower-1"], broker.towers["tower-2"]
    client = await broker.open_session()
    await client.new_frames()
    # From its making: its first offer is coming (in the POST, or on the socket).
    assert unanswered(broker) == {"tower-1": 1, "tower-2": 0}
    await offer(client, first, 1)
    assert unanswered(broker) == {"tower-1": 1, "tower-2": 0}
    first.answer("s-1", 1)
    await client.new_frames()
    # Answered: what is left of the setup (ICE, DTLS) waits on the client as much.
    assert unanswered(broker) == {"tower-1": 0, "tower-2": 0}
    first.peer("s-1", 1, "connected")
    await client.new_frames()

    # Repaired on the same tower: its new offer counts there until answered.
    first.peer("s-1", 1, "silent", "nothing heard from the client for 5 s")
    await client.new_frames()
    await trio.sleep(0.5)
    await client.new_frames()
    assert unanswered(broker) == {"tower-1": 0, "tower-2": 0}
    await offer(client, first, 2)
    assert unanswered(broker) == {"tower-1": 1, "tower-2": 0}
    # Its tower lost before it answered: moved, and counted where it offers next.
    broker.lose("tower-1")
    await trio.sleep(0.5)
    await client.new_frames()
    assert unanswered(broker) == {"tower-1": 0, "tower-2": 0}
    await offer(client, second, 3)
    assert unanswered(broker) == {"tower-1": 0, "tower-2": 1}
    second.connection.deliver(PeerRejected("s-1", 3, "invalid_sdp", "no"))
    await client.new_frames()
    assert unanswered(broker) == {"tower-1": 0, "tower-2": 0}

    # One that ends before its offer is answered gives it back.
    waiting = await broker.open_session("s-2", "tower-2")
    assert unanswered(broker) == {"tower-1": 0, "tower-2": 1}
    await offer(waiting, second, 1)
    assert unanswered(broker) == {"tower-1": 0, "tower-2": 1}
    await waiting.tell(CloseSession("closed by the client"))
    assert unanswered(broker) == {"tower-1": 0, "tower-2": 0}
    # One whose client never offers gives it back when its negotiation gives up.
    await broker.open_session("s-3", "tower-2")
    assert unanswered(broker) == {"tower-1": 0, "tower-2": 1}
    await trio.sleep(broker.settings.negotiation_deadline + 1)
    assert unanswered(broker) == {"tower-1": 0, "tower-2": 0}


async def test_offers_repaired_onto_a_tower_past_its_window_wait_their_turn(
        autojump_clock, broker):
    first, second = broker.towers["tower-1"], broker.towers["tower-2"]
    second.connection.offers_at_once = 1
    clients = []
    for number in range(3):
        client = await broker.open_session(f"s-{number}")
        await client.new_frames()
        await connect(client, first, 1)
        clients.append(client)
    broker.lose("tower-1")
    await trio.sleep(0.5)
    for client in clients:
        await client.new_frames()
        await client.tell(ClientOffer(OFFER))
    # Each offer goes once the one before it is answered, in the order they came; all
    # three count against the tower meanwhile, so no new session is sent there.
    assert unanswered(broker)["tower-2"] == 3
    for number, client in enumerate(clients):
        assert [opened.session for opened in second.got(OpenPeer)] == [
            f"s-{before}" for before in range(number + 1)]
        second.answer(client.session_id, 2)
        second.peer(client.session_id, 2, "connected")
        answer, connected = await client.new_frames()
        assert answer["type"] == "answer"
        assert state(connected) == ("connected", 2, "tower-2")
    assert unanswered(broker)["tower-2"] == 0
    assert second.connection.waiting_offers() == 0


async def test_a_session_whose_offer_waits_its_turn_closes_at_once(autojump_clock, broker):
    first = broker.towers["tower-1"]
    first.connection.offers_at_once = 1
    sent = await broker.open_session("s-1")
    await offer(sent, first, 1)
    waiting = await broker.open_session("s-2")
    await waiting.tell(ClientOffer(OFFER))
    await waiting.tell(ClientCandidate("candidate:1 1 udp 1 192.0.2.1 9 typ host", "0", 0))
    assert first.got(OpenPeer, "s-2") == [] and first.connection.waiting_offers() == 1
    # Its negotiation is not held up by the wait: stopped at once, not killed after
    # the shutdown deadline, and what the session held is given back.
    closed_at = trio.current_time()
    assert await waiting.ref.ask(CloseSession("closed by the client")) is True
    await trio.testing.wait_all_tasks_blocked()
    assert broker.session("s-2") is None
    assert trio.current_time() == closed_at
    assert first.connection.waiting_offers() == 0
    assert first.got(OpenPeer, "s-2") == [] and first.got(AddCandidate, "s-2") == []
    assert unanswered(broker)["tower-1"] == 1

    # A waiting offer's candidates follow it, in order, once it has its turn.
    third = await broker.open_session("s-3")
    await third.tell(ClientOffer(OFFER))
    for port in (9, 10):
        await third.tell(ClientCandidate(f"candidate:1 1 udp 1 192.0.2.1 {port} typ host",
                                         "0", 0))
    assert first.got(OpenPeer, "s-3") == []
    first.answer("s-1", 1)
    await trio.testing.wait_all_tasks_blocked()
    assert [type(message).__name__ for message in first.socket.received
            if getattr(message, "session", None) == "s-3"] == [
        "OpenPeer", "AddCandidate", "AddCandidate"]
    assert [candidate.candidate.split()[-3] for candidate in first.got(AddCandidate, "s-3")
            ] == ["9", "10"]


async def test_the_wait_for_an_offers_turn_does_not_count_against_its_deadline(
        autojump_clock, broker):
    # A repair waiting behind hundreds of others would fail at its deadline, and queue
    # again at the back: the deadline is the client's and the tower's time.
    first = broker.towers["tower-1"]
    first.connection.offers_at_once = 1
    holder = await broker.open_session("s-1")
    await offer(holder, first, 1)  # never answered: given up at its deadline, at 10 s
    await trio.sleep(5)
    waiting = await broker.open_session("s-2")
    await waiting.new_frames()
    await waiting.tell(ClientOffer(OFFER))
    await trio.sleep(5.5)
    assert first.got(OpenPeer, "s-2")  # sent at 10 s, after waiting 5 s
    await trio.sleep(7)  # 12.5 s after its negotiation started
    assert (await waiting.ref.ask(Describe("key")))["negotiation"] == 1
    await waiting.new_frames()
    await trio.sleep(3)  # 10.5 s since its offer went: its deadline, stopped meanwhile
    repairing = (await waiting.new_frames())[0]
    assert state(repairing)[:2] == ("repairing", 1)
    assert repairing["reason"].startswith("deadline")


async def test_a_full_tower_moves_the_session_at_once(autojump_clock, broker):
    first, second = broker.towers["tower-1"], broker.towers["tower-2"]
    client = await broker.open_session()
    await client.new_frames()
    await offer(client, first, 1)
    # Its reports had not caught up with its sessions yet.
    first.connection.deliver(PeerRejected("s-1", 1, "tower_full", "tower-1 is full (capacity 1)"))
    [repairing] = await client.new_frames()
    assert state(repairing) == ("repairing", 1, "tower-1")
    assert repairing["reason"] == "tower_full: tower-1 is full (capacity 1)"
    await trio.sleep(0.5)
    negotiating, reoffer = await client.new_frames()
    assert state(negotiating) == ("negotiating", 2, "tower-2")
    assert reoffer["type"] == "reoffer"
    await connect(client, second, 2)
    assert negotiations_at(first) == [1]
    assert broker.counters.failures == {FailureReason.TOWER_FULL: 1}


async def test_a_lost_tower_with_no_other_ready_fails_the_session(autojump_clock, broker):
    client = await broker.open_session()
    await client.new_frames()
    await connect(client, broker.towers["tower-1"], 1)

    broker.lose("tower-2")
    broker.lose("tower-1")
    failed = await client.wait_for_repair()
    assert state(failed) == ("failed", 1, "tower-1")
    assert failed["reason"] == (
        "no other tower is ready (last failure: tower_lost: tower-1 went away)"
    )
    await client.ref.join()
    assert broker.session("s-1") is None
    assert client.closed
    assert broker.counters.failed == 1
    assert broker.counters.live() == 0


async def test_a_session_moved_off_a_lost_tower_gets_its_retries_there(autojump_clock, broker):
    first, second = broker.towers["tower-1"], broker.towers["tower-2"]
    client = await broker.open_session()
    await fail_current(broker, client)
    await connect(client, first, 2)
    broker.lose("tower-1")
    await client.wait_for_repair()
    assert state(client.seen[-3]) == ("repairing", 2, "tower-1")
    assert state(client.seen[-2]) == ("negotiating", 3, "tower-2")

    for _ in range(3):
        await fail_current(broker, client)
        if client.seen[-1].get("state") == "failed":
            break
    # The protocol: retried on the same tower up to the restart intensity (2), then the
    # session moves on; the new tower is owed its own retries.
    assert negotiations_at(second) == [3, 4, 5]


async def test_a_silent_peer_is_repaired_with_a_reoffer(autojump_clock, broker):
    tower = broker.towers["tower-1"]
    client = await broker.open_session()
    await client.new_frames()
    await connect(client, tower, 1)
    await trio.sleep(30)
    assert await client.new_frames() == []

    tower.peer("s-1", 1, "silent", "nothing heard from the client for 5 s")
    [repairing] = await client.new_frames()
    assert state(repairing) == ("repairing", 1, "tower-1")
    assert repairing["reason"] == "silent: nothing heard from the client for 5 s"
    await trio.sleep(0.5)
    negotiating, reoffer = await client.new_frames()
    assert state(negotiating) == ("negotiating", 2, "tower-1")
    assert reoffer == {"type": "reoffer", "negotiation": 2,
                       "reason": "silent: nothing heard from the client for 5 s"}
    assert tower.got(ClosePeer) == [ClosePeer("s-1", 1)]
    await connect(client, tower, 2)


async def test_a_second_client_replaces_the_first(autojump_clock, broker):
    tower = broker.towers["tower-1"]
    first = await broker.open_session()
    await first.new_frames()
    await connect(first, tower, 1)

    outbox, frames = trio.open_memory_channel[dict[str, Any]](64)
    await first.ref.ask(AttachClient(outbox))
    second = Client("s-1", first.ref, frames)
    [replaced] = await first.new_frames()
    assert replaced["type"] == "error"
    assert replaced["code"] == "replaced"
    assert replaced["fatal"] is True
    assert first.closed
    assert await second.new_frames() == [
        {"type": "state", "state": "connected", "negotiation": 1, "tower": "tower-1",
         "reason": ""},
    ]
    assert not second.closed

    tower.peer("s-1", 1, "failed")
    assert [state(frame) for frame in await second.new_frames()] == [("repairing", 1, "tower-1")]
    assert await first.new_frames() == []


async def test_closing_a_session_ends_it(autojump_clock, broker):
    tower = broker.towers["tower-1"]
    client = await broker.open_session()
    await client.new_frames()
    await connect(client, tower, 1)
    collector = broker.counters.collector
    assert collector is not None and (collector.alive, collector.closed) == (1, 0)

    await client.tell(CloseSession("closed by the client"))
    assert await client.new_frames() == [
        {"type": "state", "state": "closed", "negotiation": 1, "tower": "tower-1",
         "reason": "closed by the client"},
    ]
    assert client.closed
    assert broker.session("s-1") is None
    assert tower.got(ClosePeer) == [ClosePeer("s-1", 1)]
    assert broker.counters.failed == 0
    assert broker.counters.live() == 0
    # Its end counts towards the next full garbage collection.
    assert (collector.alive, collector.closed) == (0, 1)
    # How it ended is shown to its key for a minute.
    last = broker.counters.last_word("s-1", "key", trio.current_time())
    assert (last["state"], last["reason"]) == ("closed", "closed by the client")
    assert broker.counters.last_word("s-1", "another key", trio.current_time()) is None
    await trio.sleep(60)
    assert broker.counters.last_word("s-1", "key", trio.current_time()) is None


async def test_the_live_sessions_gauge_follows_the_session(autojump_clock, broker):
    tower = broker.towers["tower-1"]

    def by_state() -> dict[str, int]:
        return {key.value: count for key, count in broker.counters.by_state.items() if count}

    client = await broker.open_session()
    await client.new_frames()
    assert by_state() == {"negotiating": 1}
    await connect(client, tower, 1)
    assert by_state() == {"connected": 1}
    tower.peer("s-1", 1, "silent")
    await trio.testing.wait_all_tasks_blocked()
    assert by_state() == {"repairing": 1}
    await trio.sleep(0.5)
    assert by_state() == {"negotiating": 1}
    await client.tell(CloseSession("deleted through the API"))
    assert broker.counters.live() == 0


async def test_a_failing_session_leaves_a_connected_one_alone(autojump_clock, broker):
    tower = broker.towers["tower-1"]
    steady = await broker.open_session("s-steady")
    await steady.new_frames()
    await connect(steady, tower, 1)
    failing = await broker.open_session("s-failing")

    with trio.fail_after(120):
        await failing.ref.join()
    assert broker.session("s-failing") is None
    await failing.new_frames()
    assert state(failing.seen[-1])[0] == "failed"
    assert failing.closed
    assert {frame["negotiation"] for frame in failing.seen} == set(range(1, 7))

    assert await steady.new_frames() == []
    assert [frame["type"] for frame in steady.seen] == ["state", "answer", "state"]
    assert not steady.closed
    described = await steady.ref.ask(Describe("key"))
    assert (described["state"], described["negotiation"], described["placements"]) == (
        "connected", 1, 1
    )
    assert tower.got(ClosePeer, "s-steady") == []
    assert len(tower.got(OpenPeer, "s-steady")) == 1


async def test_a_client_too_slow_to_read_loses_its_outbox(autojump_clock, broker):
    tower = broker.towers["tower-1"]
    client = await broker.open_session(outbox_size=1)
    await offer(client, tower, 1)
    tower.answer("s-1", 1)
    tower.peer("s-1", 1, "connected")
    await trio.testing.wait_all_tasks_blocked()
    assert client.closed
    assert [frame["type"] for frame in await client.new_frames()] == ["state"]

    described = await client.ref.ask(Describe("key"))
    assert described["state"] == "connected"
    assert client.ref.alive
    await client.tell(ClientCandidate("", None, None))
    assert tower.got(AddCandidate) == [AddCandidate("s-1", 1, "", None, None)]
    # Connected, the client has its answer: the next connection gets the state alone.
    outbox, frames = trio.open_memory_channel[dict[str, Any]](8)
    await client.ref.ask(AttachClient(outbox))
    assert [frame["type"] for frame in drain(frames)] == ["state"]


async def test_an_attach_whose_connection_stopped_waiting_replaces_nobody(
    autojump_clock, broker
):
    # The endpoint gave up on a busy session's attach and closed its end: when the
    # session comes to it, the client attached meanwhile stays, and no answer is lost.
    tower = broker.towers["tower-1"]
    client = await broker.open_session()
    await client.new_frames()
    await offer(client, tower, 1)
    given_up, its_frames = trio.open_memory_channel[dict[str, Any]](64)
    its_frames.close()
    assert await client.ref.ask(AttachClient(given_up)) is None
    tower.answer(client.session_id, 1)
    [answer] = await client.new_frames()
    assert answer["type"] == "answer" and not client.closed


async def test_an_answer_nobody_was_there_to_take_comes_with_the_next_attach(
    autojump_clock, broker
):
    tower = broker.towers["tower-1"]
    client = await broker.open_session()
    gone, _ = trio.open_memory_channel(64)
    await client.ref.ask(AttachClient(gone))
    await client.tell(DetachClient(gone))
    await offer(client, tower, 1)
    tower.answer(client.session_id, 1)
    await trio.testing.wait_all_tasks_blocked()
    outbox, frames = trio.open_memory_channel(64)
    await client.ref.ask(AttachClient(outbox))
    await trio.testing.wait_all_tasks_blocked()
    first, second = frames.receive_nowait(), frames.receive_nowait()
    assert first["type"] == "state" and second["type"] == "answer"
    assert second["negotiation"] == 1


async def test_an_answer_is_sent_again_to_each_connection_while_its_negotiation_lasts(
    autojump_clock, broker
):
    # An answer queued for a connection that then ended, unwritten or unread: the client
    # offered, and would have waited out the negotiation's deadline for it.
    tower = broker.towers["tower-1"]
    client = await broker.open_session()
    first, first_frames = trio.open_memory_channel(64)
    await client.ref.ask(AttachClient(first))
    await offer(client, tower, 1)
    tower.answer(client.session_id, 1)
    await trio.testing.wait_all_tasks_blocked()
    assert [frame["type"] for frame in drain(first_frames)] == ["state", "answer"]
    first_frames.close()  # the connection ended

    async def attach() -> list[dict[str, Any]]:
        outbox, frames = trio.open_memory_channel(64)
        await client.ref.ask(AttachClient(outbox))
        await trio.testing.wait_all_tasks_blocked()
        return drain(frames)

    again = await attach()
    assert [(frame["type"], frame["negotiation"]) for frame in again] == [
        ("state", 1), ("answer", 1)]
    # Connected, a connection gets the state alone.
    tower.peer(client.session_id, 1, "connected")
    await trio.testing.wait_all_tasks_blocked()
    assert [frame["type"] for frame in await attach()] == ["state"]


def drain(frames: trio.MemoryReceiveChannel[dict[str, Any]]) -> list[dict[str, Any]]:
    """The frames waiting in ``frames``, taken."""
    taken = []
    while True:
        try:
            taken.append(frames.receive_nowait())
        except (trio.WouldBlock, trio.EndOfChannel):
            return taken


# A negotiation's failure, counted and told once.


async def test_the_last_failure_is_told_even_when_its_end_overtakes_its_message(
        autojump_clock, broker):
    # The negotiation's end is a system message: it jumps the client's candidates queued
    # before its Failed, and the session escalates before it has heard of the failure.
    client = await broker.open_session()
    for _ in range(5):
        await fail_current(broker, client, "deadline")
    tower = broker.towers["tower-2"]
    await offer(client, tower, 6)
    before = sum(broker.counters.failures.values())
    tower.peer("s-1", 6, "failed", "ICE failed")
    for number in range(20):
        client.ref.tell_nowait(
            ClientCandidate(f"candidate:{number} 1 udp 1 192.0.2.1 9 typ host", "0", 0))
    await client.ref.join()
    await client.new_frames()
    states = [(f["state"], f["negotiation"]) for f in client.seen if f["type"] == "state"]
    assert states[-2:] == [("repairing", 6), ("failed", 6)]
    assert "peer_failed: ICE failed" in client.seen[-1]["reason"]
    assert sum(broker.counters.failures.values()) - before == 1


async def test_a_negotiation_failing_twice_over_counts_once(autojump_clock, broker, caplog):
    # Its tower goes away as a candidate is forwarded to it: the send and the watch on
    # the tower both fail it.
    tower = broker.towers["tower-1"]
    clients = []
    for number in range(20):
        client = await broker.open_session(f"s-{number}")
        await client.new_frames()
        await offer(client, tower, 1)
        clients.append(client)
    for client in clients:
        client.ref.tell_nowait(ClientCandidate("candidate:1 1 udp 1 192.0.2.1 9 typ host", "0", 0))
    broker.lose("tower-1")
    await trio.sleep(1)
    assert broker.counters.failures == {FailureReason.TOWER_LOST: 20}
    # Nor is the second way of noticing it logged, with its traceback, as an error.
    assert "raised after its end was decided" not in caplog.text


class BusySession(Actor):
    """A session that takes one message at a time, each when let through."""

    mailbox_capacity = 1

    def __init__(self) -> None:
        self.got: list[Any] = []
        self.let_through = trio.Event()

    async def receive(self, message: Any) -> None:
        await self.let_through.wait()
        self.got.append(message)


async def negotiation_telling_a_busy_session(broker: Broker) -> tuple[BusySession, ActorRef]:
    """A negotiation on tower-1 whose session's mailbox is full, past its deadline: it
    waits to tell the session it failed."""
    busy = BusySession()
    session = await broker.system.spawn(ChildSpec("busy", lambda: busy))
    await session.tell("filling its one message in hand")
    await session.tell("and its mailbox")
    tower = broker.towers["tower-1"]
    negotiation = await broker.system.spawn(ChildSpec("negotiation", lambda: Negotiation(
        session, "s-1", 1, "echo", tower.connection, broker.settings), Restart.TEMPORARY))
    await trio.sleep(broker.settings.negotiation_deadline + 1)
    return busy, negotiation


@pytest.mark.parametrize("meanwhile", ["tower lost", "peer connected"])
async def test_a_negotiation_past_its_deadline_fails_once_whatever_comes_meanwhile(
        autojump_clock, broker, caplog, meanwhile):
    # Its deadline passes while its session is too busy to hear of it, and then:
    # - its tower goes: both failures waited to tell the session, and the second, once
    #   through, was logged with its traceback as an error raised after the end
    #   (hundreds at a time on an overloaded broker);
    # - its peer connects: that cancelled the wait, and the negotiation, marked failed
    #   but never failing, let a later tower loss pass unheard (a session "connected" on
    #   a tower that was gone).
    busy, negotiation = await negotiation_telling_a_busy_session(broker)
    if meanwhile == "tower lost":
        broker.lose("tower-1")
    else:
        broker.towers["tower-1"].peer("s-1", 1, "connected")
    await trio.sleep(1)
    busy.let_through.set()
    await trio.sleep(1)
    assert not negotiation.alive
    assert [message.reason for message in busy.got if isinstance(message, Failed)] == [
        FailureReason.DEADLINE]
    assert "raised after its end was decided" not in caplog.text


# The POST with an offer (BrokerApi._create and _answer over these sessions).


def api_for(broker: Broker) -> BrokerApi:
    return BrokerApi(broker.settings, ("key",), SignalingTokens(bytes(32), lifetime=60.0),
                     broker.directory, broker.system, broker.counters)


async def test_a_post_whose_session_fails_before_its_answer_is_answered_at_once(
        autojump_clock, broker, monkeypatch):
    # It waited the whole negotiation deadline, then said 201 "negotiating" for a session
    # that had ended.
    monkeypatch.setattr(endpoint, "check_offer_sdp", lambda sdp: None)
    api = api_for(broker)
    await trio.testing.wait_all_tasks_blocked()  # the towers' first load reports
    broker.lose("tower-2")
    tower = broker.towers["tower-1"]
    outcome: dict[str, Any] = {}

    async def post() -> None:
        started = trio.current_time()
        with pytest.raises(endpoint.ApiError) as refused:
            await api._create("key", {"offer": OFFER})
        outcome["error"], outcome["took"] = refused.value, trio.current_time() - started

    async with trio.open_nursery() as nursery:
        nursery.start_soon(post)
        await trio.testing.wait_all_tasks_blocked()
        [opened] = tower.got(OpenPeer)
        tower.connection.deliver(PeerRejected(opened.session, 1, "tower_full", "full"))
    error = outcome["error"]
    assert (error.status, error.code) == (503, "no_tower")
    assert "tower_full: full" in error.message and "ended as it started" in error.message
    assert outcome["took"] < 1
    await trio.testing.wait_all_tasks_blocked()
    assert broker.counters.by_key["key"] == 0


async def test_a_post_whose_tower_was_full_names_the_tower_it_moved_to(
        autojump_clock, broker, monkeypatch):
    monkeypatch.setattr(endpoint, "check_offer_sdp", lambda sdp: None)
    api = api_for(broker)
    await trio.testing.wait_all_tasks_blocked()  # the towers' first load reports
    outcome: dict[str, Any] = {}

    async def post() -> None:
        outcome["created"] = await api._create("key", {"offer": OFFER})

    async with trio.open_nursery() as nursery:
        nursery.start_soon(post)
        await trio.testing.wait_all_tasks_blocked()
        [full] = [tower for tower in broker.towers.values() if tower.got(OpenPeer)]
        [opened] = full.got(OpenPeer)
        full.connection.deliver(PeerRejected(opened.session, 1, "tower_full", "full"))
    [other] = [name for name in broker.towers if name != full.name]
    created = outcome["created"]
    assert (created["tower"], created["state"], created["answer"]) == (
        other, "negotiating", None)


async def test_a_post_with_nowhere_to_go_from_its_start_is_refused(
        autojump_clock, broker, monkeypatch):
    # A session whose tower was gone before it started, with no other ready, was
    # returned 201 "failed" with a token.
    api = api_for(broker)
    await trio.testing.wait_all_tasks_blocked()
    choose = broker.directory.choose

    def choose_then_lose_every_tower(*args: Any, **kwargs: Any) -> Any:
        chosen = choose(*args, **kwargs)
        for name in broker.towers:
            broker.lose(name)
        return chosen

    monkeypatch.setattr(broker.directory, "choose", choose_then_lose_every_tower)
    with pytest.raises(endpoint.ApiError) as refused:
        await api._create("key", {})
    assert (refused.value.status, refused.value.code) == (503, "no_tower")
    assert "ended as it started" in refused.value.message
    await trio.testing.wait_all_tasks_blocked()
    assert broker.counters.by_key["key"] == 0


async def test_a_post_past_the_offers_the_towers_may_answer_at_once_is_refused_busy(
        autojump_clock, broker, monkeypatch):
    # A burst of arrivals past what the towers can answer had every setup queue behind
    # the others (and time out), and slowed the sessions already up on those towers.
    monkeypatch.setattr(endpoint, "check_offer_sdp", lambda sdp: None)
    broker.settings = dataclasses.replace(broker.settings, max_unanswered_offers=2)
    api = api_for(broker)
    await trio.testing.wait_all_tasks_blocked()  # the towers' first load reports
    created: list[dict[str, Any]] = []

    async def post() -> None:
        created.append(await api._create("key", {"offer": OFFER}))

    async with trio.open_nursery() as nursery:
        for _ in range(4):
            nursery.start_soon(post)
        await trio.testing.wait_all_tasks_blocked()
        assert unanswered(broker) == {"tower-1": 2, "tower-2": 2}
        for body in ({"offer": OFFER}, {}):
            with pytest.raises(endpoint.ApiError) as refused:
                await api._create("key", body)
            error = refused.value
            assert (error.status, error.code, error.headers) == (
                503, "towers_busy", {"retry-after": "1"})
        assert broker.counters.by_key["key"] == 4  # nothing left behind
        assert broker.counters.refused == {"towers_busy": 2}

        # One answered: its tower takes the next.
        first = broker.towers["tower-1"]
        answered = first.got(OpenPeer)[0]
        first.answer(answered.session, 1)
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(post)
        await trio.testing.wait_all_tasks_blocked()
        assert len(first.got(OpenPeer)) == 3
        assert unanswered(broker) == {"tower-1": 2, "tower-2": 2}
    # The rest got no answer within the deadline: given up on (the negotiations failed,
    # at the same moment), and no longer counted.
    await trio.sleep(1)
    assert unanswered(broker) == {"tower-1": 0, "tower-2": 0}
    assert [session["answer"] is not None for session in created].count(True) == 1

    # With no room anywhere, it is no_tower, as before.
    broker.lose("tower-1")
    broker.lose("tower-2")
    with pytest.raises(endpoint.ApiError) as refused:
        await api._create("key", {})
    assert (refused.value.status, refused.value.code) == (503, "no_tower")
    assert broker.counters.refused == {"towers_busy": 2, "no_tower": 1}


async def test_a_post_from_a_key_at_its_limit_is_refused_before_its_offer_is_parsed(
        autojump_clock, broker, monkeypatch):
    def parse(sdp: str) -> None:
        raise AssertionError("the offer was parsed")

    monkeypatch.setattr(endpoint, "check_offer_sdp", parse)
    api = api_for(broker)
    broker.counters.by_key["key"] = broker.settings.max_sessions_per_key
    with pytest.raises(endpoint.ApiError) as refused:
        await api._create("key", {"offer": "v=0 and 16 KiB more"})
    assert (refused.value.status, refused.value.code) == (429, "too_many_sessions")


async def test_a_post_as_the_broker_stops_is_refused_at_once(autojump_clock, broker, monkeypatch):
    # The endpoint stops after the sessions: a session asked for meanwhile waited on a
    # supervisor busy stopping its children, then failed with a 500.
    api = api_for(broker)
    await trio.testing.wait_all_tasks_blocked()  # the towers' first load reports
    monkeypatch.setattr(type(broker.system), "shutting_down", property(lambda system: True))
    monkeypatch.setattr(endpoint, "check_offer_sdp", lambda sdp: None)
    with pytest.raises(endpoint.ApiError) as refused:
        await api._create("key", {"offer": OFFER})
    assert (refused.value.status, refused.value.code) == (503, "no_tower")
    assert broker.counters.by_key["key"] == 0
    assert unanswered(broker) == {"tower-1": 0, "tower-2": 0}


async def test_the_token_of_a_post_with_an_offer_lives_its_whole_lifetime_from_the_answer(
        autojump_clock, broker, monkeypatch):
    # It was issued before the wait for the tower's answer, which may take the
    # negotiation's deadline: a client had that much less of token_expires_in.
    monkeypatch.setattr(endpoint, "check_offer_sdp", lambda sdp: None)
    api = api_for(broker)
    await trio.testing.wait_all_tasks_blocked()  # the towers' first load reports
    created: dict[str, Any] = {}

    async def post() -> None:
        created.update(await api._create("key", {"offer": OFFER}))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(post)
        await trio.testing.wait_all_tasks_blocked()
        [tower] = [tower for tower in broker.towers.values() if tower.got(OpenPeer)]
        [opened] = tower.got(OpenPeer)
        await trio.sleep(8)  # a slow tower
        tower.connection.deliver(PeerAnswer(opened.session, 1, "v=0 answer"))
    assert created["answer"] == "v=0 answer"
    last_moment = trio.current_time() + created["token_expires_in"] - 0.001
    api.tokens.check(created["token"], created["id"], last_moment)


async def test_a_post_offer_reaching_a_session_under_repair_is_left_to_the_socket(
        mock_clock, broker, monkeypatch):
    # Its tower was lost between the session's start and the offer: the session moves
    # on, and the client offers on the socket when asked; it used to be closed with 400.
    monkeypatch.setattr(endpoint, "check_offer_sdp", lambda sdp: None)
    api = api_for(broker)
    await trio.testing.wait_all_tasks_blocked()  # the towers' first load reports
    created = await api._create("key", {})
    broker.lose(created["tower"])
    await trio.testing.wait_all_tasks_blocked()
    described = await broker.session(created["id"]).ask(Describe("key"))
    assert described["state"] == "repairing"
    assert await api._answer(created["id"], OFFER) is None
    mock_clock.jump(1)  # past the repair's backoff
    await trio.testing.wait_all_tasks_blocked()
    described = await broker.session(created["id"]).ask(Describe("key"))
    assert described["state"] == "negotiating"
    assert described["tower"] not in (created["tower"], None)
