"""The actor system: lookup, the registry, the root supervisor, shutdown."""

import pytest
import trio

from actors import (
    Actor,
    ActorCrashed,
    ActorState,
    ChildSpec,
    ExitKind,
    Restart,
    RestartIntensityExceeded,
    Supervisor,
    SupervisorFlags,
    open_system,
)

from .conftest import recorder


async def test_lookup_by_path_and_the_registry_forgets_the_dead(autojump_clock, system, log):
    ref = await system.spawn(recorder("r", log, restart=Restart.TEMPORARY))
    assert system.lookup("/test/r") is ref
    assert system.lookup("/test") is system.root
    assert system.lookup("/test/nobody") is None
    assert sorted(system.paths()) == ["/test", "/test/r"]
    await ref.tell("stop")
    await ref.join()
    assert system.lookup("/test/r") is None
    assert system.paths() == ["/test"]
    assert system.statistics().actors == 1


async def test_the_root_starts_its_children_in_order(autojump_clock, log):
    children = [recorder(name, log) for name in "abc"]
    async with open_system("app", children=children) as system:
        assert [child.path for child in system.root.which_children()] == [
            "/app/a",
            "/app/b",
            "/app/c",
        ]
    assert [name for name, event in log if event == "stopping:shutdown"] == ["c", "b", "a"]


async def test_a_child_failing_to_start_fails_open_system(autojump_clock):
    class Broken(Actor):
        async def started(self):
            raise ValueError("cannot start")

    with pytest.raises(ActorCrashed):
        async with open_system("app", children=[ChildSpec("broken", Broken)]):
            pytest.fail("the body must not run")


async def test_root_failure_cancels_the_body_and_raises(autojump_clock, log):
    reached_the_end = False
    with pytest.raises(RestartIntensityExceeded):
        async with open_system(
            "app", children=[recorder("w", log)], flags=SupervisorFlags(intensity=0)
        ) as system:
            await system.lookup("/app/w").tell("crash")
            await trio.sleep(3600)
            reached_the_end = True
    assert not reached_the_end


async def test_an_error_in_the_body_comes_out_as_itself_once_the_tree_stopped(
    autojump_clock, log
):
    with pytest.raises(ValueError, match="bad settings") as caught:
        async with open_system("app", children=[recorder(n, log) for n in "ab"]):
            raise ValueError("bad settings")
    assert type(caught.value) is ValueError
    assert [name for name, event in log if event == "stopping:shutdown"] == ["b", "a"]


async def test_cancelling_the_body_still_stops_the_tree_in_order(autojump_clock, log):
    with trio.move_on_after(5):
        async with open_system("app", children=[recorder(n, log) for n in "ab"]):
            await trio.sleep_forever()
    assert [name for name, event in log if event == "stopping:shutdown"] == ["b", "a"]


class SlowToStart(Actor):
    async def started(self) -> None:
        await trio.sleep(2)


@pytest.mark.parametrize("cancelled_at", [0.0, 1.0])
async def test_a_system_whose_start_is_cancelled_ends(autojump_clock, cancelled_at):
    # Ctrl-C while a child starts, or a start in a scope cancelled already: the root,
    # shielded from the start, never ended, nor did open_system.
    entered = False
    with trio.move_on_after(30) as guard:
        with trio.move_on_after(cancelled_at):
            async with open_system("app", children=[ChildSpec("slow", SlowToStart)]):
                entered = True
    assert not guard.cancelled_caught and not entered
    assert trio.current_time() == pytest.approx(cancelled_at)


async def test_shutdown_timeout_cancels_what_does_not_stop(autojump_clock):
    class Stubborn(Actor):
        async def receive(self, message):
            await trio.sleep_forever()

    start = trio.current_time()
    async with open_system(
        "app",
        children=[ChildSpec("s", Stubborn, shutdown=3600)],
        shutdown_timeout=2,
    ) as system:
        worker = system.lookup("/app/s")
        await worker.tell("busy")
        await trio.sleep(0)
    assert trio.current_time() - start == pytest.approx(2, abs=0.01)
    assert (await worker.join()).kind is ExitKind.KILLED


async def test_actors_can_tell_the_system_is_shutting_down_even_when_killed(autojump_clock):
    seen = []

    class Watcher(Actor):
        async def receive(self, message):
            seen.append(("receive", self.system.shutting_down))
            await trio.sleep_forever()

        def release(self, exit):
            seen.append((exit.kind.value, self.system.shutting_down))

    async with open_system(
        "app", children=[ChildSpec("w", Watcher, shutdown=3600)], shutdown_timeout=1,
    ) as system:
        assert not system.shutting_down
        await system.lookup("/app/w").tell("busy")
        await trio.sleep(0)
    assert system.shutting_down
    assert seen == [("receive", False), ("killed", True)]


async def test_snapshot_of_the_whole_tree(autojump_clock, system, log):
    await system.spawn(ChildSpec("group", lambda: Supervisor([recorder("leaf", log)])))
    tree = system.snapshot()
    assert tree.path == "/test" and tree.kind == "supervisor"
    assert [node.state for node in tree.walk()] == [ActorState.RUNNING] * 3


async def test_activity_has_each_live_actor_s_counters_as_its_snapshot_does(
    autojump_clock, system, log
):
    await system.spawn(ChildSpec("group", lambda: Supervisor([recorder("leaf", log)])))
    leaf = system.lookup("/test/group/leaf")
    await leaf.tell("crash")
    await trio.sleep(1)  # restarted
    await leaf.tell("hang")
    await leaf.tell("waiting")
    await trio.sleep(0)
    activity = {actor.path: actor for actor in system.activity()}
    snapshots = {actor.path: actor for actor in system.snapshot().walk()}
    assert activity.keys() == snapshots.keys() == {"/test", "/test/group", "/test/group/leaf"}
    for path, actor in activity.items():
        snapshot = snapshots[path]
        assert actor == (path, snapshot.state, snapshot.mailbox_depth,
                         snapshot.messages_handled, snapshot.messages_dropped, snapshot.restarts)
    assert (activity["/test/group/leaf"].restarts, activity["/test/group/leaf"].mailbox_depth) \
        == (1, 1)


async def test_a_snapshot_without_its_subtree_has_the_supervisor_but_no_children(
    autojump_clock, system, log
):
    group = await system.spawn(ChildSpec("group", lambda: Supervisor([recorder("leaf", log)])))
    alone = group.snapshot(depth=0)
    assert alone.children == () and alone.supervisor is not None
    assert alone.child_count == 1
    assert alone.supervisor == group.snapshot().supervisor
    assert [child.name for child in group.snapshot().children] == ["leaf"]


async def test_a_snapshot_takes_only_the_levels_and_children_asked_for(
    autojump_clock, system, log
):
    # A snapshot costs the broker's thread for every actor in it: the shell's tree shows
    # 50 children of each, and took every one of 50,000 actors to show them.
    inner = [ChildSpec(f"inner-{number}", lambda number=number: Supervisor(
        [recorder(f"leaf-{number}-{leaf}", log) for leaf in range(3)])) for number in range(4)]
    group = await system.spawn(ChildSpec("group", lambda: Supervisor(inner)))
    few = group.snapshot(depth=1, children=2)
    assert [child.name for child in few.children] == ["inner-0", "inner-1"]
    assert few.child_count == 4
    assert [(child.children, child.child_count) for child in few.children] == [((), 3)] * 2
    deep = group.snapshot(children=2)
    assert [len(child.children) for child in deep.children] == [2, 2]
    assert sum(1 for _ in group.snapshot().walk()) == 1 + 4 + 12
    assert [child.child_count for child in group.which_children()] == [3] * 4
    assert all(child.children == () for child in group.which_children())


def test_system_rejects_a_bad_name():
    async def main():
        async with open_system("a/b"):
            pass

    with pytest.raises(ValueError):
        trio.run(main)


async def test_statistics_count_what_a_snapshot_shows_without_taking_one(
    autojump_clock, system, log
):
    crashing = await system.spawn(recorder("crashing", log))
    busy = await system.spawn(recorder("busy", log))
    await crashing.tell("crash")
    await trio.sleep(1)  # restarted
    await busy.tell("hang")
    for number in range(3):
        await busy.tell(number)  # waiting behind the hung message
    await trio.sleep(0)
    actors = list(system.snapshot().walk())
    statistics = system.statistics()
    assert statistics.actors == len(actors) == 3
    assert statistics.restarts == sum(actor.restarts for actor in actors) == 1
    assert statistics.mailbox_depth_max == 3 and statistics.mailbox_depth_total == 3
    # A count that only goes up: an actor that ended takes none of it along.
    await system.root.terminate_child("crashing")
    assert system.statistics().restarts == 1
