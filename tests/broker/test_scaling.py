"""The scale policy: pure decisions over a view of the towers (no actor, no clock); and
the view the scaler makes of what is linked and what is coming."""

import trio

from broker.config import Settings
from broker.link import TowerHello, TowerLoadReport
from broker.inventory import Host
from broker.provisioning import HostBoard, HostState
from broker.scaling import (
    TOWER_GRACE,
    Decision,
    Scaler,
    ScalePolicy,
    ScaleView,
    TowerFigures,
)
from broker.towers import TowerConnection, TowerDirectory


def policy(**overrides) -> ScalePolicy:
    values = dict(threshold=0.7, out_after=30.0, in_after=300.0, floor=1)
    values.update(overrides)
    return ScalePolicy(**values)


def tower(name, sessions=0, capacity=100, *, provisioned=True, draining=False, retiring=False):
    return TowerFigures(name, sessions, capacity, provisioned, draining, retiring)


def local(name="local-1", sessions=0, capacity=100, *, draining=False):
    return tower(name, sessions, capacity, provisioned=False, draining=draining)


def view(now, towers=(), free=(), on_the_way=0) -> ScaleView:
    return ScaleView(float(now), tuple(towers), tuple(free), on_the_way)


def actions(decisions: list[Decision]) -> list[tuple[str, str]]:
    return [(decision.action, decision.host) for decision in decisions]


# The floor.


def test_fewer_towers_than_the_floor_provisions_several_free_hosts_at_once():
    decisions = policy(floor=3).decide(view(0, [local()], free=["h1", "h2", "h3"]))
    assert actions(decisions) == [("provision", "h1"), ("provision", "h2")]


def test_the_floor_never_provisions_more_hosts_than_are_free():
    decisions = policy(floor=5).decide(view(0, [local()], free=["h1"]))
    assert actions(decisions) == [("provision", "h1")]
    assert policy(floor=5).decide(view(0, [local()], free=[])) == []


def test_the_floor_counts_hosts_already_provisioning():
    scale = policy(floor=3)
    assert actions(scale.decide(view(0, [local()], free=["h1", "h2"], on_the_way=1))) == [
        ("provision", "h1")
    ]
    assert scale.decide(view(5, [local()], free=["h1", "h2"], on_the_way=2)) == []


def test_the_floor_is_met_by_towers_up_or_coming_and_nothing_is_asked():
    assert policy(floor=2).decide(view(0, [local(), tower("p1", 10)], free=["h1"])) == []


def test_a_draining_tower_does_not_count_towards_the_floor():
    towers = [local(), tower("p1", 5, draining=True)]
    decisions = policy(floor=2).decide(view(0, towers, free=["h1"]))
    assert actions(decisions) == [("provision", "h1")]


def test_the_floor_says_how_many_towers_there_are_and_how_many_are_wanted():
    (decision,) = policy(floor=2).decide(view(0, [local()], free=["h1"]))
    assert "1" in decision.why and "2" in decision.why


# Scale-out.


def busy(now, *, free=("h1", "h2"), on_the_way=0, sessions=80):
    return view(now, [local(sessions=sessions)], free=free, on_the_way=on_the_way)


def test_sustained_load_above_the_threshold_provisions_one_host_after_out_after():
    scale = policy()
    assert scale.decide(busy(0)) == []
    assert scale.decide(busy(10)) == []
    assert scale.decide(busy(29.9)) == []
    decisions = scale.decide(busy(30))
    assert actions(decisions) == [("provision", "h1")]
    assert "80%" in decisions[0].why and "30 s" in decisions[0].why


def test_load_exactly_at_the_threshold_is_not_above_it():
    scale = policy()
    for now in (0, 30, 60):
        assert scale.decide(busy(now, sessions=70)) == []


def test_no_scale_out_while_a_host_is_provisioning():
    scale = policy()
    scale.decide(busy(0))
    assert scale.decide(busy(30, on_the_way=1)) == []
    assert scale.decide(busy(60, on_the_way=1)) == []


def test_no_scale_out_without_a_free_host():
    scale = policy()
    scale.decide(busy(0, free=()))
    assert scale.decide(busy(30, free=())) == []
    assert scale.decide(busy(100, free=())) == []


def test_the_load_must_stay_above_the_threshold_a_dip_starts_the_wait_again():
    scale = policy()
    scale.decide(busy(0))
    scale.decide(busy(20))
    assert scale.decide(busy(25, sessions=50)) == []
    assert scale.decide(busy(30)) == []
    assert scale.decide(busy(59)) == []
    assert actions(scale.decide(busy(60))) == [("provision", "h1")]


def test_after_a_scale_out_the_load_must_be_sustained_again_before_the_next():
    scale = policy()
    scale.decide(busy(0))
    assert actions(scale.decide(busy(30))) == [("provision", "h1")]
    # The host came up at once but the load stays high: a whole new wait.
    assert scale.decide(busy(35, free=("h2",))) == []
    assert scale.decide(busy(64, free=("h2",))) == []
    assert actions(scale.decide(busy(65, free=("h2",)))) == [("provision", "h2")]


def test_the_load_is_the_used_share_of_serving_towers_only():
    # 60 + 90 sessions out of 200 is 75%; the drained tower's capacity would hide it.
    towers = [local(sessions=60), tower("p1", 90), tower("p2", 0, draining=True)]
    scale = policy()
    scale.decide(view(0, towers, free=["h1"]))
    assert actions(scale.decide(view(30, towers, free=["h1"]))) == [("provision", "h1")]


def test_a_tower_counts_at_most_all_of_its_capacity_whatever_it_reports():
    # 2**62 sessions on one tower of 100 would be a used share of 10**16 %.
    towers = [local(sessions=2**62), tower("p1", 0), tower("p2", 0), tower("p3", 0)]
    scale = policy()
    scale.decide(view(0, towers, free=["h1"]))
    # 100 of 400 used, 25 %: nothing to provision.
    assert scale.decide(view(30, towers, free=["h1"])) == []


def test_no_serving_capacity_is_no_load():
    towers = [local(sessions=5, draining=True)]
    scale = policy(floor=0)
    assert scale.decide(view(0, towers, free=["h1"])) == []
    assert scale.decide(view(100, towers, free=["h1"])) == []


def test_a_floor_provision_in_the_same_tick_holds_back_the_scale_out():
    scale = policy(floor=2)
    scale.decide(busy(0, free=()))  # the load is high, but no host is free yet
    decisions = scale.decide(busy(40, free=("h1", "h2")))
    assert actions(decisions) == [("provision", "h1")]


# Scale-in.


def quiet(now, *towers, free=()):
    return view(now, [local(sessions=10), *towers], free=free)


def test_an_idle_provisioned_tower_beyond_the_floor_is_drained_after_in_after():
    scale = policy()
    assert scale.decide(quiet(0, tower("p1"))) == []
    assert scale.decide(quiet(299, tower("p1"))) == []
    decisions = scale.decide(quiet(300, tower("p1")))
    assert actions(decisions) == [("drain", "p1")]
    assert "idle" in decisions[0].why and "300 s" in decisions[0].why


def test_a_session_on_the_tower_restarts_its_idle_time():
    scale = policy()
    scale.decide(quiet(0, tower("p1")))
    scale.decide(quiet(200, tower("p1", sessions=1)))
    assert scale.decide(quiet(300, tower("p1"))) == []  # idle again from here
    assert scale.decide(quiet(599, tower("p1"))) == []
    assert actions(scale.decide(quiet(600, tower("p1")))) == [("drain", "p1")]


def test_an_idle_tower_is_not_drained_down_to_the_floor():
    scale = policy(floor=2)
    scale.decide(quiet(0, tower("p1")))
    assert scale.decide(quiet(1000, tower("p1"))) == []


def test_local_towers_are_never_drained_even_idle_beyond_the_floor():
    towers = [local("local-1"), local("local-2"), local("local-3")]
    scale = policy(floor=1)
    scale.decide(view(0, towers))
    assert scale.decide(view(1000, towers)) == []


def test_no_drain_unless_the_rest_would_stay_under_half_the_threshold():
    # 35 sessions on the remaining 100 would be exactly half of 0.7: not under it.
    scale = policy()
    scale.decide(quiet(0, tower("p1")))
    assert scale.decide(view(400, [local(sessions=35), tower("p1")])) == []
    assert actions(scale.decide(view(401, [local(sessions=34), tower("p1")]))) == [
        ("drain", "p1")
    ]


def test_a_tower_counts_at_most_all_of_its_capacity_when_scaling_in_too():
    # A tower reporting absurdly many sessions kept every idle tower for ever.
    scale = policy()
    scale.decide(quiet(0, tower("p1")))
    assert actions(scale.decide(view(400, [local(sessions=2**62, capacity=1000),
                                           tower("p1")]))) == []
    scale = policy()
    fleet = [local(sessions=2**62), tower("p1"), tower("p2"), tower("p3")]
    scale.decide(view(0, fleet))
    assert actions(scale.decide(view(400, fleet))) == [("drain", "p1")]


def test_idle_towers_are_drained_one_at_a_time():
    scale = policy()
    scale.decide(quiet(0, tower("p1"), tower("p2")))
    assert actions(scale.decide(quiet(300, tower("p1"), tower("p2")))) == [("drain", "p1")]
    # The next tick sees p1 draining (with its last session): nothing more yet.
    towers = (tower("p1", 1, draining=True, retiring=True), tower("p2"))
    assert scale.decide(quiet(305, *towers)) == []
    assert scale.decide(quiet(900, *towers)) == []


def test_a_drained_tower_does_not_count_as_idle_and_a_new_wait_starts_when_it_serves_again():
    scale = policy()
    scale.decide(quiet(0, tower("p1", draining=True)))
    scale.decide(quiet(400, tower("p1", draining=True)))
    assert scale.decide(quiet(500, tower("p1"))) == []
    assert scale.decide(quiet(799, tower("p1"))) == []
    assert actions(scale.decide(quiet(800, tower("p1")))) == [("drain", "p1")]


def test_a_tower_gone_from_the_view_is_forgotten():
    scale = policy()
    scale.decide(quiet(0, tower("p1")))
    scale.decide(quiet(100))  # p1 is stale or gone: its idle time is forgotten
    assert scale.decide(quiet(300, tower("p1"))) == []
    assert actions(scale.decide(quiet(600, tower("p1")))) == [("drain", "p1")]


def test_an_operator_drained_local_tower_does_not_block_scale_in_for_ever():
    towers = [local("local-1", sessions=10), local("local-2", draining=True), tower("p1")]
    scale = policy()
    scale.decide(view(0, towers))
    assert actions(scale.decide(view(3600, towers))) == [("drain", "p1")]


# Decommission.


def test_a_retiring_tower_without_sessions_is_decommissioned():
    scale = policy()
    decisions = scale.decide(quiet(0, tower("p1", 0, draining=True, retiring=True)))
    assert actions(decisions) == [("decommission", "p1")]
    assert decisions[0].why == "drained and empty"


def test_a_retiring_tower_with_sessions_waits_for_them_to_end():
    scale = policy()
    assert scale.decide(quiet(0, tower("p1", 3, draining=True, retiring=True))) == []


def test_a_tower_drained_by_hand_is_not_decommissioned():
    scale = policy()
    assert scale.decide(quiet(0, tower("p1", 0, draining=True))) == []
    assert scale.decide(quiet(0, local("local-2", draining=True))) == []


# scale N.


def test_scale_to_sets_floor_and_ceiling():
    scale = policy()
    scale.scale_to(4)
    assert (scale.floor, scale.ceiling) == (4, 4)


def test_scale_to_above_the_towers_provisions_the_difference():
    scale = policy()
    scale.scale_to(3)
    decisions = scale.decide(view(0, [local(sessions=10)], free=["h1", "h2", "h3"]))
    assert actions(decisions) == [("provision", "h1"), ("provision", "h2")]


def test_scale_to_below_the_towers_drains_the_least_loaded_provisioned_tower_even_busy():
    scale = policy()
    scale.scale_to(2)
    towers = [local(sessions=1), tower("p1", 40), tower("p2", 25), tower("p3", 60)]
    decisions = scale.decide(view(0, towers))
    assert actions(decisions) == [("drain", "p2")]
    assert "4" in decisions[0].why and "2" in decisions[0].why


def test_scale_to_drains_one_tower_at_a_time():
    scale = policy()
    scale.scale_to(1)
    towers = [local(sessions=1), tower("p1", 40, draining=True, retiring=True), tower("p2", 25)]
    assert scale.decide(view(0, towers)) == []


def test_scale_to_never_drains_a_local_tower():
    scale = policy()
    scale.scale_to(1)
    assert scale.decide(view(0, [local("local-1", 5), local("local-2", 0)])) == []
    assert scale.decide(view(1000, [local("local-1", 5), local("local-2", 0)])) == []


def test_the_ceiling_holds_back_scale_out():
    scale = policy()
    scale.scale_to(1)
    scale.decide(busy(0))
    assert scale.decide(busy(30)) == []
    assert scale.decide(busy(100)) == []


def test_scale_to_the_current_count_changes_nothing():
    scale = policy()
    scale.scale_to(2)
    towers = [local(sessions=10), tower("p1", 10)]
    assert scale.decide(view(0, towers, free=["h1"])) == []
    assert scale.decide(view(1000, towers, free=["h1"])) == []


# Stability: the same view again asks for nothing new.


def test_a_steady_fleet_asks_for_nothing_tick_after_tick():
    scale = policy(floor=2)
    towers = [local(sessions=30), tower("p1", 20)]
    for now in range(0, 3600, 5):
        assert scale.decide(view(now, towers, free=["h1"])) == []


def test_an_idle_tower_is_kept_when_the_rest_would_be_half_busy():
    # 25% used overall, but 50% on the rest without p1: above half the threshold.
    scale = policy()
    towers = [local(sessions=50), tower("p1")]
    for now in range(0, 3600, 5):
        assert scale.decide(view(now, towers, free=["h1"])) == []


async def test_a_local_tower_not_reporting_is_coming_for_a_grace_then_missing(
    autojump_clock, tmp_path
):
    directory = TowerDirectory(stale_after=3.0)
    scaler = Scaler(Settings(state_dir=tmp_path, local_towers=2), directory, HostBoard(()))
    one = TowerConnection("tower-1", None, TowerHello("tower-1", 100, "test"))
    directory.connected(one)
    directory.report("tower-1", TowerLoadReport(0, 100))
    # tower-2 has not reported yet: on its way, as it starts.
    first = scaler.view()
    assert [tower.name for tower in first.towers] == ["tower-1"] and first.on_the_way == 1
    # tower-1's agent dies; the broker restarts it. Meanwhile both are coming, so the
    # floor provisions no host for the gap.
    directory.disconnected(one)
    await trio.sleep(TOWER_GRACE - 5)
    assert scaler.view().on_the_way == 2
    # tower-2 never came, tower-1 is back: only tower-2 is missing once its grace is over.
    directory.connected(one)
    directory.report("tower-1", TowerLoadReport(0, 100))
    await trio.sleep(5)
    directory.report("tower-1", TowerLoadReport(0, 100))
    back = scaler.view()
    assert [tower.name for tower in back.towers] == ["tower-1"] and back.on_the_way == 0


async def test_a_provisioned_tower_not_reporting_holds_back_a_scale_out_only_for_a_grace(
    autojump_clock, tmp_path
):
    # Its link kept coming back with no load report taken (a tower newer than the
    # broker, say): counted on its way for good, it stopped every scale-out.
    board = HostBoard(tuple(Host(name, f"10.0.0.{number}", "tower")
                            for number, name in enumerate(["stuck", "busy", "spare"], 1)))
    board.set("stuck", HostState.READY)
    board.set("busy", HostState.READY)
    directory = TowerDirectory(stale_after=5.0)
    for name in ("stuck", "busy"):
        directory.connected(TowerConnection(name, None, TowerHello(name, 100, "test")))
    scaler = Scaler(Settings(state_dir=tmp_path, local_towers=0), directory, board)
    policy = ScalePolicy(threshold=0.8, out_after=0, in_after=600, floor=1)
    directory.report("busy", TowerLoadReport(100, 100))
    assert scaler.view().on_the_way == 1  # "stuck" has not reported yet
    assert not [d for d in policy.decide(scaler.view()) if d.action == "provision"]
    await trio.sleep(TOWER_GRACE)
    directory.report("busy", TowerLoadReport(100, 100))
    view = scaler.view()
    assert view.on_the_way == 0
    assert [(d.action, d.host) for d in policy.decide(view)] == [("provision", "spare")]


async def test_a_host_ready_again_after_a_while_elsewhere_is_coming_from_then(
    autojump_clock, tmp_path
):
    # Drained to free, provisioned again two minutes later: until its first report it is
    # on its way, not missing since it was last seen two minutes ago.
    board = HostBoard((Host("h1", "10.0.0.1", "tower"),))
    board.set("h1", HostState.READY)
    scaler = Scaler(Settings(state_dir=tmp_path, local_towers=0),
                    TowerDirectory(stale_after=5.0), board)
    assert scaler.view().on_the_way == 1
    board.set("h1", HostState.FREE)
    assert scaler.view().on_the_way == 0
    await trio.sleep(120)
    board.set("h1", HostState.READY)
    assert scaler.view().on_the_way == 1


async def test_a_retiring_tower_with_a_session_negotiating_there_is_not_empty(
    autojump_clock, tmp_path
):
    # Repaired on it and waiting for its client's offer, a session counts in no load:
    # decommissioned then, the tower would take the session's repair with it.
    board = HostBoard((Host("h1", "10.0.0.1", "tower"),))
    board.set("h1", HostState.DRAINING)
    directory = TowerDirectory(stale_after=5.0)
    connection = TowerConnection("h1", None, TowerHello("h1", 100, "test"))
    directory.connected(connection)
    directory.report("h1", TowerLoadReport(0, 100))
    scaler = Scaler(Settings(state_dir=tmp_path, local_towers=0), directory, board)
    policy = ScalePolicy(threshold=0.8, out_after=0, in_after=600, floor=0)
    negotiation = object()
    connection.route("s-1", negotiation)  # type: ignore[arg-type]
    [figures] = scaler.view().towers
    assert figures.used == 1
    assert not [d for d in policy.decide(scaler.view()) if d.action == "decommission"]
    connection.unroute("s-1", negotiation)  # type: ignore[arg-type]
    assert [(d.action, d.host) for d in policy.decide(scaler.view())] == [
        ("decommission", "h1")]


async def test_a_retiring_tower_gone_stale_still_holds_back_a_second_scale_in(
    autojump_clock, tmp_path
):
    hosts = tuple(Host(name, f"10.0.0.{number}", "tower")
                  for number, name in enumerate(["h1", "h2"], 1))
    board = HostBoard(hosts)
    directory = TowerDirectory(stale_after=5.0)
    scaler = Scaler(Settings(state_dir=tmp_path, local_towers=1), directory, board)
    for name in ("tower-1", "h1", "h2"):
        directory.connected(TowerConnection(name, None, TowerHello(name, 100, "test")))
        directory.report(name, TowerLoadReport(0, 100))
    for name in ("h1", "h2"):
        board.set(name, HostState.READY)
    board.set("h1", HostState.DRAINING)  # being drained, still linked
    directory.drain("h1")
    await trio.sleep(5)
    for name in ("tower-1", "h2"):
        directory.report(name, TowerLoadReport(0, 100))
    # h1's reports lag: stale, but still retiring, and not known to be empty.
    [retiring] = [figures for figures in scaler.view().towers if figures.name == "h1"]
    assert retiring.retiring and retiring.used >= 1
    scale = policy()
    scale.decide(scaler.view())
    assert actions(scale.decide(view(1000, scaler.view().towers))) == []
