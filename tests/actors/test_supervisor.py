"""Supervisors with Erlang/OTP semantics, on trio's virtual clock."""

import contextlib
import gc
import math
import weakref

import pytest
import trio

from actors import (
    Actor,
    ActorCrashed,
    ActorState,
    Backoff,
    ChildSpec,
    Down,
    ExitKind,
    Restart,
    SYSTEM_SHUTDOWN,
    Exit,
    RestartIntensityExceeded,
    Strategy,
    Supervisor,
    SupervisorFlags,
    open_system,
)

from .conftest import Recorder, recorder


def supervisor_spec(name, children, **flags) -> ChildSpec:
    return ChildSpec(name, lambda: Supervisor(children, SupervisorFlags(**flags)))


def events(log, kind):
    return [name for name, event in log if event == kind]


async def test_children_start_in_order_and_stop_in_reverse(autojump_clock, system, log):
    children = [recorder(name, log) for name in "abc"]
    group = await system.spawn(supervisor_spec("group", children))
    assert events(log, "started") == ["a", "b", "c"]
    await system.root.terminate_child("group")
    assert events(log, "stopping:shutdown") == ["c", "b", "a"]
    assert not group.alive
    assert system.lookup("/test/group/a") is None


async def test_one_for_one_restarts_only_the_failed_child(autojump_clock, system, log):
    children = [recorder(name, log) for name in "abc"]
    await system.spawn(supervisor_spec("group", children, intensity=5))
    await system.lookup("/test/group/b").tell("crash")
    await trio.sleep(1)
    assert events(log, "started") == ["a", "b", "c", "b"]
    assert events(log, "stopping:shutdown") == []


async def test_one_for_all_restarts_every_child_in_order(autojump_clock, system, log):
    children = [recorder(name, log) for name in "abc"]
    await system.spawn(
        supervisor_spec("group", children, strategy=Strategy.ONE_FOR_ALL, intensity=5)
    )
    log.clear()
    await system.lookup("/test/group/b").tell("crash")
    await trio.sleep(1)
    assert events(log, "stopping:shutdown") == ["c", "a"]
    assert events(log, "started") == ["a", "b", "c"]


async def test_rest_for_one_restarts_the_failed_child_and_those_after_it(
    autojump_clock, system, log
):
    children = [recorder(name, log) for name in "abcd"]
    await system.spawn(
        supervisor_spec("group", children, strategy=Strategy.REST_FOR_ONE, intensity=5)
    )
    log.clear()
    await system.lookup("/test/group/b").tell("crash")
    await trio.sleep(1)
    assert events(log, "stopping:shutdown") == ["d", "c"]
    assert events(log, "started") == ["b", "c", "d"]


async def test_a_group_restart_stops_at_a_child_that_fails_to_start(autojump_clock, system):
    log = []
    fail_next_start = []

    class Needed(Recorder):
        async def started(self):
            if fail_next_start:
                fail_next_start.pop()
                raise RuntimeError("cannot start")
            await super().started()

    children = [recorder("a", log), ChildSpec("b", lambda: Needed(log, "b")), recorder("c", log)]
    await system.spawn(
        supervisor_spec("group", children, strategy=Strategy.REST_FOR_ONE, intensity=5)
    )
    log.clear()
    fail_next_start.append(True)
    await system.lookup("/test/group/a").tell("crash")
    await trio.sleep(1)
    # c depends on b: it waits for b's own restart instead of starting without it.
    assert events(log, "started") == ["a", "b", "c"]


@pytest.mark.parametrize("operation", ["restart_child", "terminate_child"])
async def test_an_operators_hand_on_the_member_a_group_restart_stopped_at_resumes_it(
        autojump_clock, system, operation):
    # The group restart waited for that member's exit, which the operation took over:
    # those after it stayed down for good.
    starts = []

    class SlowToFailOnce(Actor):
        async def started(self):
            starts.append(trio.current_time())
            if len(starts) == 2:  # its start with the group
                await trio.sleep(1)
                raise RuntimeError("cannot start now")

        async def receive(self, message):
            raise RuntimeError("crash")

    group = await system.spawn(supervisor_spec(
        "group", [ChildSpec("a", SlowToFailOnce), ChildSpec("b", Actor), ChildSpec("c", Actor)],
        strategy=Strategy.REST_FOR_ONE, intensity=10))
    await system.lookup("/test/group/a").tell("crash")
    await trio.sleep(0.5)  # a's start with the group is under way
    with contextlib.suppress(ActorCrashed):
        await getattr(group, operation)("a")
    await trio.sleep(10)
    states = {child.name: child.state for child in group.which_children()}
    assert states["b"] is states["c"] is ActorState.RUNNING


async def test_temporary_siblings_are_not_restarted_with_the_group(autojump_clock, system, log):
    children = [recorder("a", log), recorder("temporary", log, restart=Restart.TEMPORARY)]
    group = await system.spawn(
        supervisor_spec("group", children, strategy=Strategy.ONE_FOR_ALL, intensity=5)
    )
    await system.lookup("/test/group/a").tell("crash")
    await trio.sleep(1)
    assert [child.name for child in group.which_children()] == ["a"]


async def test_transient_child_ending_normally_is_removed(autojump_clock, system, log):
    ref = await system.spawn(recorder("t", log, restart=Restart.TRANSIENT))
    await ref.tell("stop")
    assert (await ref.join()).kind is ExitKind.NORMAL
    assert [child.name for child in system.root.which_children()] == []


async def test_permanent_child_ending_normally_is_restarted(autojump_clock, system, log):
    ref = await system.spawn(recorder("p", log))
    await ref.tell("stop")
    await trio.sleep(1)
    assert ref.alive and ref.snapshot().restarts == 1


async def test_exceeding_the_intensity_escalates_to_the_parent(autojump_clock, system, log):
    group = await system.spawn(
        ChildSpec(
            "group",
            lambda: Supervisor([recorder("worker", log)], SupervisorFlags(intensity=2, period=5)),
            restart=Restart.TEMPORARY,
        )
    )
    worker = system.lookup("/test/group/worker")
    for _ in range(3):
        await worker.tell("crash")
        await trio.sleep(0.1)
    exit = await group.join()
    assert exit.kind is ExitKind.CRASHED
    assert isinstance(exit.error, RestartIntensityExceeded)
    assert "more than 2 restart(s) within 5 s" in str(exit.error)
    assert not worker.alive
    assert system.lookup("/test/group/worker") is None


async def test_an_escalated_supervisor_is_restarted_with_fresh_children(
    autojump_clock, system, log
):
    group = await system.spawn(
        ChildSpec(
            "group",
            lambda: Supervisor([recorder("worker", log)], SupervisorFlags(intensity=0)),
        )
    )
    worker = system.lookup("/test/group/worker")
    await worker.tell("crash")
    await trio.sleep(1)
    assert group.alive and group.snapshot().restarts == 1
    assert not worker.alive
    fresh = system.lookup("/test/group/worker")
    assert fresh is not None and fresh != worker
    assert await fresh.ask("hello") == "hello"


async def test_restarts_spread_beyond_the_period_are_fine(autojump_clock, system, log):
    group = await system.spawn(
        supervisor_spec("group", [recorder("worker", log)], intensity=1, period=5)
    )
    for _ in range(5):
        await system.lookup("/test/group/worker").tell("crash")
        await trio.sleep(6)
    assert group.alive
    assert system.lookup("/test/group/worker").snapshot().restarts == 5


class Failing(Actor):
    """Fails on every message; records when each incarnation started and crashed."""

    def __init__(self, starts: list, crashes: list) -> None:
        self.starts = starts
        self.crashes = crashes

    async def started(self):
        self.starts.append(trio.current_time())

    async def receive(self, message):
        self.crashes.append(trio.current_time())
        raise RuntimeError("fails")


async def waits_between_crash_and_restart(system, backoff, pauses) -> list[float]:
    starts, crashes = [], []
    child = ChildSpec("failing", lambda: Failing(starts, crashes))
    await system.spawn(supervisor_spec("group", [child], intensity=100, period=60, backoff=backoff))
    failing = system.lookup("/test/group/failing")
    for pause in pauses:
        await failing.tell("go")
        await trio.sleep(pause)
    return [start - crash for crash, start in zip(crashes, starts[1:])]


async def test_backoff_waits_exponentially_on_the_virtual_clock(autojump_clock, system):
    backoff = Backoff(initial=1.0, maximum=4.0, multiplier=2.0, jitter=0.0, reset_after=60)
    waits = await waits_between_crash_and_restart(system, backoff, [10] * 5)
    assert waits == pytest.approx([1.0, 2.0, 4.0, 4.0, 4.0])


async def test_backoff_starts_over_after_a_long_run(autojump_clock, system):
    backoff = Backoff(initial=1.0, maximum=4.0, jitter=0.0, reset_after=30)
    waits = await waits_between_crash_and_restart(system, backoff, [5, 5, 40, 5])
    assert waits == pytest.approx([1.0, 2.0, 4.0, 1.0])


async def test_backoff_jitter_spreads_restarts_within_bounds(autojump_clock, system):
    backoff = Backoff(initial=1.0, maximum=100.0, multiplier=1.0, jitter=0.5, reset_after=60)
    waits = await waits_between_crash_and_restart(system, backoff, [10] * 20)
    assert all(1.0 <= wait <= 1.5 for wait in waits)
    assert len({round(wait, 6) for wait in waits}) > 1


async def test_a_child_in_backoff_is_shown_restarting(autojump_clock, system, log):
    backoff = Backoff(initial=30.0, maximum=30.0, jitter=0.0)
    await system.spawn(
        supervisor_spec("group", [recorder("w", log)], intensity=5, backoff=backoff)
    )
    worker = system.lookup("/test/group/w")
    await worker.tell("crash")
    await trio.sleep(1)
    assert worker.snapshot().state is ActorState.RESTARTING
    assert worker.snapshot().restart_in == pytest.approx(29.0)
    await trio.sleep(30)
    assert worker.snapshot().state is ActorState.RUNNING
    assert worker.snapshot().restart_in is None
    assert await worker.ask("back") == "back"


async def group_in_backoff(system, log, children, strategy: Strategy, backoff: float):
    """A group under ``strategy`` whose restarts wait ``backoff`` seconds; the log cleared
    of its starts."""
    group = await system.spawn(supervisor_spec(
        "group", children, strategy=strategy, intensity=5,
        backoff=Backoff(initial=backoff, maximum=backoff, jitter=0.0)))
    log.clear()
    return group


async def test_a_group_in_backoff_leaves_its_supervisor_free(autojump_clock, system, log):
    children = [recorder(name, log) for name in "abc"]
    group = await group_in_backoff(system, log, children, Strategy.ONE_FOR_ALL, 20.0)
    await system.lookup("/test/group/b").tell("crash")
    await trio.sleep(1)
    assert [child.restart_in for child in group.which_children()] == [19.0, 19.0, 19.0]
    # Control calls are answered during the backoff, not after it.
    with trio.fail_after(1):
        await group.terminate_child("c")
    await trio.sleep(20)
    assert events(log, "started") == ["a", "b"]


async def test_a_group_in_backoff_with_a_temporary_member_restarts_the_others(
    autojump_clock, system, log
):
    children = [recorder("a", log), recorder("b", log, restart=Restart.TEMPORARY)]
    group = await group_in_backoff(system, log, children, Strategy.ONE_FOR_ALL, 1.0)
    await system.lookup("/test/group/a").tell("crash")
    await trio.sleep(5)
    assert group.alive and group.snapshot().restarts == 0
    assert [child.name for child in group.which_children()] == ["a"]
    assert events(log, "started") == ["a"]


async def test_overlapping_group_restarts_start_their_members_in_order(
    autojump_clock, system, log
):
    # b fails, then a during b's backoff: c depends on b, b on a, so a comes first.
    children = [recorder(name, log) for name in "abc"]
    await group_in_backoff(system, log, children, Strategy.REST_FOR_ONE, 1.0)
    await system.lookup("/test/group/b").tell("crash")
    await trio.sleep(0.5)
    await system.lookup("/test/group/a").tell("crash")
    await trio.sleep(5)
    assert events(log, "started") == ["a", "b", "c"]


async def test_a_member_restarted_by_hand_during_its_groups_backoff(autojump_clock, system, log):
    children = [recorder("a", log), recorder("b", log)]
    group = await group_in_backoff(system, log, children, Strategy.ONE_FOR_ALL, 10.0)
    await system.lookup("/test/group/a").tell("crash")
    await trio.sleep(1)
    await group.restart_child("b")
    await trio.sleep(20)
    assert [(child.state, child.restart_in) for child in group.which_children()] == [
        (ActorState.RUNNING, None), (ActorState.RUNNING, None)]
    assert events(log, "started") == ["b", "a"]


async def test_a_child_in_backoff_can_be_terminated(autojump_clock, system, log):
    backoff = Backoff(initial=30.0, maximum=30.0, jitter=0.0)
    group = await system.spawn(
        supervisor_spec("group", [recorder("w", log)], intensity=5, backoff=backoff)
    )
    await system.lookup("/test/group/w").tell("crash")
    await trio.sleep(1)
    exit = await group.terminate_child("w")
    assert exit.kind is ExitKind.SHUTDOWN


class Witness(Actor):
    """Keeps the exit its ``stopping`` was given."""

    def __init__(self, exits: dict[str, Exit], name: str) -> None:
        self.exits = exits
        self.name = name

    async def receive(self, message):
        raise RuntimeError(message)

    async def stopping(self, exit: Exit) -> None:
        self.exits[self.name] = exit


async def test_an_ordered_stop_says_why_down_the_tree(autojump_clock):
    exits: dict[str, Exit] = {}

    def witness(name: str) -> ChildSpec:
        return ChildSpec(name, lambda: Witness(exits, name))

    async with open_system("test") as system:
        inner = supervisor_spec("inner", [witness("deep")])
        group = await system.spawn(supervisor_spec(
            "group", [witness("a"), inner, witness("b")], strategy=Strategy.REST_FOR_ONE,
            intensity=5,
        ))
        await group.restart_child("b")
        assert str(exits.pop("b")) == "shutdown: restarted on request"
        await group.terminate_child("inner")
        assert str(exits.pop("deep")) == "shutdown: terminated on request"
        await group.start_child(inner)
        await system.lookup("/test/group/a").tell("crash")
        await trio.sleep(1)
        # rest_for_one: those after it stop too, saying with which one, in reverse order.
        assert [(name, str(exit)) for name, exit in exits.items()] == [
            ("a", "crashed: RuntimeError('crash')"),
            ("deep", "shutdown: restarted with /test/group/a"),
            ("b", "shutdown: restarted with /test/group/a"),
        ]
        exits.clear()
    assert exits == {"b": SYSTEM_SHUTDOWN, "deep": SYSTEM_SHUTDOWN, "a": SYSTEM_SHUTDOWN}


class Stubborn(Actor):
    """Ignores stop requests while handling a message; optionally ignores cancellation."""

    def __init__(self, shielded: bool) -> None:
        self.shielded = shielded

    async def receive(self, message):
        with trio.CancelScope(shield=self.shielded):
            await trio.sleep(3600)


async def test_shutdown_deadline_then_cancel(autojump_clock, system):
    ref = await system.spawn(ChildSpec("stubborn", lambda: Stubborn(False), shutdown=2.0))
    await ref.tell("busy")
    await trio.sleep(0.1)
    start = trio.current_time()
    exit = await system.root.terminate_child("stubborn")
    assert exit.kind is ExitKind.KILLED
    assert "missed its shutdown deadline of 2 s" in exit.detail
    assert trio.current_time() - start == pytest.approx(2.0, abs=0.01)


async def test_brutal_kill_with_shutdown_zero(autojump_clock, system):
    ref = await system.spawn(ChildSpec("stubborn", lambda: Stubborn(False), shutdown=0))
    await ref.tell("busy")
    await trio.sleep(0.1)
    start = trio.current_time()
    exit = await system.root.terminate_child("stubborn")
    assert exit.kind is ExitKind.KILLED
    assert trio.current_time() - start < 0.01


async def test_a_child_ignoring_cancellation_is_abandoned(autojump_clock, system):
    ref = await system.spawn(ChildSpec("stubborn", lambda: Stubborn(True), shutdown=1.0))
    await ref.tell("busy")
    await trio.sleep(0.1)
    exit = await system.root.terminate_child("stubborn")
    assert exit.kind is ExitKind.KILLED
    assert "abandoned" in exit.detail
    assert not ref.alive


async def test_dynamic_children_come_and_go(autojump_clock, system, log):
    sessions = await system.spawn(supervisor_spec("sessions", []))
    refs = [await sessions.start_child(recorder(f"s{n}", log)) for n in range(10)]
    assert [ref.path for ref in refs] == [f"/test/sessions/s{n}" for n in range(10)]
    for ref in refs[::2]:
        await sessions.terminate_child(ref.path.rsplit("/", 1)[1])
    assert [child.name for child in sessions.which_children()] == ["s1", "s3", "s5", "s7", "s9"]
    assert system.statistics().actors == 1 + 1 + 5


async def test_start_child_refuses_duplicates_and_unknown_names(autojump_clock, system, log):
    await system.spawn(recorder("a", log))
    with pytest.raises(ValueError, match="already has a child named 'a'"):
        await system.spawn(recorder("a", log))
    with pytest.raises(LookupError):
        await system.root.terminate_child("nobody")
    with pytest.raises(LookupError):
        await system.root.restart_child("nobody")
    with pytest.raises(TypeError):
        await system.root.start_child("not a spec")
    assert system.root.alive


async def test_restart_child_starts_a_fresh_incarnation(autojump_clock, system, log):
    ref = await system.spawn(recorder("a", log))
    again = await system.root.restart_child("a")
    assert again is ref
    assert events(log, "started") == ["a", "a"]
    assert events(log, "stopping:shutdown") == ["a"]
    assert ref.snapshot().restarts == 1


async def test_supervisor_snapshot_shows_the_tree(autojump_clock, system, log):
    await system.spawn(
        supervisor_spec("group", [recorder("a", log), recorder("b", log)], intensity=3)
    )
    tree = system.snapshot()
    assert [node.path for node in tree.walk()] == [
        "/test",
        "/test/group",
        "/test/group/a",
        "/test/group/b",
    ]
    group = tree.children[0]
    assert group.kind == "supervisor"
    assert group.supervisor.strategy == "one_for_one"
    assert group.supervisor.intensity == 3


async def test_a_supervisor_that_cannot_start_its_children_fails_to_start(
    autojump_clock, system
):
    class Broken(Actor):
        async def started(self):
            raise ValueError("broken child")

    log = []
    with pytest.raises(ActorCrashed):
        await system.spawn(
            supervisor_spec("group", [recorder("first", log), ChildSpec("broken", Broken)])
        )
    # The child that had started was stopped again, in order.
    assert events(log, "stopping:shutdown") == ["first"]
    assert system.lookup("/test/group/first") is None


async def test_a_supervisor_whose_children_did_not_start_still_runs_its_stopping(
    autojump_clock, system
):
    class Broken(Actor):
        async def started(self):
            raise ValueError("broken child")

    class Watched(Supervisor):
        async def stopping(self, exit):
            log.append(("stopping", exit.kind))

        def release(self, exit):
            log.append(("release", exit.kind))

    log = []
    with pytest.raises(ActorCrashed):
        await system.spawn(ChildSpec("group", lambda: Watched([ChildSpec("broken", Broken)])))
    assert log == [("stopping", ExitKind.CRASHED), ("release", ExitKind.CRASHED)]


async def test_supervisor_shutdown_waits_for_grandchildren(autojump_clock, system, log):
    inner = supervisor_spec("inner", [recorder("leaf", log)])
    await system.spawn(supervisor_spec("outer", [inner]))
    await system.root.terminate_child("outer")
    assert events(log, "stopping:shutdown") == ["leaf"]
    assert system.statistics().actors == 1


@pytest.mark.parametrize("how", ["stopped", "crashed"])
async def test_a_supervisors_stopping_runs_after_its_children_stopped(
    autojump_clock, system, log, how
):
    class Parent(Supervisor):
        async def receive(self, message):
            raise RuntimeError("parent asked to crash")

        async def stopping(self, exit):
            still = [name for name in "ab" if system.lookup(f"/test/parent/{name}")]
            log.append(("parent", f"stopping:{exit.kind.value}", still))

    children = [recorder(name, log) for name in "ab"]
    await system.spawn(ChildSpec("parent", lambda: Parent(children), Restart.TEMPORARY))
    if how == "stopped":
        await system.root.terminate_child("parent")
        expected = ("parent", "stopping:shutdown", [])
    else:
        await system.lookup("/test/parent").tell("crash")
        await trio.sleep(1)
        expected = ("parent", "stopping:crashed", [])
    assert log[-3:] == [("b", "stopping:shutdown"), ("a", "stopping:shutdown"), expected]


@pytest.mark.parametrize("chained", ["context", "group"])
async def test_an_ended_actors_error_does_not_keep_the_actor(autojump_clock, system, chained):
    """Its exit lives on in its ref and in ``Down``; the frames its error went through
    held the actor, and all it held, for as long."""
    made = []

    class Holding(Actor):
        def __init__(self):
            self.held = bytearray(1000)
            made.append(weakref.ref(self))

        def look_up(self):
            raise KeyError("first")  # this frame is in the crash's context only

        async def receive(self, message):
            try:
                self.look_up()
            except KeyError as error:
                if chained == "context":
                    raise RuntimeError("crashed") from None
                failure = error
            raise ExceptionGroup("crashed", [failure])

    downs = []

    class Watcher(Actor):
        async def receive(self, message):
            if isinstance(message, Down):
                downs.append(message)
            else:
                self.monitor(message)

    watcher = await system.spawn(ChildSpec("watcher", Watcher))
    ref = await system.spawn(ChildSpec("holding", Holding, Restart.TEMPORARY))
    await watcher.ask(ref)
    await ref.tell("crash")
    await trio.sleep(1)
    gc.collect()
    assert [down.exit.kind for down in downs] == [ExitKind.CRASHED]
    assert not ref.alive
    assert made[0]() is None


@pytest.mark.parametrize("unwrapped", [False, True])
async def test_an_askers_crash_leaves_the_crashed_actor_it_asked_to_end_in_its_time(
    autojump_clock, system, unwrapped
):
    """The asker's error is raised from the other's (or is the other's), whose runner is
    still in its ``stopping``: letting go of the asker's error must not touch the
    other's frames (clearing them ended that runner, and the system with it)."""
    log = []

    class Slow(Actor):
        async def receive(self, message):
            raise RuntimeError("asked to crash")

        async def stopping(self, exit):
            await trio.sleep(1)
            log.append(("stopped", exit.kind))

    class Asker(Actor):
        async def receive(self, message):
            try:
                await message.ask("crash")
            except ActorCrashed as crashed:
                if unwrapped:
                    raise crashed.error from None
                raise

    slow = await system.spawn(ChildSpec("slow", Slow, Restart.TEMPORARY))
    asker = await system.spawn(ChildSpec("asker", Asker, Restart.TEMPORARY))
    await asker.tell(slow)
    await trio.sleep(0.5)
    assert not asker.alive and log == []
    await trio.sleep(1)
    assert log == [("stopped", ExitKind.CRASHED)]


@pytest.mark.parametrize("how", ["raised again", "raised while handling it"])
async def test_an_error_kept_by_a_task_that_runs_on_is_raised_elsewhere_safely(
    autojump_clock, system, how
):
    """An error caught in a task that goes on running, handed to another actor that
    crashes with it: its traceback holds the task's frame, still running."""
    kept, log = [], []

    class Keeper(Actor):
        runs_tasks = True

        async def started(self):
            self.start_soon(self.keep)

        async def keep(self):
            try:
                raise ValueError("remembered")
            except ValueError as error:
                kept.append(error)
            await trio.sleep(5)
            log.append("the keeper's task went on")

    class Raiser(Actor):
        async def receive(self, message):
            if how == "raised again":
                raise kept[0]
            try:
                raise kept[0]
            except ValueError:
                raise RuntimeError("while handling the kept one") from None

    keeper = await system.spawn(ChildSpec("keeper", Keeper))
    raiser = await system.spawn(ChildSpec("raiser", Raiser, Restart.TEMPORARY))
    await trio.sleep(0.1)
    await raiser.tell("go")
    await trio.sleep(10)
    assert log == ["the keeper's task went on"]
    assert keeper.snapshot().restarts == 0 and not raiser.alive


async def test_supervisor_default_shutdown_is_infinite(autojump_clock, system):
    ref = await system.spawn(supervisor_spec("group", []))
    assert ref._cell.shutdown_deadline() == math.inf
    worker = await system.spawn(ChildSpec("worker", Recorder))
    assert worker._cell.shutdown_deadline() == 5.0


class Mover(Supervisor):
    """Moves its child somewhere else once, then lets it go."""

    def __init__(self, log, children, flags) -> None:
        super().__init__(children, flags)
        self.log = log
        self.moves = 0

    async def escalate(self, child, exit) -> bool:
        self.moves += 1
        self.log.append(("escalated", child, exit.kind.value))
        return self.moves == 1


async def test_escalate_lets_a_subclass_restart_under_a_fresh_window_or_give_up(
    autojump_clock, system, log
):
    flags = SupervisorFlags(intensity=1, period=60)
    spec = ChildSpec("mover", lambda: Mover(log, [recorder("w", log)], flags))
    mover = await system.spawn(spec)
    worker = system.lookup(mover.path + "/w")
    for _ in range(2):
        await worker.tell("crash")
        await trio.sleep(1)
    assert ("escalated", "w", "crashed") in log
    assert mover.snapshot().children[0].restarts == 2
    for _ in range(2):
        await worker.tell("crash")
        await trio.sleep(1)
    escalations = [entry for entry in log if entry[0] == "escalated"]
    assert escalations == [("escalated", "w", "crashed")] * 2
    assert mover.alive and mover.snapshot().children == ()


async def test_a_stray_message_to_a_plain_supervisor_is_logged_and_ignored(
    autojump_clock, system, log, caplog
):
    group = await system.spawn(supervisor_spec("group", [recorder("w", log)]))
    await group.tell("hello")
    await system.root.tell("hello")
    assert await group.ask("hello") is None
    await trio.sleep(1)
    assert group.alive and system.root.alive
    assert group.snapshot().restarts == 0
    assert events(log, "started") == ["w"]
    assert "/test/group ignored an unexpected str" in caplog.text
    assert "/test ignored an unexpected str" in caplog.text


class GivesUpOnOne(Supervisor):
    """Restarts its children all together; leaves one that fails too often behind."""

    def __init__(self, children) -> None:
        super().__init__(children, SupervisorFlags(strategy=Strategy.ONE_FOR_ALL, intensity=1))

    async def escalate(self, child, exit) -> bool:
        return False


async def test_given_up_on_while_its_group_restarts_the_rest_still_start(
    autojump_clock, system, log
):
    starts = []

    class StartsOnce(Recorder):
        async def started(self) -> None:
            starts.append(self.name)
            if starts.count(self.name) > 1:
                raise RuntimeError("cannot start again")

    children = [
        recorder("a", log), ChildSpec("b", lambda: StartsOnce(log, "b")), recorder("c", log)
    ]
    group = await system.spawn(ChildSpec("group", lambda: GivesUpOnOne(children)))
    await system.lookup("/test/group/b").tell("crash")
    await trio.sleep(1)
    states = {child.name: child.state for child in group.snapshot().children}
    assert states == {"a": ActorState.RUNNING, "c": ActorState.RUNNING}
    assert events(log, "started") == ["a", "c", "a", "c"]


class Ticker(Actor):
    runs_tasks = True

    def __init__(self, log) -> None:
        self.log = log

    async def started(self) -> None:
        self.start_soon(self.tick)

    async def tick(self) -> None:
        for count in range(3):
            await trio.sleep(1)
            self.log.append(("tick", count))
        raise RuntimeError("the ticker broke")

    async def receive(self, message):
        self.log.append(message)


async def test_a_task_runs_with_its_incarnation_and_its_failure_crashes_the_actor(
    autojump_clock, system, log
):
    ticker = await system.spawn(ChildSpec("ticker", lambda: Ticker(log), restart=Restart.TEMPORARY))
    await ticker.tell("hello")
    exit = await ticker.join()
    assert exit.kind is ExitKind.CRASHED and str(exit.error) == "the ticker broke"
    assert log == ["hello", ("tick", 0), ("tick", 1), ("tick", 2)]


async def test_tasks_end_with_the_incarnation(autojump_clock, system, log):
    ticker = await system.spawn(ChildSpec("ticker", lambda: Ticker(log), restart=Restart.TEMPORARY))
    await trio.sleep(1.5)
    ticker.kill("enough")
    await ticker.join()
    await trio.sleep(10)
    assert log == [("tick", 0)]


class Closer(Actor):
    """Starts a task that uses its resource, then stops at once."""

    runs_tasks = True

    def __init__(self, log) -> None:
        self.log = log
        self.open = True

    async def receive(self, message):
        self.start_soon(self.use)
        self.stop()

    async def use(self) -> None:
        self.log.append(("used", self.open))

    async def stopping(self, exit) -> None:
        self.open = False


async def test_a_task_not_yet_run_when_its_incarnation_ends_never_runs(
    autojump_clock, system, log
):
    closer = await system.spawn(ChildSpec("closer", lambda: Closer(log), Restart.TEMPORARY))
    await closer.tell("go")
    await closer.join()
    await trio.sleep(1)
    assert log == []


@pytest.mark.parametrize("had_a_task", [False, True])
async def test_a_task_started_from_stopping_never_runs(autojump_clock, system, had_a_task):
    ran = []

    class Late(Actor):
        runs_tasks = True

        async def started(self) -> None:
            if had_a_task:
                self.start_soon(trio.sleep_forever)

        async def receive(self, message):
            self.stop()

        async def stopping(self, exit) -> None:
            self.start_soon(trio.to_thread.run_sync, ran.append, "ran")
            await trio.sleep(0.1)

    late = await system.spawn(ChildSpec("late", Late, Restart.TEMPORARY))
    await late.tell("go")
    assert (await late.join()).kind is ExitKind.NORMAL
    await trio.sleep(1)
    assert ran == []


class Reader(Actor):
    """Stops from its own task, as a reader at the end of its stream does."""

    runs_tasks = True

    async def started(self) -> None:
        self.start_soon(self.read)

    async def read(self) -> None:
        await trio.sleep(1)
        self.stop()


async def test_stop_from_a_task_ends_an_actor_waiting_for_mail(autojump_clock, system):
    reader = await system.spawn(ChildSpec("reader", Reader, Restart.TEMPORARY))
    with trio.fail_after(2):
        assert (await reader.join()).kind is ExitKind.NORMAL


async def test_errors_after_a_crash_are_logged_not_lost(autojump_clock, system, caplog):
    class Leaky(Actor):
        async def receive(self, message):
            raise RuntimeError("the crash")

        async def stopping(self, exit):
            raise OSError("stopping failed")

        def release(self, exit):
            raise KeyError("release failed")

    leaky = await system.spawn(ChildSpec("leaky", Leaky, Restart.TEMPORARY))
    await leaky.tell("go")
    exit = await leaky.join()
    assert str(exit) == "crashed: RuntimeError('the crash')"
    logged = [record.getMessage() for record in caplog.records]
    late = "/test/leaky: {} raised after its end was decided: {}"
    assert late.format("stopping", "OSError('stopping failed')") in logged
    assert late.format("release", "KeyError('release failed')") in logged


async def test_start_soon_needs_runs_tasks(autojump_clock, system, log):
    class Plain(Actor):
        async def receive(self, message):
            self.start_soon(trio.sleep, 1)

    plain = await system.spawn(ChildSpec("plain", Plain, restart=Restart.TEMPORARY))
    with pytest.raises(ActorCrashed, match="runs_tasks"):
        await plain.ask("go")


class Forgetful(Supervisor):
    async def receive(self, message):
        if message == "forget":
            self.forget_restarts()


async def test_forget_restarts_gives_a_fresh_restart_window(autojump_clock, system, log):
    flags = SupervisorFlags(intensity=1, period=60)
    spec = ChildSpec(
        "forgetful", lambda: Forgetful([recorder("w", log)], flags), restart=Restart.TEMPORARY
    )
    forgetful = await system.spawn(spec)
    worker = system.lookup(forgetful.path + "/w")
    for _ in range(3):
        await worker.tell("crash")
        await trio.sleep(1)
        await forgetful.tell("forget")
        await trio.sleep(1)
    assert forgetful.alive and forgetful.snapshot().children[0].restarts == 3
    await worker.tell("crash")
    await trio.sleep(1)
    await worker.tell("crash")
    await trio.sleep(1)
    exit = await forgetful.join()
    assert isinstance(exit.error, RestartIntensityExceeded)


class Listener(Actor):
    runs_tasks = True

    def __init__(self, log, fail_before_ready=False) -> None:
        self.log = log
        self.fail_before_ready = fail_before_ready

    async def started(self) -> None:
        self.port = await self.start(self.listen)
        self.log.append(("listening", self.port))

    async def listen(self, task_status) -> None:
        await trio.sleep(1)
        if self.fail_before_ready:
            raise OSError("address already in use")
        task_status.started(8443)
        try:
            await trio.sleep_forever()
        finally:
            self.log.append("task ended")

    async def receive(self, message):
        return self.port

    async def stopping(self, exit) -> None:
        self.log.append("stopping")


async def test_start_returns_what_the_task_reports_and_tasks_end_before_stopping(
    autojump_clock, system, log
):
    listener = await system.spawn(
        ChildSpec("listener", lambda: Listener(log), restart=Restart.TEMPORARY))
    assert await listener.ask("port") == 8443
    await system.root.terminate_child("listener")
    assert log == [("listening", 8443), "task ended", "stopping"]


async def test_a_task_failing_before_it_is_ready_fails_the_start(autojump_clock, system, log):
    with pytest.raises(ActorCrashed, match="address already in use"):
        await system.spawn(ChildSpec(
            "listener", lambda: Listener(log, fail_before_ready=True),
            restart=Restart.TEMPORARY))
    assert log == ["stopping"]
