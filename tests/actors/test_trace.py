"""Message tracing: what a trace records, its bounds, and that it leaves nothing behind."""

from dataclasses import dataclass

import pytest
import trio

from actors import Actor, ActorRef, ChildSpec, ExitKind, Restart, Trace, TracedMessage

from .conftest import recorder


@dataclass(frozen=True)
class Watch:
    ref: ActorRef


class Watcher(Actor):
    """Monitors the refs it is told to watch; answers anything else with itself."""

    async def receive(self, message):
        if isinstance(message, Watch):
            self.monitor(message.ref)
        return message


class Unprintable:
    def __repr__(self) -> str:
        raise RuntimeError("no repr for you")


def traces_of(ref: ActorRef) -> tuple[Trace, ...]:
    return ref._cell.traces


async def test_tells_asks_and_downs_are_recorded_with_kind_and_summary(
    autojump_clock, system, log
):
    watched = await system.spawn(recorder("watched", log, restart=Restart.TEMPORARY))
    watcher = await system.spawn(ChildSpec("watcher", Watcher))
    async with watcher.trace() as trace:
        await trio.sleep(5)
        told_at = trio.current_time()
        await watcher.tell(Watch(watched))
        assert await watcher.ask("ping") == "ping"
        await watched.tell("stop")
        await watched.join()
        told, asked, down = [await anext(trace) for _ in range(3)]

    assert told == TracedMessage(
        at=told_at,
        path="/test/watcher",
        kind="tell",
        message_type="Watch",
        summary="Watch(ref=<ActorRef /test/watched>)",
    )
    assert (asked.kind, asked.message_type, asked.summary) == ("ask", "str", "'ping'")
    assert (down.kind, down.message_type, down.path) == ("system", "Down", "/test/watcher")
    assert down.summary.startswith("Down(ref=<ActorRef /test/watched>, exit=")
    assert trace.dropped == 0


async def test_summaries_are_bounded_and_survive_a_failing_repr(autojump_clock, system, log):
    ref = await system.spawn(recorder("r", log))
    huge_list = list(range(100_000))
    async with ref.trace() as trace:
        await ref.tell("x" * 1_000_000)
        await ref.tell(huge_list)
        unprintable = Unprintable()
        assert await ref.ask(unprintable) is unprintable
        text, numbers, failing = [await anext(trace) for _ in range(3)]

    assert len(text.summary) == 200
    assert text.summary.startswith("'xxx") and text.summary.endswith("...")
    assert len(numbers.summary) == 200
    assert numbers.summary.startswith("[0, 1, 2, ") and numbers.message_type == "list"
    assert failing.summary == "<Unprintable (repr failed)>"
    assert failing.message_type == "Unprintable"
    assert ("r", huge_list) in log


async def test_a_full_trace_drops_and_counts_without_slowing_the_actor(autojump_clock, system, log):
    ref = await system.spawn(recorder("r", log))
    async with ref.trace(capacity=3) as trace:
        with trio.fail_after(1):  # on the virtual clock: fails only if the actor waits
            for number in range(50):
                await ref.tell(number)
            assert await ref.ask("sync") == "sync"
        assert trace.dropped == 48
        assert ref.snapshot().messages_handled == 51
        assert [(await anext(trace)).summary for _ in range(3)] == ["0", "1", "2"]
        # Read, the buffer has room again.
        await ref.tell("later")
        assert (await anext(trace)).summary == "'later'"
        assert trace.dropped == 48


async def test_the_trace_is_removed_however_the_block_exits(autojump_clock, system, log):
    ref = await system.spawn(recorder("r", log))
    async with ref.trace() as trace:
        assert traces_of(ref) == (trace,)
        await ref.tell("seen")
    assert traces_of(ref) == ()
    # What was recorded but not read goes with it, and the iteration is over.
    with pytest.raises(StopAsyncIteration):
        await anext(trace)

    with pytest.raises(KeyError):
        async with ref.trace():
            raise KeyError("tracer failed")
    assert traces_of(ref) == ()
    assert await ref.ask("still fine") == "still fine"


async def test_the_snapshot_counts_the_open_traces(autojump_clock, system, log):
    ref = await system.spawn(recorder("r", log))
    assert ref.snapshot().traces == 0
    async with ref.trace():
        assert ref.snapshot().traces == 1
        async with ref.trace():
            assert ref.snapshot().traces == 2
            [child] = [child for child in system.snapshot().children if child.name == "r"]
            assert child.traces == 2
        assert ref.snapshot().traces == 1
    assert ref.snapshot().traces == 0
    with pytest.raises(KeyError):
        async with ref.trace():
            assert ref.snapshot().traces == 1
            raise KeyError("tracer failed")
    assert ref.snapshot().traces == 0


async def test_cancelling_the_tracer_mid_iteration_leaves_nothing_behind(
    autojump_clock, system, log
):
    ref = await system.spawn(recorder("r", log))
    seen = []

    async def chatter():
        for number in range(5):
            await ref.tell(number)
            await trio.sleep(1)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(chatter)
        with trio.move_on_after(2.5) as deadline:  # an operator's "trace for N seconds"
            async with ref.trace() as trace:
                async for traced in trace:
                    seen.append(traced.summary)
    assert deadline.cancelled_caught
    assert seen == ["0", "1", "2"]
    assert traces_of(ref) == ()
    assert ref.snapshot().traces == 0
    assert trace._readers.statistics().tasks_waiting == 0
    assert await ref.ask("after") == "after"
    assert ("r", 4) in log


async def test_a_trace_survives_restarts_and_ends_when_the_actor_ends_for_good(
    autojump_clock, system, log
):
    ref = await system.spawn(recorder("r", log))
    seen = []
    ended = trio.Event()

    async def tracer(task_status=trio.TASK_STATUS_IGNORED):
        async with ref.trace() as trace:
            task_status.started()
            async for traced in trace:
                seen.append(traced.summary)
        ended.set()

    async with trio.open_nursery() as nursery:
        await nursery.start(tracer)
        await ref.tell("crash")
        assert await ref.ask("after") == "after"
        assert ref.snapshot().restarts == 1
        assert not ended.is_set()
        exit = await system.root.terminate_child("r")
    assert exit.kind is ExitKind.SHUTDOWN
    assert ended.is_set()
    # The stop request that ended it never reached ``receive``, so it is not recorded.
    assert seen == ["'crash'", "'after'"]
    assert traces_of(ref) == ()


async def test_messages_recorded_before_the_end_are_still_read(autojump_clock, system, log):
    ref = await system.spawn(recorder("r", log, restart=Restart.TEMPORARY))
    async with ref.trace() as trace:
        await ref.tell("last words")
        await ref.tell("stop")
        await ref.join()
        assert [traced.summary async for traced in trace] == ["'last words'", "'stop'"]


async def test_tracing_an_actor_that_already_ended_ends_at_once(autojump_clock, system, log):
    ref = await system.spawn(recorder("r", log, restart=Restart.TEMPORARY))
    await ref.tell("stop")
    await ref.join()
    async with ref.trace() as trace:
        assert [traced async for traced in trace] == []
    assert traces_of(ref) == ()


async def test_two_traces_at_once(autojump_clock, system, log):
    ref = await system.spawn(recorder("r", log))
    async with ref.trace(capacity=10) as wide:
        async with ref.trace(capacity=1) as narrow:
            assert traces_of(ref) == (wide, narrow)
            for number in range(5):
                await ref.tell(number)
            await ref.ask("sync")
            assert (narrow.dropped, wide.dropped) == (5, 0)
            assert (await anext(narrow)).summary == "0"
        assert traces_of(ref) == (wide,)
        await ref.tell("only wide")
        summaries = [(await anext(wide)).summary for _ in range(7)]
    assert summaries == ["0", "1", "2", "3", "4", "'sync'", "'only wide'"]
    assert traces_of(ref) == ()


async def test_capacity_must_be_a_positive_integer(autojump_clock, system, log):
    ref = await system.spawn(recorder("r", log))
    for capacity in (0, -1, 1.5, "10"):
        with pytest.raises(ValueError):
            ref.trace(capacity)
    assert ref.trace(1).capacity == 1


async def test_a_trace_is_entered_once_and_read_inside_its_block(autojump_clock, system, log):
    ref = await system.spawn(recorder("r", log))
    trace = ref.trace()
    with pytest.raises(RuntimeError):
        await anext(trace)
    async with trace:
        with pytest.raises(RuntimeError):
            async with trace:
                pass
        assert traces_of(ref) == (trace,)
    assert traces_of(ref) == ()
