"""A session's lifecycle, as a state machine without I/O.

Theory of operation: a session lives through a series of negotiations, each one an ICE +
DTLS negotiation between the client and one tower, numbered from 1. The session actor
feeds this machine what happens (a negotiation started, the client's offer, the tower's
answer, connected, a failure, the end) and carries out what it returns: frames for the
client's signaling socket, and offers and candidates for the current negotiation.

The machine decides what is valid when: an offer is taken once per negotiation, while
it is negotiating; candidates only after that offer; whatever belongs to an earlier
negotiation is dropped. It also decides, when a tower has had its share of restarts or
is gone, whether the session moves to another tower or fails: a session is placed on at
most ``max_placements`` towers.

    negotiating --connected--> connected
    negotiating, connected --failed--> repairing --started--> negotiating
    connected --started--> negotiating     (a negotiation killed without a word)
    any but failed/closed --given up--> failed
    any but failed/closed --closed--> closed
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

from .link import MAX_CANDIDATES, OFFER_REFUSALS


class SessionState(enum.Enum):
    NEGOTIATING = "negotiating"
    CONNECTED = "connected"
    REPAIRING = "repairing"
    FAILED = "failed"
    CLOSED = "closed"

    @property
    def ended(self) -> bool:
        return self in (SessionState.FAILED, SessionState.CLOSED)


class FailureReason(enum.Enum):
    """Why a negotiation failed (the ``reason`` label of the failure metric)."""

    DEADLINE = "deadline"
    SILENT = "silent"
    PEER_FAILED = "peer_failed"
    TOWER_LOST = "tower_lost"
    TOWER_FULL = "tower_full"


_TRANSITIONS: dict[SessionState, dict[str, SessionState]] = {
    SessionState.NEGOTIATING: {
        "started": SessionState.NEGOTIATING,
        "connected": SessionState.CONNECTED,
        "failed": SessionState.REPAIRING,
        "given_up": SessionState.FAILED,
        "closed": SessionState.CLOSED,
    },
    SessionState.CONNECTED: {
        "started": SessionState.NEGOTIATING,
        "failed": SessionState.REPAIRING,
        "given_up": SessionState.FAILED,
        "closed": SessionState.CLOSED,
    },
    SessionState.REPAIRING: {
        "started": SessionState.NEGOTIATING,
        "failed": SessionState.REPAIRING,
        "given_up": SessionState.FAILED,
        "closed": SessionState.CLOSED,
    },
    SessionState.FAILED: {},
    SessionState.CLOSED: {},
}


@dataclass(frozen=True)
class SendToClient:
    """A frame for the client's signaling socket (a JSON object)."""

    frame: dict[str, Any]


@dataclass(frozen=True)
class ForwardOffer:
    negotiation: int
    sdp: str


@dataclass(frozen=True)
class ForwardCandidate:
    negotiation: int
    candidate: str
    sdp_mid: str | None
    sdp_mline_index: int | None


Decision = SendToClient | ForwardOffer | ForwardCandidate


def error_frame(code: str, message: str, *, fatal: bool = False) -> dict[str, Any]:
    return {"type": "error", "code": code, "message": message, "fatal": fatal}


class SessionLifecycle:
    """The lifecycle of one session.

    Args:
        tower: the tower of the first placement.
        max_placements: towers the session may be placed on in all.
    """

    def __init__(self, tower: str, max_placements: int) -> None:
        self.state = SessionState.NEGOTIATING
        self.negotiation = 0
        self.tower = tower
        self.towers_tried: list[str] = [tower]
        self.max_placements = max_placements
        self.reason = ""
        self.offer_taken = False
        self.candidates = 0  # forwarded for the offer taken
        self.move_requested = False

    # What happens.

    def negotiation_started(self, number: int) -> list[Decision]:
        """Negotiation ``number`` started on ``self.tower``: ask for a fresh offer."""
        if self.state.ended or number <= self.negotiation:
            return []
        first = self.negotiation == 0
        if not first and self.state is not SessionState.REPAIRING:
            # The last negotiation ended without a failure being reported (it was killed).
            self.reason = "the negotiation was restarted"
        self.negotiation = number
        self.offer_taken = False
        self._move("started")
        if first:
            return [SendToClient(self.state_frame())]
        return [
            SendToClient(self.state_frame()),
            SendToClient({"type": "reoffer", "negotiation": number, "reason": self.reason}),
        ]

    def offer(self, sdp: str, negotiation: int | None = None) -> list[Decision]:
        """The client sent an offer (made for ``negotiation``, if it says)."""
        if negotiation is not None and negotiation != self.negotiation:
            # Late, for a negotiation that failed meanwhile: its answer would be for a
            # peer connection the client has closed.
            frame = error_frame(
                "unexpected_message",
                f"an offer for negotiation {negotiation}; the session is at negotiation "
                f"{self.negotiation}",
            )
            return [SendToClient({**frame, "negotiation": negotiation})]
        if self.state is not SessionState.NEGOTIATING or self.offer_taken:
            return [SendToClient(error_frame(
                "unexpected_message",
                f"an offer is not expected while the session is {self._describe_wait()}",
            ))]
        self.offer_taken = True
        self.candidates = 0
        return [ForwardOffer(self.negotiation, sdp)]

    def candidate(
        self, candidate: str, sdp_mid: str | None, sdp_mline_index: int | None,
        negotiation: int | None = None,
    ) -> list[Decision]:
        """The client trickled a candidate for its current offer (for ``negotiation``'s,
        if it says)."""
        late = negotiation is not None and negotiation != self.negotiation
        if self.state is SessionState.REPAIRING or late:
            # Late candidates of a negotiation that failed: harmless, dropped.
            return []
        if self.state.ended or not self.offer_taken:
            return [SendToClient(error_frame(
                "unexpected_message", "a candidate must follow the offer it belongs to"
            ))]
        if self.candidates == MAX_CANDIDATES:
            # The tower would refuse it too, but each would cross the link all sessions
            # on that tower share.
            return [SendToClient(error_frame(
                "invalid_message", f"more than {MAX_CANDIDATES} candidates for one offer"))]
        self.candidates += 1
        return [ForwardCandidate(self.negotiation, candidate, sdp_mid, sdp_mline_index)]

    def offer_rejected(self, number: int, code: str, message: str) -> list[Decision]:
        """The tower could not use what the client sent.

        A refused offer may be sent again, corrected; a refused candidate leaves the
        offer (and the candidates that worked) as they are.
        """
        if number != self.negotiation or self.state.ended:
            return []
        if code in OFFER_REFUSALS:
            if self.state is not SessionState.NEGOTIATING:
                return []
            self.offer_taken = False
        return [SendToClient({**error_frame(code, message), "negotiation": number})]

    def answer(self, number: int, sdp: str) -> list[Decision]:
        if number != self.negotiation or self.state is not SessionState.NEGOTIATING:
            return []
        return [SendToClient({"type": "answer", "negotiation": number, "sdp": sdp})]

    def connected(self, number: int) -> list[Decision]:
        if number != self.negotiation or self.state is not SessionState.NEGOTIATING:
            return []
        self.reason = ""
        self._move("connected")
        return [SendToClient(self.state_frame())]

    def negotiation_failed(self, number: int, reason: FailureReason, detail: str) -> list[Decision]:
        """Negotiation ``number`` failed; its supervisor restarts it (or gives up)."""
        if number != self.negotiation or self.state.ended:
            return []
        self.reason = f"{reason.value}: {detail}" if detail else reason.value
        if reason in (FailureReason.TOWER_LOST, FailureReason.TOWER_FULL):
            self.move_requested = True
        if self.state is SessionState.REPAIRING:
            return []
        self._move("failed")
        return [SendToClient(self.state_frame())]

    def restarts_used_up(self) -> bool:
        """The negotiation failed too often on this tower: move on, if a tower is left.

        Returns whether the session may be placed again (then ``placed`` follows).
        """
        if self.state.ended:
            return False
        self.move_requested = True
        return len(self.towers_tried) < self.max_placements

    def placed(self, tower: str) -> None:
        """The session moved to ``tower``; the next negotiation runs there."""
        self.tower = tower
        self.towers_tried.append(tower)
        self.move_requested = False

    def may_move(self) -> bool:
        return len(self.towers_tried) < self.max_placements

    def give_up(self, why: str) -> list[Decision]:
        """The session cannot go on: tell the client why, once."""
        if self.state.ended:
            return []
        self.reason = f"{why} (last failure: {self.reason})" if self.reason else why
        self._move("given_up")
        return [SendToClient(self.state_frame())]

    def close(self, why: str) -> list[Decision]:
        if self.state.ended:
            return []
        self.reason = why
        self._move("closed")
        return [SendToClient(self.state_frame())]

    # What it is.

    def state_frame(self) -> dict[str, Any]:
        return {
            "type": "state",
            "state": self.state.value,
            "negotiation": self.negotiation,
            "tower": self.tower,
            "reason": self.reason,
        }

    def _describe_wait(self) -> str:
        if self.state is SessionState.NEGOTIATING:
            return "waiting for the answer to the offer it has"
        return self.state.value

    def _move(self, event: str) -> None:
        try:
            self.state = _TRANSITIONS[self.state][event]
        except KeyError:
            raise RuntimeError(f"no transition from {self.state.value} on {event}") from None
