"""One session's peer on a tower: an actor owning the aiortc peer connection.

The peer connection itself, the session application and the heartbeat live on the
asyncio side (``application``). This actor's first message is the broker's offer
(``OpenPeer``); it answers it through the bridge, hears the peer connection's
events (connected, failed, closed, silent) through its mailbox, and reports to the
broker. A peer serves one negotiation: a new negotiation of the same session gets a
fresh peer. Whatever way the actor ends, even killed, its peer connection is closed.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import trio

from actors import Actor, ActorRef
from actors.bridge import call_asyncio, post_to

from ..config import Settings, check_seconds
from ..link import (
    MAX_CANDIDATES,
    AddCandidate,
    OpenPeer,
    PeerAnswer,
    PeerRejected,
    PeerState,
)
from .application import APPLICATIONS, PeerEvent, TowerPeer, answer_offer

Send = Callable[[object], Awaitable[None]]
# How long a peer that ends waits for its connection to close; the rest of the close
# goes on, on the asyncio loop (releasing a TURN allocation waits for the TURN server).
CLOSE_WAIT = 2.0

@dataclass(frozen=True)
class PeerSettings:
    heartbeat_interval: float = Settings.heartbeat_interval
    heartbeat_timeout: float = Settings.heartbeat_timeout
    tower: str = ""
    # The broker gives up on a negotiation this long after it began, before its answer:
    # a peer not connected this long after its answer is one the broker gave up on.
    negotiation_deadline: float = Settings.negotiation_deadline

    def __post_init__(self) -> None:
        for name in ("heartbeat_interval", "heartbeat_timeout", "negotiation_deadline"):
            check_seconds(name, getattr(self, name))
        if self.heartbeat_timeout <= self.heartbeat_interval:
            raise ValueError("heartbeat_timeout must be longer than heartbeat_interval")


class Peer(Actor):
    """The tower's end of one negotiation of one session."""

    runs_tasks = True

    def __init__(
        self, session: str, negotiation: int, send: Send, settings: PeerSettings,
        server: ActorRef | None = None,
    ) -> None:
        self.session = session
        self.negotiation = negotiation
        # The agent's link server, told once answered whether this peer sends video.
        self.server = server
        # The OpenPeer, from the first message until it is answered: a session lasts
        # for hours, its offer need not.
        self.request: OpenPeer | None = None
        self.opened = False
        self.send = send
        self.settings = settings
        self.tower_peer: TowerPeer | None = None
        # Candidates that came before the answer went out, until they have been added:
        # None from then on. Kept in order: one after the end-of-candidates is ignored.
        self.early_candidates: list[AddCandidate] | None = []
        self.candidates = 0
        self.connected = False
        self.ended = False

    async def _live(self) -> None:
        self.tower_peer = await self._answer()
        if self.tower_peer is None:
            return
        try:
            if self.server is not None:
                await self.server.tell(Answered(self.ref, self.tower_peer.sends_video))
            await self.send(PeerAnswer(self.session, self.negotiation, self.tower_peer.answer_sdp))
            # Those that arrive meanwhile join the queue, behind the earlier ones.
            while self.early_candidates:
                await self._add_candidate(self.early_candidates.pop(0))
            self.early_candidates = None
            # Its close from the broker may never come (a link congested past a send's
            # deadline): the peer and its ports must not wait for it for ever.
            await trio.sleep(self.settings.negotiation_deadline)
            await self.ref.tell(_Deadline())
            await trio.sleep_forever()
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(CLOSE_WAIT):
                await call_asyncio(self.tower_peer.close)

    async def _answer(self) -> TowerPeer | None:
        """The running peer for the offer, or None once the offer has been refused."""
        request, self.request = self.request, None
        assert request is not None
        factory = APPLICATIONS.get(request.application)
        if factory is None:
            await self._reject("unknown_application", f"no application {request.application!r}")
            return None
        answer = functools.partial(
            answer_offer,
            request.offer,
            ice_servers=request.ice_servers,
            application=factory(session=self.session, tower=self.settings.tower),
            on_event=post_to(self.ref),
            heartbeat_interval=self.settings.heartbeat_interval,
            heartbeat_timeout=self.settings.heartbeat_timeout,
        )
        try:
            return await call_asyncio(answer)
        except ValueError as error:
            await self._reject("invalid_sdp", str(error))
            return None

    async def receive(self, message: object) -> None:
        if isinstance(message, OpenPeer) and not self.opened:
            self.opened = True
            self.request = message
            self.start_soon(self._live)
        elif isinstance(message, PeerEvent):
            await self._event(message)
        elif isinstance(message, AddCandidate):
            self.candidates += 1
            if self.candidates > MAX_CANDIDATES:
                await self.send(PeerRejected(
                    self.session, self.negotiation, "invalid_message",
                    f"more than {MAX_CANDIDATES} candidates for one offer"))
            elif self.early_candidates is not None:
                self.early_candidates.append(message)
            else:
                await self._add_candidate(message)
        elif isinstance(message, _Deadline):
            if not self.connected:
                deadline = self.settings.negotiation_deadline
                await self._event(
                    PeerEvent("failed", f"not connected {deadline:g} s after its answer"))
        elif isinstance(message, (Close, _End)):
            self.stop()
        else:
            raise TypeError(f"a peer does not handle {type(message).__name__}")

    async def _event(self, event: PeerEvent) -> None:
        if self.ended:
            return
        await self.send(PeerState(self.session, self.negotiation, event.kind, event.detail))
        if event.kind == "connected":
            self.connected = True
        else:
            self.ended = True
            self.stop()

    async def _add_candidate(self, message: AddCandidate) -> None:
        assert self.tower_peer is not None
        add = functools.partial(
            self.tower_peer.add_candidate,
            message.candidate,
            message.sdp_mid,
            message.sdp_mline_index,
        )
        try:
            await call_asyncio(add)
        except ValueError as error:
            await self.send(
                PeerRejected(self.session, self.negotiation, "invalid_message", str(error))
            )

    async def _reject(self, code: str, message: str) -> None:
        await self.send(PeerRejected(self.session, self.negotiation, code, message))
        self.ended = True
        await self.ref.tell(_End())


@dataclass(frozen=True)
class Answered:
    """Told by a peer to its link server once it has answered: whether it sends the
    client video (a session with video weighs more on the tower)."""

    peer: ActorRef
    sends_video: bool


class Close:
    """Told by its server: the broker closed this peer, or gave it up."""


class _End:
    """Sent by the peer to itself: its task is done with it."""


class _Deadline:
    """Sent by the peer to itself: the negotiation deadline has passed since its answer."""
