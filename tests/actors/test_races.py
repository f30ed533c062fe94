"""Requests and stops that race with crashes, kills and restarts: nothing hangs or lies."""

import math

import pytest
import trio

from actors import (
    Actor,
    ActorCrashed,
    ActorState,
    ChildSpec,
    ExitKind,
    Supervisor,
    SupervisorFlags,
)


class Crashing(Actor):
    def __init__(self, log: list) -> None:
        self.log = log

    async def started(self):
        self.log.append("started")

    async def receive(self, message):
        raise RuntimeError("boom")


def group(children, **flags) -> ChildSpec:
    return ChildSpec("group", lambda: Supervisor(children, SupervisorFlags(intensity=10, **flags)))


async def test_control_request_fails_when_the_supervisor_is_killed_handling_it(
    autojump_clock, system
):
    class SlowToStop(Actor):
        async def stopping(self, exit):
            await trio.sleep(3)

    supervisor = await system.spawn(group([ChildSpec("w", SlowToStop)]))
    outcome = []

    async def terminate():
        try:
            await supervisor.terminate_child("w")
        except ActorCrashed as error:
            outcome.append(error)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(terminate)
        await trio.sleep(1)
        supervisor.kill("test")
    assert len(outcome) == 1


async def test_an_ask_fails_at_once_when_its_receiver_is_killed(autojump_clock, system):
    class Slow(Actor):
        async def receive(self, message):
            await trio.sleep(10)

    ref = await system.spawn(ChildSpec("slow", Slow))

    async def kill_soon():
        await trio.sleep(1)
        ref.kill("test")

    start = trio.current_time()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(kill_soon)
        with pytest.raises(ActorCrashed, match="cancelled"):
            await ref.ask("x", timeout=math.inf)
    assert trio.current_time() - start == pytest.approx(1)


async def test_terminate_right_after_a_crash_is_an_orderly_shutdown(autojump_clock, system):
    for _ in range(10):
        log = []
        supervisor = await system.spawn(group([ChildSpec("w", lambda: Crashing(log))]))
        worker = system.lookup("/test/group/w")
        log.clear()
        await worker.tell("crash")
        await trio.sleep(0)
        exit = await supervisor.terminate_child("w")
        assert exit.kind is ExitKind.SHUTDOWN
        assert [failure.kind for failure in worker.snapshot().failures] == [ExitKind.CRASHED]
        await system.root.terminate_child("group")


async def test_an_abandoned_incarnation_does_not_overwrite_its_successor(
    autojump_clock, system
):
    class Stubborn(Actor):
        async def receive(self, message):
            if message == "hold":
                with trio.CancelScope(shield=True):
                    await trio.sleep(20)
            return message

    supervisor = await system.spawn(group([ChildSpec("w", Stubborn, shutdown=1)]))
    worker = system.lookup("/test/group/w")
    await worker.tell("hold")
    await trio.sleep(0.1)
    await supervisor.restart_child("w")
    await trio.sleep(30)
    assert worker.snapshot().state is ActorState.RUNNING
    assert await worker.ask("still here") == "still here"
    assert (await supervisor.terminate_child("w")).kind is ExitKind.SHUTDOWN


async def test_an_error_whose_repr_fails_is_still_an_ordinary_crash(autojump_clock, system):
    class Unprintable(Exception):
        def __repr__(self):
            raise ValueError("no repr")

    class Raising(Actor):
        async def receive(self, message):
            raise Unprintable()

    log = []
    supervisor = await system.spawn(
        group([ChildSpec("sibling", lambda: Crashing(log)), ChildSpec("raising", Raising)])
    )
    with pytest.raises(ActorCrashed, match="repr failed"):
        await system.lookup("/test/group/raising").ask("x")
    await trio.sleep(1)
    assert supervisor.alive and system.lookup("/test/group/sibling").snapshot().restarts == 0


async def test_restart_child_reports_a_child_that_fails_to_start_again(autojump_clock, system):
    starts = []

    class FailsSecondTime(Actor):
        async def started(self):
            starts.append(1)
            if len(starts) == 2:
                raise RuntimeError("second start fails")

    supervisor = await system.spawn(group([ChildSpec("w", FailsSecondTime)]))
    with pytest.raises(ActorCrashed, match="second start fails"):
        await supervisor.restart_child("w")
    await trio.sleep(1)
    assert len(starts) == 3  # its supervisor restarted it after the failed start
