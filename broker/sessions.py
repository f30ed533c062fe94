"""Sessions as actors: a session supervises one negotiation at a time, and repairs it.

Theory of operation: ``session:<id>`` is a supervisor with one transient child,
``negotiation``. The session owns the lifecycle (``SessionLifecycle``), the client's
signaling connection and the tower it is placed on; a negotiation owns one attempt at
connecting the client to that tower: it sends the client's offer and candidates to the
tower, relays the answer, and fails (crashes) when its deadline passes before the peer
connects, when the tower reports the peer failed or silent, or when the tower's link
goes away. The session's supervision restarts it, with backoff, as a new negotiation
(the client is asked to re-offer). When the restarts on one tower are used up
(``escalate``) or the tower is gone, the session moves to another tower; when it has
used its placements, it fails and tells the client why.

Messages from the tower are routed by session id straight to the current negotiation;
it tells its session what the client must hear.
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass, field
from typing import Any

import trio

from actors import (
    Actor,
    ActorRef,
    Backoff,
    ChildSpec,
    Exit,
    ExitKind,
    Restart,
    Supervisor,
    SupervisorFlags,
)

from .config import Settings
from .lifecycle import (
    FailureReason,
    ForwardCandidate,
    ForwardOffer,
    SendToClient,
    SessionLifecycle,
    SessionState,
    error_frame,
)
from .link import (
    OFFER_REFUSALS,
    TOWER_FULL,
    AddCandidate,
    ClosePeer,
    OpenPeer,
    PeerAnswer,
    PeerRejected,
    PeerState,
    session_weight,
)
from .metrics import SessionCounters
from .towers import TowerConnection, TowerDirectory, TowerGone

CLIENT_OUTBOX_SIZE = 64


def new_session_id() -> str:
    return "s-" + secrets.token_hex(8)


class NegotiationFailed(Exception):
    """A negotiation ended without (or after losing) a connected peer."""

    def __init__(self, reason: FailureReason, detail: str) -> None:
        super().__init__(f"{reason.value}: {detail}" if detail else reason.value)
        self.reason = reason
        self.detail = detail


# What the endpoint tells a session.


@dataclass(frozen=True)
class AttachClient:
    """A signaling connection for this session; frames for it go into ``outbox``."""

    outbox: trio.MemorySendChannel[dict[str, Any]]


@dataclass(frozen=True)
class DetachClient:
    outbox: trio.MemorySendChannel[dict[str, Any]]


@dataclass(frozen=True)
class ClientOffer:
    """The client's offer. With ``reply``, the answer (or an error frame) goes there, for
    the HTTP request that carried the offer, instead of onto the signaling socket."""

    sdp: str
    reply: trio.MemorySendChannel[dict[str, Any]] | None = None
    negotiation: int | None = None  # the one it was made for, when the client says


@dataclass(frozen=True)
class ClientCandidate:
    candidate: str
    sdp_mid: str | None
    sdp_mline_index: int | None
    negotiation: int | None = None  # the offer's, when the client says


@dataclass(frozen=True)
class CloseSession:
    """Ends the session; with ``api_key``, only if it is the session's (replies a bool)."""

    why: str
    # Out of repr: operators trace messages, and a read-only one must not see keys.
    api_key: str | None = field(default=None, repr=False)


@dataclass(frozen=True)
class Describe:
    """Asks a session for what ``GET /v1/sessions/{id}`` shows, or None if the session
    is not ``api_key``'s (None: the operators', who see every session)."""

    api_key: str | None = field(repr=False)


# What a negotiation tells its session.


@dataclass(frozen=True)
class Answered:
    number: int
    sdp: str


@dataclass(frozen=True)
class Rejected:
    number: int
    code: str
    message: str


@dataclass(frozen=True)
class Connected:
    number: int


@dataclass(frozen=True)
class Failed:
    number: int
    reason: FailureReason
    detail: str


class Session(Supervisor):
    """One browser session: its lifecycle, its client, and its current negotiation."""

    def __init__(
        self,
        session_id: str,
        api_key: str,
        application: str,
        tower: str,
        towers: TowerDirectory,
        settings: Settings,
        counters: SessionCounters,
    ) -> None:
        flags = SupervisorFlags(
            intensity=settings.negotiation_restarts,
            period=settings.negotiation_restart_period,
            backoff=Backoff(initial=0.1, maximum=2.0, reset_after=settings.heartbeat_timeout),
        )
        super().__init__([ChildSpec("negotiation", self._negotiation, Restart.TRANSIENT)], flags)
        self.session_id = session_id
        self.api_key = api_key
        self.application = application
        # What it takes of a tower's capacity until its tower has weighed it.
        self.weight = session_weight(application, settings.video_weight,
                                     settings.tower_capacity)
        self.towers = towers
        self.settings = settings
        self.counters = counters
        self.lifecycle = SessionLifecycle(tower, settings.placements_per_session)
        self.created_at = trio.current_time()
        self.client: trio.MemorySendChannel[dict[str, Any]] | None = None
        self.negotiations = 0
        self.negotiation: ActorRef | None = None
        self.counted_state = self.lifecycle.state
        self.counting = False
        # The tower whose load counts this session (``Placement.assign``): from its start
        # (or from each offer, once it has offered) until the tower answers the offer,
        # refuses it or the negotiation ends; then the tower's reports count it. (Counted
        # from each repair's start, a client gone without a word would hold its place
        # through every restart on every tower it is moved to.)
        self.counted_on: str | None = None
        # The tower that placement last chose for it, and the time of the report it was
        # placed under, until it counts there as assigned.
        self.placed: tuple[str, float | None] | None = (
            tower, towers.placement.reported_at(tower))
        self.offered = False
        # The tower its offer waits on for an answer (``Placement.offer_sent``); from its
        # making, as the endpoint placed it with its first offer coming (in the request,
        # or on the socket), until that offer is answered or given up.
        self.offer_on: str | None = None
        self._offer_on(tower)
        # Whether it gave back its API key's count (see ``release``).
        self.released = False
        self.answer_reply: tuple[int, trio.MemorySendChannel[dict[str, Any]]] | None = None
        # The last negotiation whose failure was taken (``_negotiation_failed``).
        self.last_failed = 0
        # The answer last sent towards a signaling socket, while its negotiation lasts.
        self.answer: dict[str, Any] | None = None

    def _negotiation(self) -> Negotiation:
        # The start function of the child: the session's own code, run when its
        # supervision starts a negotiation, so the tower is settled before it runs.
        self.negotiations += 1
        tower = self._begin(self.negotiations)
        if self.counting:
            self._count_state()
        return Negotiation(self.ref, self.session_id, self.negotiations, self.application,
                           tower, self.settings)

    @property
    def state(self) -> SessionState:
        return self.lifecycle.state

    async def started(self) -> None:
        self.negotiation = self.system.lookup(f"{self.path}/negotiation")
        self.counters.session_started(self.counted_state)
        self.counting = True
        self._count_state()

    async def receive(self, message: Any) -> Any:
        try:
            return await self._handle(message)
        finally:
            self._count_state()

    def _count_state(self) -> None:
        # The live-sessions gauge follows the lifecycle: counted at each change.
        state = self.lifecycle.state
        if state is not self.counted_state:
            self.counters.moved(self.counted_state, state)
            self.counted_state = state

    async def _handle(self, message: Any) -> Any:
        lifecycle = self.lifecycle
        if isinstance(message, ClientOffer):
            decisions = lifecycle.offer(message.sdp, message.negotiation)
            if isinstance(decisions[0], ForwardOffer):
                # Also an offer sent again, corrected, after its tower refused the last.
                self.offered = True
                self._offer_on(lifecycle.tower)
                self._count_on(lifecycle.tower)
            if message.reply is not None:
                if isinstance(decisions[0], ForwardOffer):
                    self.answer_reply = (lifecycle.negotiation, message.reply)
                else:
                    _send(message.reply, decisions.pop(0).frame)
                    message.reply.close()
            return await self._carry_out(decisions)
        if isinstance(message, ClientCandidate):
            return await self._carry_out(lifecycle.candidate(
                message.candidate, message.sdp_mid, message.sdp_mline_index, message.negotiation
            ))
        if isinstance(message, Answered):
            self._settled(message.number, answered=True)
            return await self._carry_out(lifecycle.answer(message.number, message.sdp))
        if isinstance(message, Rejected):
            if message.code in OFFER_REFUSALS:  # not a candidate's
                self._settled(message.number)
            return await self._carry_out(
                lifecycle.offer_rejected(message.number, message.code, message.message)
            )
        if isinstance(message, Connected):
            return await self._carry_out(lifecycle.connected(message.number))
        if isinstance(message, Failed):
            return await self._negotiation_failed(message.number, message.reason,
                                                  message.detail)
        if isinstance(message, AttachClient):
            return self._attach(message.outbox)
        if isinstance(message, DetachClient):
            if self.client is message.outbox:
                self.client = None
            return None
        if isinstance(message, CloseSession):
            if message.api_key is not None and message.api_key != self.api_key:
                return False
            await self._carry_out(lifecycle.close(message.why))
            self._end()
            return True
        if isinstance(message, Describe):
            mine = message.api_key is None or message.api_key == self.api_key
            return self.describe() if mine else None
        raise TypeError(f"a session does not handle {type(message).__name__}")

    async def _negotiation_failed(self, number: int, reason: FailureReason,
                                  detail: str) -> None:
        """Negotiation ``number`` failed: counted and told once, however many times it
        says so (its tower lost while a send was under way, say) and in whichever order
        its ``Failed`` and its end reach the session (see ``escalate``)."""
        if number <= self.last_failed:
            return
        self.last_failed = number
        self._settled(number)
        self.counters.negotiation_failed(reason)
        await self._carry_out(self.lifecycle.negotiation_failed(number, reason, detail))

    def _begin(self, number: int) -> TowerConnection | None:
        lifecycle = self.lifecycle
        if lifecycle.state.ended:
            return None
        tower = self.towers.get(lifecycle.tower)
        if tower is None or lifecycle.move_requested:
            tower = self._move()
            if tower is None:
                return None
        if not self.offered:
            self._count_on(tower.name)
        decisions = lifecycle.negotiation_started(number)
        self.counters.negotiation_started()
        self._send_all(decisions)
        return tower

    def _count_on(self, tower: str | None) -> None:
        """Count this session on ``tower``'s load (None: on no tower's), not the last's."""
        if tower == self.counted_on:
            return
        placement = self.towers.placement
        if self.counted_on is not None:
            placement.unassign(self.counted_on, self.weight)
        if tower is not None:
            placed, under = self.placed or (None, None)
            placement.assign(tower, self.weight, placed_under=under if placed == tower else None)
            if placed == tower:
                self.placed = None
        self.counted_on = tower

    def _offer_on(self, tower: str | None) -> None:
        """Count this session's offer as unanswered on ``tower`` (None: on none), not on
        the last."""
        if tower == self.offer_on:
            return
        placement = self.towers.placement
        if self.offer_on is not None:
            placement.offer_settled(self.offer_on)
        if tower is not None:
            placement.offer_sent(tower)
        self.offer_on = tower

    def _settled(self, negotiation: int, answered: bool = False) -> None:
        # An earlier negotiation's late word says nothing of the current offer.
        if negotiation == self.lifecycle.negotiation:
            self.settle_offer()
            if answered and self.counted_on is not None:
                self.towers.placement.answered(self.counted_on, self.weight)
            self._count_on(None)

    def settle_offer(self) -> None:
        """Its offer was answered, refused or given up (or it ended, or never ran): no
        tower counts it any more."""
        self._offer_on(None)

    def _move(self) -> TowerConnection | None:
        lifecycle = self.lifecycle
        if not lifecycle.may_move():
            self._fail("no placements left")
            return None
        tower = self.towers.choose(frozenset(lifecycle.towers_tried), self.weight)
        if tower is None:
            self._fail("no other tower is ready")
            return None
        lifecycle.placed(tower.name)
        self.placed = (tower.name, self.towers.placement.reported_at(tower.name))
        self.forget_restarts()
        return tower

    def _fail(self, why: str) -> None:
        self._send_all(self.lifecycle.give_up(why))
        self.counters.session_failed()
        self._end()

    def _end(self) -> None:
        if self.client is not None:
            self.client.close()
            self.client = None
        self._let_go_of_answer_reply()
        self.stop()

    def _let_go_of_answer_reply(self) -> None:
        # A POST waiting for an answer that will not come returns now, not at its deadline.
        if self.answer_reply is not None:
            self.answer_reply[1].close()
            self.answer_reply = None

    async def escalate(self, child: str, exit: Exit) -> bool:
        self.settle_offer()  # whatever ended the negotiation, its offer goes with it
        if isinstance(exit.error, NegotiationFailed):
            # Its end can overtake its Failed message (client frames queued before it):
            # the failure is taken first, so that the client hears it and its reason.
            await self._negotiation_failed(self.negotiations, exit.error.reason,
                                           exit.error.detail)
        if self.lifecycle.restarts_used_up():
            return True
        self._fail("the restarts on each tower were used up")
        return False

    def _attach(self, outbox: trio.MemorySendChannel[dict[str, Any]]) -> dict[str, Any] | None:
        if outbox.statistics().open_receive_channels == 0:
            # Its connection stopped waiting for this attach (the session was busy): the
            # one attached, if any, stays, and nothing is sent where nobody reads.
            return None
        if self.client is not None:
            _send(self.client, error_frame(
                "replaced", "another signaling connection took over this session", fatal=True
            ))
            self.client.close()
        self.client = outbox
        state = self.lifecycle.state_frame()
        _send(outbox, state)
        answer = self.answer
        if (answer is not None and answer["negotiation"] == self.lifecycle.negotiation
                and self.lifecycle.state is SessionState.NEGOTIATING):
            # Every connection while the negotiation lasts gets it: the last may have
            # ended with it unsent or unread, or nobody was there to take it (the HTTP
            # request had given up). A client that has it ignores it.
            _send(outbox, answer)
        return state

    async def _carry_out(self, decisions: list) -> None:
        for decision in decisions:
            if isinstance(decision, SendToClient):
                self._send_client(decision.frame)
            elif self.negotiation is not None:
                await self.negotiation.tell(decision)

    def _send_all(self, decisions: list) -> None:
        for decision in decisions:
            if isinstance(decision, SendToClient):
                self._send_client(decision.frame)

    def _send_client(self, frame: dict[str, Any]) -> None:
        if self.answer_reply is not None:
            negotiation, reply = self.answer_reply
            current = negotiation == self.lifecycle.negotiation
            if frame.get("type") in ("answer", "error") and current:
                # The answer to an offer that came over HTTP goes back the same way.
                self.answer_reply = None
                delivered = _send(reply, frame)
                reply.close()
                if delivered:
                    return
            elif frame.get("type") == "state" and frame["negotiation"] != negotiation:
                self.answer_reply = None
                reply.close()
        self._send_to_socket(frame)

    def _send_to_socket(self, frame: dict[str, Any]) -> None:
        if self.client is not None and not _send(self.client, frame):
            # A client too slow to take its frames loses its connection, not the session.
            self.client.close()
            self.client = None
        if frame.get("type") == "answer":
            self.answer = frame
        elif frame.get("type") == "state" and frame["state"] != "negotiating":
            self.answer = None

    def describe(self) -> dict[str, Any]:
        lifecycle = self.lifecycle
        return {
            "id": self.session_id,
            "state": lifecycle.state.value,
            "tower": lifecycle.tower,
            "negotiation": lifecycle.negotiation,
            "placements": len(lifecycle.towers_tried),
            "reason": lifecycle.reason,
            "age": round(trio.current_time() - self.created_at, 3),
        }

    async def stopping(self, exit: Exit) -> None:
        if not self.lifecycle.state.ended:
            self._send_all(self.lifecycle.close(_stop_reason(exit, self.system.shutting_down)))

    def release(self, exit: Exit) -> None:
        # Also for a session an operator killed: its API key's count, the live gauge and
        # its client's socket must not wait for a close that will never come.
        self.released = True
        self._count_on(None)
        self.settle_offer()
        if not self.lifecycle.state.ended:  # killed: stopping did not run
            self._send_all(self.lifecycle.close(_stop_reason(exit, self.system.shutting_down)))
        self.counters.remember_end(
            self.session_id, self.api_key, self.describe(), trio.current_time())
        if self.counting:
            self.counters.session_ended(self.counted_state)
        self.counters.by_key[self.api_key] -= 1
        self._let_go_of_answer_reply()
        if self.client is not None:
            self.client.close()


def _stop_reason(exit: Exit, shutting_down: bool) -> str:
    """What the client hears when its session ends from inside the broker."""
    if exit.kind is ExitKind.CRASHED:
        return "the session failed inside the broker"
    if shutting_down:
        # Stopped in order, or killed once the shutdown ran out of time.
        return "the broker is shutting down"
    # An operator's restart, stop or kill, through the shell.
    return "an operator stopped the session"


def _send(outbox: trio.MemorySendChannel[dict[str, Any]], frame: dict[str, Any]) -> bool:
    try:
        outbox.send_nowait(frame)
    except (trio.WouldBlock, trio.BrokenResourceError, trio.ClosedResourceError):
        return False
    return True


class Negotiation(Actor):
    """One attempt at connecting the client to the session's tower."""

    runs_tasks = True

    def __init__(
        self,
        session: ActorRef,
        session_id: str,
        number: int,
        application: str,
        tower: TowerConnection | None,
        settings: Settings,
    ) -> None:
        self.session = session
        self.session_id = session_id
        self.number = number
        self.application = application
        self.tower = tower
        self.settings = settings
        self.connected = False
        self.failed = False
        # Its deadline (``_watch_deadline``): cancelled once the peer is connected, and
        # stopped while its offer waits its turn (``_offer``).
        self.deadline = trio.CancelScope()
        # While its offer waits its turn on the tower's link, what follows it (the
        # candidates), to be sent after it in order.
        self.held: list[AddCandidate] | None = None

    async def started(self) -> None:
        if self.tower is None:
            # The session has ended instead (it had nowhere left to go).
            self.stop()
            return
        self.tower.route(self.session_id, self.ref)
        self.deadline.deadline = trio.current_time() + self.settings.negotiation_deadline
        self.start_soon(self._watch_deadline)
        self.start_soon(self._watch_tower, self.tower)

    async def receive(self, message: Any) -> None:
        if self.tower is None or getattr(message, "negotiation", self.number) != self.number:
            return
        if isinstance(message, ForwardOffer):
            # Its turn is waited for in a task: the negotiation goes on taking messages
            # (a stop among them) meanwhile.
            self.held = []
            self.start_soon(self._offer, OpenPeer(
                self.session_id, self.number, message.sdp, self.application,
                tuple(self.settings.ice_servers)), self.held)
        elif isinstance(message, ForwardCandidate):
            candidate = AddCandidate(self.session_id, self.number, message.candidate,
                                     message.sdp_mid, message.sdp_mline_index)
            if self.held is not None:
                self.held.append(candidate)
            else:
                await self._send(candidate)
        elif isinstance(message, PeerAnswer):
            await self.session.tell(Answered(self.number, message.sdp))
        elif isinstance(message, PeerRejected) and message.code == TOWER_FULL:
            await self._fail(FailureReason.TOWER_FULL, message.message)
        elif isinstance(message, PeerRejected):
            await self.session.tell(Rejected(self.number, message.code, message.message))
        elif isinstance(message, PeerState):
            await self._peer_state(message)
        else:
            raise TypeError(f"a negotiation does not handle {type(message).__name__}")

    async def _peer_state(self, message: PeerState) -> None:
        if message.state == "connected":
            self.connected = True
            self.deadline.cancel()
            await self.session.tell(Connected(self.number))
            return
        reason = FailureReason.SILENT if message.state == "silent" else FailureReason.PEER_FAILED
        await self._fail(reason, message.detail or f"the peer connection {message.state}")

    async def _watch_deadline(self) -> None:
        with self.deadline:
            await trio.sleep_forever()
        # Outside the scope: a peer connecting as the failure is told cannot cut the
        # telling short (``_fail`` does its work once).
        if not self.connected:
            await self._fail(FailureReason.DEADLINE,
                             f"not connected within {self.settings.negotiation_deadline:g} s")

    async def _watch_tower(self, tower: TowerConnection) -> None:
        await tower.closed.wait()
        await self._fail(FailureReason.TOWER_LOST, f"{tower.name} went away")

    async def _offer(self, offer: OpenPeer, held: list[AddCandidate]) -> None:
        assert self.tower is not None
        # The deadline is the client's and the tower's: the broker's own queue stops its
        # clock.
        left = self.deadline.deadline - trio.current_time()
        self.deadline.deadline = math.inf
        await self.tower.offer_turn(offer.session, offer.negotiation)
        self.deadline.deadline = trio.current_time() + left
        await self._send(offer)
        while held:
            await self._send(held.pop(0))
        if self.held is held:
            self.held = None

    async def _send(self, message: object) -> None:
        assert self.tower is not None
        try:
            await self.tower.send(message)
        except TowerGone:
            await self._fail(FailureReason.TOWER_LOST, f"{self.tower.name} went away")

    async def _fail(self, reason: FailureReason, detail: str) -> None:
        """End this negotiation as failed (each caller does nothing after it). Once: a
        second way of noticing the same end (its tower gone both to the watch and to a
        send) adds nothing, and is not logged as an error raised too late."""
        if self.failed:
            return
        self.failed = True
        await self.session.tell(Failed(self.number, reason, detail))
        raise NegotiationFailed(reason, detail)

    async def stopping(self, exit: Exit) -> None:
        tower = self.tower
        if tower is None:
            return
        if not tower.closed.is_set():
            with trio.move_on_after(1):
                try:
                    await tower.send(ClosePeer(self.session_id, self.number))
                except TowerGone:
                    pass

    def release(self, exit: Exit) -> None:
        tower = self.tower
        if tower is None:
            return
        tower.unroute(self.session_id, self.ref)
        if exit.kind is ExitKind.KILLED:
            # Its stopping did not close the tower's peer (or not surely): the client's
            # connection to it would live on with no session behind it.
            tower.send_nowait(ClosePeer(self.session_id, self.number))


SESSIONS_PATH = "/broker/sessions"


def session_name(session_id: str) -> str:
    return f"session:{session_id}"


def session_id_of(name: str) -> str:
    """The session id in a session actor's name (``session_name``)."""
    return name.removeprefix("session:")


def session_spec(session: Session) -> ChildSpec:
    """A session under ``sessions``: temporary, as its repairs are its own business.

    It runs once. An operator's restart stops it, as a close would, and then fails: a
    session that started again would be its closed self, holding its API key's count
    until a second close gave it back twice.
    """
    ready: Session | None = session

    def start() -> Session:
        nonlocal ready
        if ready is None:
            raise RuntimeError("a session does not start again; its client creates a new one")
        started, ready = ready, None
        return started

    return ChildSpec(session_name(session.session_id), start, Restart.TEMPORARY)


def sessions_spec() -> ChildSpec:
    return ChildSpec(
        "sessions",
        lambda: Supervisor((), SupervisorFlags(intensity=1_000_000, period=1)),
    )
