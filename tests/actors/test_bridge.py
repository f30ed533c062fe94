"""Tests of the asyncio/trio bridge, run in the real process model.

Every test is a plain function that calls ``bridge.run``: an asyncio host loop with trio
as its guest, never pytest-trio's plain trio run (except to show what happens there).
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import signal

import pytest
import trio
import trio.testing

from actors import Actor, ChildSpec, Restart, bridge, open_system
from actors._errors import ActorStopped, MailboxFull


class RecordingMailbox:
    """A mailbox double: a bounded trio memory channel behind ``tell_nowait``."""

    def __init__(self, capacity: float = math.inf) -> None:
        self.send_channel, self.receive_channel = trio.open_memory_channel[object](
            capacity
        )
        self.capacity = capacity

    def tell_nowait(self, message: object) -> None:
        try:
            self.send_channel.send_nowait(message)
        except trio.WouldBlock:
            raise MailboxFull("/test/mailbox", int(self.capacity)) from None


class RefusingMailbox:
    """A mailbox double that refuses every message with the given error."""

    def __init__(self, error: Exception) -> None:
        self.error = error

    def tell_nowait(self, message: object) -> None:
        raise self.error


class ListMailbox:
    """A mailbox double that needs no trio run at all."""

    def __init__(self) -> None:
        self.messages: list[object] = []

    def tell_nowait(self, message: object) -> None:
        self.messages.append(message)


class AsyncioSideError(Exception):
    pass


async def post_from_asyncio_callbacks(post, messages: list[object]) -> None:
    loop = asyncio.get_running_loop()
    for message in messages:
        loop.call_soon(post, message)
    # Lets the callbacks above run before this task finishes.
    await asyncio.sleep(0)


# run


def test_run_returns_what_main_returns() -> None:
    async def add(first: int, second: int) -> int:
        await trio.lowlevel.checkpoint()
        return first + second

    assert bridge.run(add, 2, 3) == 5


def test_run_raises_what_main_raises() -> None:
    async def main() -> None:
        await trio.lowlevel.checkpoint()
        raise KeyError("from trio")

    with pytest.raises(KeyError, match="from trio"):
        bridge.run(main)


def test_run_closes_its_loop_and_clears_the_current_event_loop() -> None:
    async def main() -> asyncio.AbstractEventLoop:
        return asyncio.get_running_loop()

    loop = bridge.run(main)

    assert loop.is_closed()
    with pytest.raises(RuntimeError):
        asyncio.get_event_loop_policy().get_event_loop()


def test_run_cancels_and_awaits_asyncio_tasks_left_behind() -> None:
    left_behind_finished: list[str] = []

    async def linger() -> None:
        try:
            await asyncio.sleep(3600)
        finally:
            left_behind_finished.append("linger")

    async def spawn_and_return() -> None:
        asyncio.get_running_loop().create_task(linger())
        await asyncio.sleep(0)

    async def main() -> None:
        await bridge.call_asyncio(spawn_and_return)

    bridge.run(main)

    assert left_behind_finished == ["linger"]


def test_run_uses_the_given_trio_clock() -> None:
    async def main() -> float:
        start = trio.current_time()
        await trio.sleep(3600)
        return trio.current_time() - start

    assert bridge.run(main, clock=trio.testing.MockClock(autojump_threshold=0)) == 3600


def test_run_lets_main_unwind_when_the_host_loop_is_stopped_under_it() -> None:
    unwound: list[str] = []

    async def stop_the_loop() -> None:
        asyncio.get_running_loop().stop()

    async def main() -> None:
        try:
            await bridge.call_asyncio(stop_the_loop)
            await trio.sleep_forever()
        finally:
            unwound.append("main")

    with pytest.raises(RuntimeError, match="Event loop stopped"):
        bridge.run(main)
    assert unwound == ["main"]


def test_run_lets_main_unwind_however_often_the_host_loop_is_stopped() -> None:
    unwound: list[str] = []

    async def stop_the_loop_twice() -> None:
        loop = asyncio.get_running_loop()
        loop.stop()
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            loop.stop()  # a library's clean-up that stops the loop again
            raise

    async def main() -> None:
        try:
            await bridge.call_asyncio(stop_the_loop_twice)
        finally:
            with trio.CancelScope(shield=True):
                await bridge.call_asyncio(asyncio.sleep, 0)
            unwound.append("main")

    with pytest.raises(RuntimeError, match="Event loop stopped"):
        bridge.run(main)
    assert unwound == ["main"]
    assert bridge.run(trio.sleep, 0) is None  # and the next run is unaffected


# signals


@pytest.mark.parametrize("signal_number", [signal.SIGTERM, signal.SIGINT])
def test_signal_cancels_main_and_raises_interrupted(signal_number: int) -> None:
    previous_handler = signal.getsignal(signal_number)
    unwound: list[str] = []

    async def main() -> None:
        try:
            os.kill(os.getpid(), signal_number)
            await trio.sleep_forever()
        finally:
            unwound.append("main")

    with pytest.raises(bridge.Interrupted) as caught:
        bridge.run(main)

    assert caught.value.signal_number == signal_number
    assert str(caught.value) == f"interrupted by {signal.Signals(signal_number).name}"
    assert unwound == ["main"]
    assert signal.getsignal(signal_number) == previous_handler


def test_signal_cancels_asyncio_work_that_main_waits_for() -> None:
    unwound: list[str] = []

    async def hang() -> None:
        try:
            await asyncio.Event().wait()
        finally:
            unwound.append("asyncio")

    async def main() -> None:
        try:
            os.kill(os.getpid(), signal.SIGINT)
            await bridge.call_asyncio(hang)
        finally:
            unwound.append("main")

    with pytest.raises(bridge.Interrupted):
        bridge.run(main)

    assert unwound == ["asyncio", "main"]


def test_signal_after_mains_last_checkpoint_returns_normally() -> None:
    async def main() -> str:
        await trio.lowlevel.checkpoint()
        os.kill(os.getpid(), signal.SIGTERM)
        return "done"

    assert bridge.run(main) == "done"


def test_previous_signal_handlers_are_restored() -> None:
    def custom_handler(signal_number: int, frame: object) -> None:
        pass

    previous_handler = signal.signal(signal.SIGTERM, custom_handler)
    try:

        async def main() -> None:
            await trio.lowlevel.checkpoint()

        bridge.run(main)

        assert signal.getsignal(signal.SIGTERM) is custom_handler
    finally:
        signal.signal(signal.SIGTERM, previous_handler)


# call_asyncio


def test_call_asyncio_returns_the_asyncio_result() -> None:
    async def double(value: int) -> int:
        await asyncio.sleep(0)
        return value * 2

    async def main() -> int:
        return await bridge.call_asyncio(double, 21)

    assert bridge.run(main) == 42


def test_call_asyncio_raises_the_asyncio_exception_in_trio() -> None:
    async def fail() -> None:
        await asyncio.sleep(0)
        raise AsyncioSideError("from asyncio")

    async def main() -> str:
        with pytest.raises(AsyncioSideError, match="from asyncio"):
            await bridge.call_asyncio(fail)
        return "caught in trio"

    assert bridge.run(main) == "caught in trio"


def test_asyncio_exception_can_propagate_out_of_run() -> None:
    async def fail() -> None:
        raise AsyncioSideError("from asyncio")

    async def main() -> None:
        await bridge.call_asyncio(fail)

    with pytest.raises(AsyncioSideError):
        bridge.run(main)


def test_trio_cancellation_cancels_and_awaits_the_asyncio_task() -> None:
    events: list[str] = []

    async def hang() -> None:
        events.append("asyncio started")
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            events.append("asyncio cancelled")
            raise
        finally:
            # Awaiting here shows the trio side waits for the whole unwinding.
            await asyncio.sleep(0)
            events.append("asyncio finally")

    async def main() -> bool:
        with trio.move_on_after(0.05) as scope:
            await bridge.call_asyncio(hang)
        events.append("trio continues")
        return scope.cancelled_caught

    assert bridge.run(main) is True
    assert events == [
        "asyncio started",
        "asyncio cancelled",
        "asyncio finally",
        "trio continues",
    ]


def test_call_asyncio_in_an_already_cancelled_scope_starts_nothing() -> None:
    started: list[str] = []

    async def record() -> None:
        started.append("asyncio")

    async def main() -> None:
        with trio.CancelScope() as scope:
            scope.cancel()
            await bridge.call_asyncio(record)

    bridge.run(main)

    assert started == []


def test_asyncio_task_finishing_despite_the_trio_cancel_returns_its_result() -> None:
    async def stubborn() -> str:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            return "finished anyway"
        return "slept"

    async def main() -> str:
        with trio.move_on_after(0.05):
            result = await bridge.call_asyncio(stubborn)
        return result

    assert bridge.run(main) == "finished anyway"


def test_asyncio_side_cancellation_raises_asyncio_task_cancelled() -> None:
    async def cancelled_by_asyncio() -> None:
        task = asyncio.current_task()
        assert task is not None
        asyncio.get_running_loop().call_soon(task.cancel)
        await asyncio.sleep(3600)

    async def main() -> BaseException:
        with pytest.raises(bridge.AsyncioTaskCancelled) as caught:
            await bridge.call_asyncio(cancelled_by_asyncio)
        return caught.value

    error = bridge.run(main)

    assert isinstance(error.__cause__, asyncio.CancelledError)
    # It names what ran, and where the cancellation surfaced.
    assert "cancelled_by_asyncio" in str(error)
    assert "cancelled_by_asyncio > sleep (" in str(error)


def test_call_asyncio_under_plain_trio_run_raises_runtime_error() -> None:
    async def never_called() -> None:
        raise AssertionError("must not run")

    async def main() -> None:
        await bridge.call_asyncio(never_called)

    with pytest.raises(RuntimeError, match=r"actors\.bridge\.run"):
        trio.run(main)


# post_to


def test_post_to_delivers_messages_from_asyncio_callbacks_in_order() -> None:
    sent = list(range(100))

    async def main() -> list[object]:
        mailbox = RecordingMailbox()
        post = bridge.post_to(mailbox)
        await bridge.call_asyncio(post_from_asyncio_callbacks, post, sent)
        return [await mailbox.receive_channel.receive() for _ in sent]

    assert bridge.run(main) == sent


def test_post_to_a_full_mailbox_drops_with_a_warning_and_keeps_running(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def main() -> list[object]:
        mailbox = RecordingMailbox(capacity=1)
        post = bridge.post_to(mailbox)
        await bridge.call_asyncio(
            post_from_asyncio_callbacks, post, ["secret-1", "secret-2", "secret-3"]
        )
        # The hand-overs to trio are queued before call_asyncio's own completion, so
        # every delivery has been attempted by now.
        received = [mailbox.receive_channel.receive_nowait()]
        with pytest.raises(trio.WouldBlock):
            mailbox.receive_channel.receive_nowait()
        return received

    with caplog.at_level(logging.WARNING, logger="actors.bridge"):
        assert bridge.run(main) == ["secret-1"]

    warnings = [record for record in caplog.records if record.name == "actors.bridge"]
    assert len(warnings) == 2
    assert all(record.levelno == logging.WARNING for record in warnings)
    assert "is full" in warnings[0].getMessage()
    assert "secret" not in caplog.text


def test_post_to_a_stopped_actor_drops_with_a_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def main() -> None:
        post = bridge.post_to(RefusingMailbox(ActorStopped("/test/gone")))
        await bridge.call_asyncio(post_from_asyncio_callbacks, post, ["secret"])

    with caplog.at_level(logging.WARNING, logger="actors.bridge"):
        bridge.run(main)

    assert "/test/gone is stopped" in caplog.text
    assert "secret" not in caplog.text


class Stops(Actor):
    async def receive(self, message: object) -> None:
        self.stop()


def test_post_to_an_actor_that_really_stopped_drops_with_a_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def main() -> int:
        async with open_system("test") as system:
            ref = await system.spawn(ChildSpec("gone", Stops, Restart.TEMPORARY))
            post = bridge.post_to(ref)
            await ref.tell("stop")
            await ref.join()
            await bridge.call_asyncio(post_from_asyncio_callbacks, post, ["secret"])
            return system.dead_letters.count

    with caplog.at_level(logging.WARNING, logger="actors.bridge"):
        assert bridge.run(main) == 1

    assert "/test/gone is stopped" in caplog.text
    assert "secret" not in caplog.text


def test_post_after_the_run_finished_is_dropped_silently(
    caplog: pytest.LogCaptureFixture,
) -> None:
    mailbox = ListMailbox()

    async def main():
        await trio.lowlevel.checkpoint()
        return bridge.post_to(mailbox)

    post = bridge.run(main)
    post("late")

    assert mailbox.messages == []
    assert caplog.records == []


# aiortc under the real process model


async def create_peer_connection():
    from aiortc import RTCConfiguration, RTCPeerConnection

    return RTCPeerConnection(RTCConfiguration(iceServers=[]))


async def open_data_channel(offerer, answerer, post):
    @answerer.on("datachannel")
    def on_datachannel(channel) -> None:
        channel.on("message", post)

    channel = offerer.createDataChannel("chat")
    opened = asyncio.Event()
    channel.on("open", opened.set)
    await offerer.setLocalDescription(await offerer.createOffer())
    await answerer.setRemoteDescription(offerer.localDescription)
    await answerer.setLocalDescription(await answerer.createAnswer())
    await offerer.setRemoteDescription(answerer.localDescription)
    await opened.wait()
    return channel


async def send_text(channel, text: str) -> None:
    channel.send(text)


class Inbox(Actor):
    """A real actor that hands each message it receives to the test."""

    def __init__(self, send_channel: trio.MemorySendChannel) -> None:
        self.send_channel = send_channel

    async def receive(self, message: object) -> None:
        await self.send_channel.send(message)


def test_aiortc_data_channel_messages_reach_an_actor_under_run() -> None:
    async def main() -> list[object]:
        send_channel, receive_channel = trio.open_memory_channel(10)
        with trio.fail_after(20):
            async with open_system("test") as system:
                inbox = await system.spawn(ChildSpec("inbox", lambda: Inbox(send_channel)))
                offerer = await bridge.call_asyncio(create_peer_connection)
                answerer = await bridge.call_asyncio(create_peer_connection)
                try:
                    channel = await bridge.call_asyncio(
                        open_data_channel, offerer, answerer, bridge.post_to(inbox)
                    )
                    for text in ("hello", "from", "the offerer"):
                        await bridge.call_asyncio(send_text, channel, text)
                    return [await receive_channel.receive() for _ in range(3)]
                finally:
                    with trio.fail_after(5, shield=True):
                        await bridge.call_asyncio(offerer.close)
                        await bridge.call_asyncio(answerer.close)

    assert bridge.run(main) == ["hello", "from", "the offerer"]
