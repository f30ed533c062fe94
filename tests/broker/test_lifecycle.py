"""The session lifecycle, called directly: events in, decisions out."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from broker.lifecycle import (
    FailureReason,
    ForwardCandidate,
    ForwardOffer,
    SendToClient,
    SessionLifecycle,
    SessionState,
    error_frame,
)
from broker.link import MAX_CANDIDATES

OFFER = "v=0 offer"


def frames(decisions) -> list[dict]:
    assert all(isinstance(decision, SendToClient) for decision in decisions), decisions
    return [decision.frame for decision in decisions]


def error_codes(decisions) -> list[str]:
    return [frame["code"] for frame in frames(decisions) if frame["type"] == "error"]


def negotiating(tower: str = "tower-1", max_placements: int = 2) -> SessionLifecycle:
    """A session whose first negotiation started: it waits for the client's offer."""
    lifecycle = SessionLifecycle(tower, max_placements)
    lifecycle.negotiation_started(1)
    return lifecycle


def offered() -> SessionLifecycle:
    lifecycle = negotiating()
    lifecycle.offer(OFFER)
    return lifecycle


def connected() -> SessionLifecycle:
    lifecycle = offered()
    lifecycle.answer(1, "v=0 answer")
    lifecycle.connected(1)
    return lifecycle


def repairing(reason=FailureReason.SILENT, detail="no pong") -> SessionLifecycle:
    lifecycle = connected()
    lifecycle.negotiation_failed(1, reason, detail)
    return lifecycle


def ended(how: str) -> SessionLifecycle:
    lifecycle = connected()
    if how == "failed":
        lifecycle.give_up("no placements left")
    else:
        lifecycle.close("closed by the client")
    return lifecycle


# What a session starts as.


def test_a_new_session_negotiates_on_its_first_tower():
    lifecycle = SessionLifecycle("tower-1", max_placements=2)
    assert lifecycle.state is SessionState.NEGOTIATING
    assert lifecycle.negotiation == 0
    assert lifecycle.towers_tried == ["tower-1"]
    assert not lifecycle.move_requested
    assert lifecycle.state_frame() == {
        "type": "state", "state": "negotiating", "negotiation": 0, "tower": "tower-1",
        "reason": "",
    }


def test_only_failed_and_closed_are_ended():
    assert {state for state in SessionState if state.ended} == {
        SessionState.FAILED, SessionState.CLOSED,
    }


def test_the_first_negotiation_sends_the_state_and_no_reoffer():
    lifecycle = SessionLifecycle("tower-1", max_placements=2)
    decisions = lifecycle.negotiation_started(1)
    assert frames(decisions) == [{
        "type": "state", "state": "negotiating", "negotiation": 1, "tower": "tower-1",
        "reason": "",
    }]
    assert lifecycle.negotiation == 1


@pytest.mark.parametrize("number", [0, 1])
def test_a_negotiation_number_that_is_not_new_is_ignored(number):
    lifecycle = offered()
    assert lifecycle.negotiation_started(number) == []
    assert lifecycle.negotiation == 1
    # The offer of negotiation 1 still counts: a second one is refused.
    assert error_codes(lifecycle.offer(OFFER)) == ["unexpected_message"]


# Offers.


def test_the_offer_is_forwarded_to_the_current_negotiation():
    lifecycle = negotiating()
    assert lifecycle.offer(OFFER) == [ForwardOffer(1, OFFER)]
    assert lifecycle.state is SessionState.NEGOTIATING


def test_a_second_offer_in_the_same_negotiation_is_refused():
    lifecycle = offered()
    [decision] = lifecycle.offer("v=0 another")
    assert decision.frame["type"] == "error"
    assert decision.frame["code"] == "unexpected_message"
    assert decision.frame["fatal"] is False
    assert "waiting for the answer" in decision.frame["message"]


def test_an_offer_while_connected_is_refused():
    lifecycle = connected()
    [decision] = lifecycle.offer(OFFER)
    assert decision.frame == error_frame("unexpected_message", decision.frame["message"])
    assert "connected" in decision.frame["message"]
    assert lifecycle.state is SessionState.CONNECTED


def test_an_offer_while_repairing_is_refused():
    lifecycle = repairing()
    assert error_codes(lifecycle.offer(OFFER)) == ["unexpected_message"]
    assert lifecycle.state is SessionState.REPAIRING


def test_an_offer_made_for_an_earlier_negotiation_is_refused_saying_so():
    # Made for negotiation 1, it arrives once negotiation 2 has started: its answer
    # would be for a peer connection the client has closed since.
    lifecycle = repairing()
    lifecycle.negotiation_started(2)
    [refused] = frames(lifecycle.offer(OFFER, negotiation=1))
    assert (refused["code"], refused["negotiation"], refused["fatal"]) == (
        "unexpected_message", 1, False)
    assert "negotiation 2" in refused["message"]
    # The offer made for this one is still taken.
    assert lifecycle.offer(OFFER, negotiation=2) == [ForwardOffer(2, OFFER)]
    # A candidate for the old offer is dropped, one for the current one goes on.
    assert lifecycle.candidate("candidate:1", "0", 0, negotiation=1) == []
    assert lifecycle.candidate("candidate:1", "0", 0, negotiation=2) == [
        ForwardCandidate(2, "candidate:1", "0", 0)]


@pytest.mark.parametrize("how", ["failed", "closed"])
def test_an_offer_after_the_end_is_refused(how):
    lifecycle = ended(how)
    assert error_codes(lifecycle.offer(OFFER)) == ["unexpected_message"]
    assert lifecycle.state.value == how


def test_a_rejected_offer_lets_the_client_offer_again():
    lifecycle = offered()
    decisions = lifecycle.offer_rejected(1, "invalid_sdp", "the tower cannot use it")
    assert frames(decisions) == [
        {**error_frame("invalid_sdp", "the tower cannot use it"), "negotiation": 1}]
    assert lifecycle.offer("v=0 corrected") == [ForwardOffer(1, "v=0 corrected")]


def test_a_rejection_for_an_old_negotiation_is_dropped():
    lifecycle = repairing()
    lifecycle.negotiation_started(2)
    lifecycle.offer(OFFER)
    assert lifecycle.offer_rejected(1, "invalid_sdp", "old") == []
    assert error_codes(lifecycle.offer(OFFER)) == ["unexpected_message"]


def test_a_rejection_once_connected_is_dropped():
    lifecycle = connected()
    assert lifecycle.offer_rejected(1, "invalid_sdp", "late") == []
    assert error_codes(lifecycle.offer(OFFER)) == ["unexpected_message"]


# Candidates.


def test_a_candidate_before_the_offer_is_refused():
    lifecycle = negotiating()
    [decision] = lifecycle.candidate("candidate:1 1 udp 1 192.0.2.1 9 typ host", "0", 0)
    assert decision.frame["code"] == "unexpected_message"
    assert decision.frame["fatal"] is False


def test_a_candidate_before_any_negotiation_is_refused():
    lifecycle = SessionLifecycle("tower-1", max_placements=2)
    assert error_codes(lifecycle.candidate("", None, None)) == ["unexpected_message"]


def test_a_candidate_after_the_offer_is_forwarded():
    lifecycle = offered()
    decisions = lifecycle.candidate("candidate:1 1 udp 1 192.0.2.1 9 typ host", "0", 0)
    assert decisions == [
        ForwardCandidate(1, "candidate:1 1 udp 1 192.0.2.1 9 typ host", "0", 0)
    ]


def test_the_end_of_candidates_is_forwarded_too():
    lifecycle = offered()
    assert lifecycle.candidate("", None, None) == [ForwardCandidate(1, "", None, None)]


def test_candidates_past_the_100th_for_one_offer_are_refused_by_the_broker():
    lifecycle = offered()
    for _ in range(MAX_CANDIDATES):
        assert lifecycle.candidate("", "0", 0) == [ForwardCandidate(1, "", "0", 0)]
    assert error_codes(lifecycle.candidate("", "0", 0)) == ["invalid_message"]
    # A new offer (here, after the first was refused) has its own 100.
    lifecycle.offer_rejected(1, "invalid_sdp", "no")
    lifecycle.offer(OFFER)
    assert lifecycle.candidate("", "0", 0) == [ForwardCandidate(1, "", "0", 0)]


def test_candidates_once_connected_still_reach_the_negotiation():
    lifecycle = connected()
    assert lifecycle.candidate("", "0", 0) == [ForwardCandidate(1, "", "0", 0)]


def test_candidates_while_repairing_are_dropped_silently():
    lifecycle = repairing()
    assert lifecycle.candidate("candidate:1 1 udp 1 192.0.2.1 9 typ host", "0", 0) == []


def test_candidates_of_the_next_negotiation_wait_for_its_offer():
    lifecycle = repairing()
    lifecycle.negotiation_started(2)
    assert error_codes(lifecycle.candidate("", "0", 0)) == ["unexpected_message"]
    lifecycle.offer(OFFER)
    assert lifecycle.candidate("", "0", 0) == [ForwardCandidate(2, "", "0", 0)]


@pytest.mark.parametrize("how", ["failed", "closed"])
def test_a_candidate_after_the_end_is_refused(how):
    lifecycle = ended(how)
    assert error_codes(lifecycle.candidate("", None, None)) == ["unexpected_message"]


# The tower's answer and the connection.


def test_the_answer_goes_to_the_client_with_its_negotiation():
    lifecycle = offered()
    assert frames(lifecycle.answer(1, "v=0 answer")) == [
        {"type": "answer", "negotiation": 1, "sdp": "v=0 answer"}
    ]


def test_connected_moves_to_connected_and_says_so():
    lifecycle = offered()
    decisions = lifecycle.connected(1)
    assert lifecycle.state is SessionState.CONNECTED
    assert frames(decisions) == [{
        "type": "state", "state": "connected", "negotiation": 1, "tower": "tower-1",
        "reason": "",
    }]


def test_connected_clears_the_reason_of_the_last_failure():
    lifecycle = repairing(FailureReason.DEADLINE, "not connected within 10 s")
    lifecycle.negotiation_started(2)
    lifecycle.offer(OFFER)
    [decision] = lifecycle.connected(2)
    assert decision.frame["reason"] == ""
    assert lifecycle.reason == ""


@pytest.mark.parametrize("number", [0, 2])
def test_answer_and_connected_for_another_negotiation_are_dropped(number):
    lifecycle = offered()
    assert lifecycle.answer(number, "v=0 stale") == []
    assert lifecycle.connected(number) == []
    assert lifecycle.state is SessionState.NEGOTIATING


def test_an_answer_of_a_failed_negotiation_is_dropped_after_the_next_one_started():
    lifecycle = repairing()
    lifecycle.negotiation_started(2)
    assert lifecycle.answer(1, "v=0 late") == []
    assert lifecycle.connected(1) == []
    assert lifecycle.state is SessionState.NEGOTIATING


def test_answer_and_connected_while_repairing_are_dropped():
    lifecycle = offered()
    lifecycle.negotiation_failed(1, FailureReason.DEADLINE, "")
    assert lifecycle.answer(1, "v=0 late") == []
    assert lifecycle.connected(1) == []
    assert lifecycle.state is SessionState.REPAIRING


def test_a_second_connected_is_dropped():
    lifecycle = connected()
    assert lifecycle.connected(1) == []
    assert lifecycle.answer(1, "v=0 again") == []


# Failures and repair.


@pytest.mark.parametrize("setup", [offered, connected])
def test_a_failure_moves_to_repairing_with_its_reason(setup):
    lifecycle = setup()
    decisions = lifecycle.negotiation_failed(1, FailureReason.PEER_FAILED, "ICE failed")
    assert lifecycle.state is SessionState.REPAIRING
    assert frames(decisions) == [{
        "type": "state", "state": "repairing", "negotiation": 1, "tower": "tower-1",
        "reason": "peer_failed: ICE failed",
    }]


def test_a_failure_without_detail_is_just_the_reason():
    lifecycle = connected()
    [decision] = lifecycle.negotiation_failed(1, FailureReason.SILENT, "")
    assert decision.frame["reason"] == "silent"


def test_a_failure_of_an_old_negotiation_is_dropped():
    lifecycle = repairing()
    lifecycle.negotiation_started(2)
    lifecycle.offer(OFFER)
    lifecycle.connected(2)
    assert lifecycle.negotiation_failed(1, FailureReason.TOWER_LOST, "gone") == []
    assert lifecycle.state is SessionState.CONNECTED
    assert not lifecycle.move_requested


def test_a_second_failure_while_repairing_updates_the_reason_quietly():
    lifecycle = repairing(FailureReason.SILENT, "no pong")
    assert lifecycle.negotiation_failed(1, FailureReason.TOWER_LOST, "tower-1 went away") == []
    assert lifecycle.state is SessionState.REPAIRING
    assert lifecycle.reason == "tower_lost: tower-1 went away"
    assert lifecycle.move_requested


def test_a_lost_tower_asks_for_a_move():
    lifecycle = connected()
    lifecycle.negotiation_failed(1, FailureReason.TOWER_LOST, "tower-1 went away")
    assert lifecycle.move_requested


@pytest.mark.parametrize(
    "reason", [FailureReason.DEADLINE, FailureReason.SILENT, FailureReason.PEER_FAILED]
)
def test_other_failures_stay_on_the_tower(reason):
    lifecycle = connected()
    lifecycle.negotiation_failed(1, reason, "detail")
    assert not lifecycle.move_requested


def test_the_next_negotiation_sends_state_then_reoffer_with_the_failure():
    lifecycle = repairing(FailureReason.SILENT, "no pong for 5 s")
    decisions = lifecycle.negotiation_started(2)
    assert lifecycle.state is SessionState.NEGOTIATING
    assert frames(decisions) == [
        {
            "type": "state", "state": "negotiating", "negotiation": 2, "tower": "tower-1",
            "reason": "silent: no pong for 5 s",
        },
        {"type": "reoffer", "negotiation": 2, "reason": "silent: no pong for 5 s"},
    ]
    assert lifecycle.offer(OFFER) == [ForwardOffer(2, OFFER)]


def test_a_negotiation_restarted_before_connecting_asks_for_a_new_offer():
    lifecycle = offered()
    lifecycle.negotiation_failed(1, FailureReason.DEADLINE, "not connected within 10 s")
    decisions = lifecycle.negotiation_started(2)
    assert [frame["type"] for frame in frames(decisions)] == ["state", "reoffer"]
    assert lifecycle.offer(OFFER) == [ForwardOffer(2, OFFER)]


def test_a_move_runs_the_next_negotiation_on_the_new_tower():
    lifecycle = repairing(FailureReason.TOWER_LOST, "tower-1 went away")
    assert lifecycle.restarts_used_up() is True
    lifecycle.placed("tower-2")
    assert not lifecycle.move_requested
    assert lifecycle.towers_tried == ["tower-1", "tower-2"]
    [state, reoffer] = frames(lifecycle.negotiation_started(2))
    assert state["tower"] == "tower-2"
    assert reoffer["reason"] == "tower_lost: tower-1 went away"


def test_restarts_used_up_says_whether_a_placement_is_left():
    lifecycle = repairing()
    assert lifecycle.may_move()
    assert lifecycle.restarts_used_up() is True
    assert lifecycle.move_requested
    lifecycle.placed("tower-2")
    assert not lifecycle.may_move()
    assert lifecycle.restarts_used_up() is False


def test_with_one_placement_there_is_nowhere_to_go():
    lifecycle = negotiating(max_placements=1)
    assert not lifecycle.may_move()
    assert lifecycle.restarts_used_up() is False


def test_restarts_used_up_after_the_end_is_false():
    lifecycle = ended("closed")
    assert lifecycle.may_move()
    assert lifecycle.restarts_used_up() is False


@pytest.mark.parametrize("max_placements", [1, 2, 3, 5])
def test_a_session_is_placed_on_at_most_max_placements_towers(max_placements):
    lifecycle = negotiating(max_placements=max_placements)
    number = 1
    while lifecycle.restarts_used_up():
        lifecycle.negotiation_failed(number, FailureReason.TOWER_LOST, "gone")
        lifecycle.placed(f"tower-{len(lifecycle.towers_tried) + 1}")
        number += 1
        lifecycle.negotiation_started(number)
    assert len(lifecycle.towers_tried) == max_placements
    assert len(set(lifecycle.towers_tried)) == max_placements


# The end.


def test_giving_up_fails_the_session_with_the_last_failure():
    lifecycle = repairing(FailureReason.DEADLINE, "not connected within 10 s")
    decisions = lifecycle.give_up("no placements left")
    assert lifecycle.state is SessionState.FAILED
    assert frames(decisions) == [{
        "type": "state", "state": "failed", "negotiation": 1, "tower": "tower-1",
        "reason": "no placements left (last failure: deadline: not connected within 10 s)",
    }]


def test_giving_up_without_a_failure_says_only_why():
    lifecycle = negotiating()
    [decision] = lifecycle.give_up("no other tower is ready")
    assert decision.frame["reason"] == "no other tower is ready"


@pytest.mark.parametrize("setup", [negotiating, offered, connected, repairing])
def test_closing_ends_the_session_from_any_live_state(setup):
    lifecycle = setup()
    negotiation = lifecycle.negotiation
    decisions = lifecycle.close("closed by the client")
    assert lifecycle.state is SessionState.CLOSED
    assert frames(decisions) == [{
        "type": "state", "state": "closed", "negotiation": negotiation, "tower": "tower-1",
        "reason": "closed by the client",
    }]


@pytest.mark.parametrize("setup", [negotiating, connected, repairing])
def test_giving_up_ends_the_session_from_any_live_state(setup):
    lifecycle = setup()
    assert [frame["state"] for frame in frames(lifecycle.give_up("why"))] == ["failed"]
    assert lifecycle.state is SessionState.FAILED


@pytest.mark.parametrize("how", ["failed", "closed"])
def test_the_end_is_final_and_said_once(how):
    lifecycle = ended(how)
    frame = lifecycle.state_frame()
    assert lifecycle.give_up("again") == []
    assert lifecycle.close("again") == []
    assert lifecycle.negotiation_started(2) == []
    assert lifecycle.negotiation_failed(1, FailureReason.TOWER_LOST, "gone") == []
    assert lifecycle.answer(1, "v=0") == []
    assert lifecycle.connected(1) == []
    assert lifecycle.offer_rejected(1, "invalid_sdp", "no") == []
    assert lifecycle.state.value == how
    assert lifecycle.state_frame() == frame
    assert not lifecycle.move_requested


# Any order of events.

EVENTS = st.lists(
    st.one_of(
        st.just(("offer",)),
        st.tuples(st.just("candidate"), st.sampled_from(["", "candidate:1 1 udp 1 x 9 typ host"])),
        st.tuples(st.just("answer"), st.integers(0, 4)),
        st.tuples(st.just("connected"), st.integers(0, 4)),
        st.tuples(st.just("rejected"), st.integers(0, 4)),
        st.tuples(st.just("failed"), st.integers(0, 4), st.sampled_from(FailureReason)),
        st.just(("next",)),
        st.just(("give_up",)),
        st.just(("close",)),
    ),
    max_size=40,
)


@given(EVENTS)
def test_whatever_happens_decisions_belong_to_the_current_negotiation(events):
    lifecycle = negotiating()
    offers_taken = 0
    for event in events:
        before = lifecycle.state
        kind = event[0]
        if kind == "offer":
            decisions = lifecycle.offer(OFFER)
        elif kind == "candidate":
            decisions = lifecycle.candidate(event[1], "0", 0)
        elif kind == "answer":
            decisions = lifecycle.answer(event[1], "v=0 answer")
        elif kind == "connected":
            decisions = lifecycle.connected(event[1])
        elif kind == "rejected":
            if offers_taken == 0:
                # The tower rejects only an offer it was given.
                continue
            decisions = lifecycle.offer_rejected(event[1], "invalid_sdp", "no")
        elif kind == "failed":
            decisions = lifecycle.negotiation_failed(event[1], event[2], "")
        elif kind == "next":
            if lifecycle.state is not SessionState.REPAIRING:
                continue
            decisions = lifecycle.negotiation_started(lifecycle.negotiation + 1)
            offers_taken = 0
        elif kind == "give_up":
            decisions = lifecycle.give_up("why")
        else:
            decisions = lifecycle.close("why")
        if before.ended:
            assert decisions == [] or error_codes(decisions) == ["unexpected_message"]
            assert lifecycle.state is before
        for decision in decisions:
            if isinstance(decision, (ForwardOffer, ForwardCandidate)):
                assert decision.negotiation == lifecycle.negotiation
                assert lifecycle.state in (SessionState.NEGOTIATING, SessionState.CONNECTED)
            if isinstance(decision, ForwardOffer):
                offers_taken += 1
            if isinstance(decision, SendToClient) and decision.frame["type"] == "error":
                if decision.frame["code"] == "invalid_sdp":
                    offers_taken -= 1
        assert offers_taken in (0, 1)
        state_frames = [
            decision.frame for decision in decisions
            if isinstance(decision, SendToClient) and decision.frame["type"] == "state"
        ]
        if lifecycle.state is not before:
            assert state_frames and state_frames[0]["state"] == lifecycle.state.value
        else:
            assert state_frames == []


def test_a_negotiation_killed_while_connected_starts_over_with_a_reoffer():
    lifecycle = connected()
    [state, reoffer] = frames(lifecycle.negotiation_started(2))
    assert state["state"] == "negotiating" and state["negotiation"] == 2
    assert reoffer["reason"] == "the negotiation was restarted"
    assert lifecycle.offer(OFFER) == [ForwardOffer(2, OFFER)]


def test_a_refused_candidate_leaves_the_offer_taken():
    lifecycle = offered()
    assert error_codes(lifecycle.offer_rejected(1, "invalid_message", "not a candidate")) == [
        "invalid_message"]
    assert lifecycle.candidate("candidate:1 1 udp 1 192.0.2.1 9 typ host", "0", 0) == [
        ForwardCandidate(1, "candidate:1 1 udp 1 192.0.2.1 9 typ host", "0", 0)]
    assert error_codes(lifecycle.offer(OFFER)) == ["unexpected_message"]
