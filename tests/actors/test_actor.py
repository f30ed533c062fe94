"""Actors and refs: tell, ask, overflow policies, monitors, kill, snapshots."""

import math

import pytest
import trio

from actors import (
    Actor,
    ActorCrashed,
    ActorState,
    ActorStopped,
    AskTimeout,
    ChildSpec,
    Down,
    ExitKind,
    MailboxFull,
    Overflow,
    Restart,
    Supervisor,
)

from .conftest import Recorder, recorder


async def test_tell_delivers_in_order(autojump_clock, system, log):
    ref = await system.spawn(recorder("r", log))
    for number in range(100):
        await ref.tell(number)
    assert await ref.ask("last") == "last"
    assert [message for name, message in log if isinstance(message, int)] == list(range(100))


async def test_ask_returns_what_receive_returns(autojump_clock, system, log):
    ref = await system.spawn(recorder("r", log))
    assert await ref.ask({"a": 1}) == {"a": 1}


async def test_ask_times_out_on_the_virtual_clock(autojump_clock, system, log):
    ref = await system.spawn(recorder("r", log))
    start = trio.current_time()
    with pytest.raises(AskTimeout) as caught:
        await ref.ask("hang", timeout=30)
    assert trio.current_time() - start == pytest.approx(30)
    assert caught.value.path == "/test/r"


async def test_crash_while_handling_an_ask_fails_that_ask_with_the_reason(autojump_clock, system, log):
    ref = await system.spawn(recorder("r", log))
    with pytest.raises(ActorCrashed) as caught:
        await ref.ask("crash")
    assert isinstance(caught.value.__cause__, RuntimeError)
    assert "asked to crash" in str(caught.value)
    # The permanent child is restarted and answers again through the same ref.
    assert await ref.ask("after") == "after"
    snapshot = ref.snapshot()
    assert snapshot.restarts == 1
    assert snapshot.last_failure.kind is ExitKind.CRASHED
    assert "RuntimeError" in snapshot.last_failure.traceback


async def test_messages_queued_behind_a_crash_survive_the_restart(autojump_clock, system, log):
    ref = await system.spawn(recorder("r", log))
    await ref.tell("crash")
    await ref.tell("kept")
    assert await ref.ask("ping") == "ping"
    assert ("r", "kept") in log


async def test_ask_to_an_actor_that_stopped_for_good(autojump_clock, system, log):
    ref = await system.spawn(recorder("r", log, restart=Restart.TEMPORARY))
    await ref.tell("stop")
    exit = await ref.join()
    assert exit.kind is ExitKind.NORMAL
    assert not ref.alive
    with pytest.raises(ActorStopped):
        await ref.ask("anyone?")
    await ref.tell("into the void")
    assert system.statistics().dead_letters == 1


async def test_pending_asks_fail_when_the_actor_ends_for_good(autojump_clock, system, log):
    ref = await system.spawn(recorder("r", log, restart=Restart.TEMPORARY))
    results = []

    async def asker():
        try:
            await ref.ask("queued", timeout=math.inf)
        except ActorStopped as error:
            results.append(error)

    async with trio.open_nursery() as nursery:
        await ref.tell("stop")
        nursery.start_soon(asker)
    assert len(results) == 1


class Slow(Actor):
    mailbox_capacity = 2

    def __init__(self, gate: trio.Event, handled: list) -> None:
        self.gate = gate
        self.handled = handled

    async def receive(self, message):
        await self.gate.wait()
        self.handled.append(message)


class SlowDropping(Slow):
    overflow = Overflow.DROP


class SlowFailing(Slow):
    overflow = Overflow.FAIL


async def test_backpressure_makes_tell_wait_for_room(autojump_clock, system):
    gate, handled = trio.Event(), []
    ref = await system.spawn(ChildSpec("slow", lambda: Slow(gate, handled)))
    for number in range(3):  # one being handled, two queued
        await ref.tell(number)
    with pytest.raises(MailboxFull):
        ref.tell_nowait(99)
    with trio.move_on_after(1) as waited:
        await ref.tell(3)
    assert waited.cancelled_caught
    async with trio.open_nursery() as nursery:
        nursery.start_soon(ref.tell, 3)
        await trio.sleep(1)
        gate.set()
    await ref.ask("sync", timeout=10)
    assert handled == [0, 1, 2, 3, "sync"]


async def test_drop_policy_drops_and_counts_tells_but_not_asks(autojump_clock, system):
    gate, handled = trio.Event(), []
    ref = await system.spawn(ChildSpec("slow", lambda: SlowDropping(gate, handled)))
    for number in range(5):
        await ref.tell(number)
    ref.tell_nowait(5)
    with pytest.raises(MailboxFull):
        await ref.ask("request")
    snapshot = ref.snapshot()
    assert snapshot.messages_dropped == 3
    assert snapshot.mailbox_depth == 2
    gate.set()
    await trio.sleep(1)
    assert handled == [0, 1, 2]


async def test_fail_policy_raises_to_the_sender(autojump_clock, system):
    gate, handled = trio.Event(), []
    ref = await system.spawn(ChildSpec("slow", lambda: SlowFailing(gate, handled)))
    for number in range(3):
        await ref.tell(number)
    with pytest.raises(MailboxFull) as caught:
        await ref.tell(3)
    assert caught.value.capacity == 2
    with pytest.raises(MailboxFull):
        ref.tell_nowait(3)


class Watcher(Actor):
    def __init__(self, downs: list) -> None:
        self.downs = downs

    async def receive(self, message):
        if isinstance(message, Down):
            self.downs.append(message)
            return None
        return self.monitor(message)


async def test_monitor_reports_the_end_for_good_with_its_reason(autojump_clock, system, log):
    downs = []
    watcher = await system.spawn(ChildSpec("watcher", lambda: Watcher(downs)))
    transient = await system.spawn(recorder("transient", log, restart=Restart.TRANSIENT))
    await watcher.ask(transient)
    transient.kill("first")  # abnormal: restarted, so not an end
    await trio.sleep(1)
    assert transient.alive and downs == []
    await transient.tell("crash")  # restarted again
    await transient.tell("stop")  # a normal end of a transient child is final
    await transient.join()
    await trio.sleep(1)
    assert [(down.ref, down.exit.kind) for down in downs] == [(transient, ExitKind.NORMAL)]


async def test_monitor_of_an_ended_actor_reports_at_once(autojump_clock, system, log):
    downs = []
    watcher = await system.spawn(ChildSpec("watcher", lambda: Watcher(downs)))
    temporary = await system.spawn(recorder("t", log, restart=Restart.TEMPORARY))
    await temporary.tell("crash")
    await temporary.join()
    await watcher.ask(temporary)
    await trio.sleep(1)
    assert downs[0].exit.kind is ExitKind.CRASHED


async def test_cancelled_monitor_reports_nothing(autojump_clock, system, log):
    downs = []
    watcher = await system.spawn(ChildSpec("watcher", lambda: Watcher(downs)))
    temporary = await system.spawn(recorder("t", log, restart=Restart.TEMPORARY))
    monitor = await watcher.ask(temporary)
    monitor.cancel()
    await temporary.tell("stop")
    await temporary.join()
    await trio.sleep(1)
    assert downs == []


async def test_kill_is_an_abnormal_end_with_the_reason(autojump_clock, system, log):
    ref = await system.spawn(recorder("r", log, restart=Restart.TRANSIENT))
    ref.kill("operator said so")
    await trio.sleep(1)
    snapshot = ref.snapshot()
    assert snapshot.restarts == 1
    assert snapshot.last_failure.kind is ExitKind.KILLED
    assert "operator said so" in snapshot.last_failure.reason
    assert snapshot.state is ActorState.RUNNING


class FailsToClose(Actor):
    """Handles a message in a nursery whose task raises as it is cancelled, as a
    resource whose close fails does."""

    async def receive(self, message):
        async def hold() -> None:
            try:
                await trio.sleep_forever()
            finally:
                raise OSError("close failed")

        async with trio.open_nursery() as nursery:
            nursery.start_soon(hold)
            await trio.sleep_forever()


@pytest.mark.parametrize("under_root", [True, False])
@pytest.mark.parametrize(("how", "reason"), [
    ("kill", "operator said so"),
    ("terminate", "missed its shutdown deadline of 1 s"),
])
async def test_an_error_while_a_cancellation_unwinds_disturbs_nobody_else(
    autojump_clock, system, log, caplog, under_root, how, reason
):
    parent = system.root if under_root else await system.spawn(ChildSpec("group", Supervisor))
    sibling = await parent.start_child(recorder("sibling", log))
    ref = await parent.start_child(
        ChildSpec("closing", FailsToClose, Restart.TEMPORARY, shutdown=1))
    await ref.tell("go")
    await trio.sleep(1)
    if how == "kill":
        ref.kill("operator said so")
        exit = await ref.join()
    else:
        exit = await parent.terminate_child("closing")
    assert exit.kind is ExitKind.KILLED and reason in str(exit)
    await trio.sleep(1)
    assert parent.alive and parent.snapshot().restarts == 0
    assert await sibling.ask("still here") == "still here"
    assert sibling.snapshot().restarts == 0
    assert "OSError('close failed')" in caplog.text


class WaitsOnItsTask(Actor):
    """Waits, in ``started`` or in ``receive``, for what its task never produces."""

    runs_tasks = True

    def __init__(self, wait_in_started: bool) -> None:
        self.wait_in_started = wait_in_started

    async def started(self) -> None:
        self.connected = trio.Event()
        self.start_soon(self.connect)
        if self.wait_in_started:
            await self.connected.wait()

    async def connect(self) -> None:
        await trio.sleep(1)
        raise ConnectionRefusedError("refused")

    async def receive(self, message):
        await self.connected.wait()
        return "connected"


async def test_a_task_failing_while_started_waits_on_it_fails_the_start(autojump_clock, system):
    with trio.fail_after(60), pytest.raises(ActorCrashed, match="refused") as caught:
        await system.spawn(ChildSpec("w", lambda: WaitsOnItsTask(True), Restart.TEMPORARY))
    assert isinstance(caught.value.__cause__, ConnectionRefusedError)
    assert system.lookup("/test/w") is None


async def test_a_task_failing_while_receive_waits_on_it_crashes_the_actor_at_once(
    autojump_clock, system
):
    ref = await system.spawn(ChildSpec("w", lambda: WaitsOnItsTask(False), Restart.TEMPORARY))
    with trio.fail_after(60):
        with pytest.raises(ActorCrashed, match="refused") as caught:
            await ref.ask("connect", timeout=math.inf)
        exit = await ref.join()
    assert isinstance(caught.value.__cause__, ConnectionRefusedError)
    assert exit.kind is ExitKind.CRASHED and isinstance(exit.error, ConnectionRefusedError)


class Holding(Actor):
    """Holds something others count for it, and says when its hooks run."""

    def __init__(self, seen: list) -> None:
        self.seen = seen

    async def receive(self, message):
        if message == "stop":
            self.stop()
        elif message == "crash":
            raise RuntimeError("asked to crash")

    async def finishing(self, exit):
        self.seen.append(("finishing", exit.kind))

    async def stopping(self, exit):
        self.seen.append(("stopping", exit.kind))

    def release(self, exit):
        self.seen.append(("release", exit.kind))


@pytest.mark.parametrize(("how", "hooks"), [
    ("stop", [("finishing", ExitKind.NORMAL), ("stopping", ExitKind.NORMAL),
              ("release", ExitKind.NORMAL)]),
    ("crash", [("stopping", ExitKind.CRASHED), ("release", ExitKind.CRASHED)]),
    ("kill", [("release", ExitKind.KILLED)]),
])
async def test_release_runs_last_however_the_incarnation_ended(autojump_clock, system, how, hooks):
    seen: list = []
    ref = await system.spawn(ChildSpec("holding", lambda: Holding(seen), Restart.TEMPORARY))
    if how == "kill":
        ref.kill("operator said so")
    else:
        await ref.tell(how)
    exit = await ref.join()
    assert seen == hooks
    assert exit.kind is hooks[-1][1]


async def test_an_ordered_stop_lets_the_tasks_finish_their_work_first(autojump_clock, system):
    # A server whose connections still have a last word to send: its tasks run on
    # through ``finishing``, and are cancelled after it.
    ticks: list[float] = []

    class Flushing(Actor):
        runs_tasks = True

        async def started(self):
            self.start_soon(self._tick)

        async def _tick(self):
            while True:
                await trio.sleep(1)
                ticks.append(trio.current_time())

        async def finishing(self, exit):
            await trio.sleep(2.2)

    await system.spawn(ChildSpec("flushing", Flushing))
    await trio.sleep(0.5)
    stopped_at = trio.current_time()
    await system.root.terminate_child("flushing")
    assert [tick - stopped_at for tick in ticks] == [0.5, 1.5]
    await trio.sleep(5)
    assert len(ticks) == 2


async def test_a_release_that_raises_makes_a_good_end_a_crash(autojump_clock, system):
    class Leaking(Holding):
        def release(self, exit):
            raise ValueError("could not give it back")

    ref = await system.spawn(ChildSpec("leaking", lambda: Leaking([]), Restart.TEMPORARY))
    await ref.tell("stop")
    exit = await ref.join()
    assert exit.kind is ExitKind.CRASHED and isinstance(exit.error, ValueError)


async def test_snapshot_is_data(autojump_clock, system, log):
    ref = await system.spawn(recorder("r", log))
    await ref.ask("x")
    await trio.sleep(3)
    snapshot = ref.snapshot()
    assert snapshot.path == "/test/r"
    assert snapshot.kind == "actor"
    assert snapshot.actor_class == "Recorder"
    assert snapshot.messages_handled == 1
    assert snapshot.mailbox_capacity == Recorder.mailbox_capacity
    assert snapshot.overflow == "backpressure"
    assert snapshot.uptime == pytest.approx(3)
    assert snapshot.failures == ()


class NotAnActor:
    pass


async def test_a_start_function_that_returns_something_else_fails_to_start(autojump_clock, system):
    with pytest.raises(ActorCrashed, match="not an Actor"):
        await system.spawn(ChildSpec("odd", NotAnActor))
    assert system.lookup("/test/odd") is None


async def test_a_crash_in_started_fails_the_start(autojump_clock, system):
    class Broken(Actor):
        async def started(self):
            raise ValueError("no")

    with pytest.raises(ActorCrashed) as caught:
        await system.spawn(ChildSpec("broken", Broken))
    assert isinstance(caught.value.__cause__, ValueError)


async def test_stopping_runs_after_a_crash_and_gets_the_reason(autojump_clock, system, log):
    ref = await system.spawn(recorder("r", log, restart=Restart.TEMPORARY))
    await ref.tell("crash")
    await ref.join()
    assert ("r", "stopping:crashed") in log


def test_a_subclass_cannot_replace_the_runtime_s_own_methods():
    with pytest.raises(TypeError, match="_serve"):

        class Shadowing(Actor):
            async def _serve(self):
                return None
