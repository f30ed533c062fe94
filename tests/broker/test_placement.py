"""Placement, called directly: load reports in, a tower out."""

import random
from collections import Counter

import pytest

from broker.placement import Placement, TowerLoad


def placement_with(*loads, now=0.0, seed=1) -> Placement:
    placement = Placement(chooser=random.Random(seed))
    for load in loads:
        placement.report(load, now)
    return placement


def test_no_tower_no_placement():
    assert Placement().choose(now=0.0) is None


def test_the_only_ready_tower_is_chosen():
    placement = placement_with(TowerLoad("a", 5, 10))
    assert placement.choose(now=1.0) == "a"


def test_the_less_loaded_of_two_wins():
    placement = placement_with(TowerLoad("busy", 9, 10), TowerLoad("idle", 1, 10))
    assert {placement.choose(now=0.5) for _ in range(5)} == {"idle"}


def test_load_is_compared_as_a_share_of_capacity():
    placement = placement_with(TowerLoad("big", 50, 1000), TowerLoad("small", 5, 10))
    assert placement.choose(now=0.0) == "big"


def test_towers_not_heard_from_for_five_seconds_are_not_chosen():
    placement = placement_with(TowerLoad("old", 0, 10), now=0.0)
    placement.report(TowerLoad("fresh", 9, 10), now=4.5)
    assert placement.choose(now=4.9) == "old"
    assert placement.ready(now=5.0) == ["fresh"]
    assert placement.choose(now=5.0) == "fresh"


def test_draining_full_and_excluded_towers_are_not_chosen():
    placement = placement_with(
        TowerLoad("draining", 0, 10, draining=True),
        TowerLoad("full", 10, 10),
        TowerLoad("broken", 0, 10),
        TowerLoad("ok", 8, 10),
    )
    assert placement.ready(now=0.0, exclude={"broken"}) == ["ok"]
    assert placement.choose(now=0.0, exclude={"broken"}) == "ok"


def test_sessions_placed_since_the_last_report_count():
    placement = placement_with(TowerLoad("a", 0, 2))
    assert [placement.choose(now=0.0) for _ in range(3)] == ["a", "a", None]
    placement.report(TowerLoad("a", 1, 2), now=0.5)
    assert placement.choose(now=0.6) == "a"


def test_a_burst_spreads_over_towers():
    towers = [TowerLoad(f"t{n}", 0, 1000) for n in range(4)]
    placement = placement_with(*towers)
    counts = Counter(placement.choose(now=0.0) for _ in range(400))
    assert set(counts) == {"t0", "t1", "t2", "t3"}
    assert max(counts.values()) - min(counts.values()) <= 2


def test_forgotten_towers_are_not_chosen():
    placement = placement_with(TowerLoad("gone", 0, 10), TowerLoad("here", 9, 10))
    placement.forget("gone")
    placement.forget("never-known")
    assert placement.choose(now=0.0) == "here"


def test_used_share_counts_fresh_serving_towers():
    placement = placement_with(TowerLoad("a", 3, 10), TowerLoad("b", 4, 10))
    placement.report(TowerLoad("draining", 10, 10, draining=True), now=0.0)
    assert placement.used_share(now=1.0) == pytest.approx(0.35)
    assert placement.used_share(now=10.0) == 0.0


def test_what_sessions_take_of_the_capacity_counts_not_how_many_they_are():
    # Ten sessions with video, each weighing 25, against 100 with data only.
    video = TowerLoad("video", 10, 500, used=250)
    placement = placement_with(video, TowerLoad("data", 100, 500))
    assert {placement.choose(now=0.5) for _ in range(5)} == {"data"}
    assert placement.used_share(now=0.5) == pytest.approx((250 + 105) / 1000)
    # Shown with the sessions placed since its report, each one until it is weighed.
    placement.choose(now=0.5, exclude={"data"})
    assert placement.load_of("video") == TowerLoad("video", 11, 500, used=251)
    full = placement_with(TowerLoad("full", 20, 500, used=500))
    assert full.choose(now=0.5) is None


def test_a_session_goes_where_its_weight_fits_and_counts_with_it():
    placement = placement_with(TowerLoad("a", 19, 500, used=480))
    assert placement.choose(now=0.5, weight=25) is None  # 505 of 500
    assert placement.choose(now=0.5, weight=1) == "a"
    placement.report(TowerLoad("a", 10, 500, used=250), now=1.0)
    assert placement.choose(now=1.0, weight=25) == "a"
    assert placement.load_of("a") == TowerLoad("a", 11, 500, used=275)
    # Created without an offer, a session counts with its weight until it offers.
    placement.assign("a", 25, placed_under=1.0)
    assert placement.load_of("a") == TowerLoad("a", 11, 500, used=275)
    placement.report(TowerLoad("a", 10, 500, used=250), now=2.0)
    assert placement.load_of("a") == TowerLoad("a", 11, 500, used=275)
    placement.unassign("a", 25)
    assert placement.load_of("a") == TowerLoad("a", 10, 500, used=250)


def test_a_session_weighs_at_most_its_whole_tower():
    # A tower given less capacity than the video weight still takes one, as it would.
    small = placement_with(TowerLoad("small", 0, 20))
    assert small.choose(now=0.5, weight=25) == "small"
    assert small.load_of("small") == TowerLoad("small", 1, 20, used=20)
    assert small.choose(now=0.5, weight=1) is None
    assert placement_with(TowerLoad("none", 0, 0)).choose(now=0.5, weight=25) is None


@pytest.mark.parametrize("arguments", [
    {"tower": "", "sessions": 0, "capacity": 1},
    {"tower": "a", "sessions": -1, "capacity": 1},
    {"tower": "a", "sessions": 2, "capacity": 10, "used": 1},
])
def test_load_reports_are_checked(arguments):
    with pytest.raises(ValueError):
        TowerLoad(**arguments)


def test_stale_after_must_be_positive():
    with pytest.raises(ValueError):
        Placement(stale_after=0)


def test_sessions_assigned_here_count_whatever_the_tower_reports():
    # Created without an offer, a session is on no tower's report: it still counts.
    placement = placement_with(TowerLoad("a", 0, 3))
    for _ in range(3):
        placement.assign("a")
    placement.report(TowerLoad("a", 0, 3), now=1.0)
    assert placement.load_of("a").sessions == 3
    assert placement.choose(now=1.0) is None  # full
    placement.unassign("a")
    assert placement.choose(now=1.0) == "a"
    # A report of more than this broker's own sessions stands (another broker's, say).
    placement.report(TowerLoad("a", 2, 3), now=2.0)
    placement.unassign("a")
    placement.unassign("a")
    placement.unassign("a")  # one too many: the count does not go below nothing
    assert placement.load_of("a").sessions == 2


def test_sessions_not_answered_yet_count_on_top_of_the_towers_peers():
    # Six peers on the tower, and four of this broker's sessions with no peer there yet:
    # not offered, or their offers waiting their turn, through any number of reports
    # (counted by the reports alone, the tower would be given twice its capacity).
    placement = placement_with(TowerLoad("a", 6, 10))
    for _ in range(4):
        assert placement.choose(now=0.0) == "a"
        placement.assign("a", placed_under=placement.reported_at("a"))
        assert placement.load_of("a").sessions == 7 + _
    for now in (1.0, 2.0, 3.0):
        placement.report(TowerLoad("a", 6, 10), now=now)
        assert placement.load_of("a").sessions == 10
        assert placement.choose(now=now) is None
    # One is answered: it counts as answered until the next report, which has its peer.
    placement.unassign("a")
    placement.answered("a")
    assert placement.load_of("a").sessions == 10
    placement.report(TowerLoad("a", 7, 10), now=4.0)
    assert placement.load_of("a").sessions == 10
    # Answered, then ended before that report: room again from the report on.
    placement.unassign("a")
    placement.answered("a")
    assert placement.choose(now=4.0) is None
    placement.report(TowerLoad("a", 7, 10), now=5.0)
    assert placement.choose(now=5.0) == "a"


def test_sessions_placed_since_a_report_count_beside_those_assigned_before_it():
    # Five offers waiting their turn through a report, then sessions moved there by a
    # repair, placed, not assigned until their clients offer again: they were counted as
    # the larger of the two groups, not both, and the tower was given 15 of 10.
    placement = placement_with(TowerLoad("a", 0, 10))
    for _ in range(5):
        placement.choose(now=0.0)
        placement.assign("a", placed_under=placement.reported_at("a"))
    placement.report(TowerLoad("a", 0, 10), now=1.0)
    assert [placement.choose(now=1.0) for _ in range(6)] == ["a"] * 5 + [None]
    # As each moved session offers, it counts as assigned instead of as placed.
    placement.assign("a", placed_under=1.0)
    assert placement.load_of("a").sessions == 10
    # A session that was not placed here (negotiating again where it is) adds itself.
    placement.assign("a")
    assert placement.load_of("a").sessions == 11
    # One placed before the last report offers: that report ended its count as placed,
    # and the placements since are others'.
    placement.assign("a", placed_under=0.0)
    assert placement.load_of("a").sessions == 12
    # The next report ends the count of placements; the offers still wait.
    placement.report(TowerLoad("a", 0, 10), now=2.0)
    assert placement.load_of("a").sessions == 8


def test_a_new_session_goes_only_to_a_tower_with_fewer_offers_unanswered_than_its_limit():
    placement = placement_with(TowerLoad("a", 0, 100), TowerLoad("b", 0, 100))
    for _ in range(2):
        placement.offer_sent("a")
    placement.offer_sent("b")
    assert placement.unanswered("a") == 2
    assert {placement.choose(now=0.0, unanswered_below=2) for _ in range(5)} == {"b"}
    placement.offer_sent("b")
    assert placement.choose(now=0.0, unanswered_below=2) is None
    # Without a limit (a session already placed, moving): room is all that counts.
    assert placement.choose(now=0.0) in ("a", "b")
    assert placement.ready(now=0.0) == ["a", "b"]
    placement.offer_settled("a")
    assert placement.choose(now=0.0, unanswered_below=2) == "a"


def test_offers_settled_never_count_below_nothing():
    placement = placement_with(TowerLoad("a", 0, 10))
    placement.offer_sent("a")
    placement.offer_settled("a")
    placement.offer_settled("a")
    placement.offer_settled("never-sent")
    assert (placement.unanswered("a"), placement.unanswered("never-sent")) == (0, 0)
    placement.offer_sent("a")
    assert placement.choose(now=0.0, unanswered_below=1) is None
