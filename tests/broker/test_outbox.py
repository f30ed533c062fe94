"""The link's writer: frames in order, and, bundling, those waiting together in one
message, never past what one frame holds; the first alone (the tower's hello)."""

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import trio
import trio.testing
from trio_websocket import WebSocketConnection, wrap_client_stream, wrap_server_stream

from broker.link import BUNDLE_BYTES, MAX_FRAME_BYTES, Bundle, ClosePeer, codec
from broker.outbox import Outbox


@asynccontextmanager
async def websocket_pair() -> AsyncIterator[tuple[WebSocketConnection, WebSocketConnection]]:
    """Two ends of a WebSocket over an in-memory stream."""
    near, far = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        accepted: list[WebSocketConnection] = []
        done = trio.Event()

        async def accept() -> None:
            request = await wrap_server_stream(nursery, far)
            accepted.append(await request.accept())
            done.set()

        nursery.start_soon(accept)
        client = await wrap_client_stream(nursery, near, "tower", "/link")
        await done.wait()
        yield client, accepted[0]
        nursery.cancel_scope.cancel()


async def written(frames: list[bytes], *, bundling: bool) -> list[bytes]:
    """The messages the writer makes of ``frames``, all queued before it starts."""
    async with websocket_pair() as (near, far), trio.open_nursery() as nursery:
        outbox = Outbox(near, bundling=bundling)
        for frame in frames:
            assert outbox.put_nowait(frame)
        nursery.start_soon(outbox.write_all)
        messages, taken = [], 0
        while taken < len(frames):
            message = await far.get_message()
            decoded = codec.decode(message)
            taken += len(decoded.frames) if isinstance(decoded, Bundle) else 1
            messages.append(message)
        nursery.cancel_scope.cancel()
    return messages


def frames_of(message: bytes) -> list[bytes]:
    decoded = codec.decode(message)
    return list(decoded.frames) if isinstance(decoded, Bundle) else [message]


async def test_frames_waiting_together_go_as_one_bundle_in_order_after_the_first():
    frames = [codec.encode(ClosePeer(f"s-{number}", 1)) for number in range(100)]
    messages = await written(frames, bundling=True)
    assert messages[0] == frames[0]
    assert [frames_of(message) for message in messages[1:]] == [frames[1:]]


async def test_without_bundling_each_frame_is_a_message():
    frames = [codec.encode(ClosePeer(f"s-{number}", 1)) for number in range(10)]
    assert await written(frames, bundling=False) == frames


async def test_a_frame_past_what_the_bundle_holds_leads_the_next_message():
    # After the first, three frames of which two fit one bundle: the third goes next,
    # alone, as itself.
    first = codec.encode(ClosePeer("s-first", 1))
    big = [codec.encode(ClosePeer("s-" + str(number) * (BUNDLE_BYTES // 3), 1))
           for number in range(3)]
    messages = await written([first, *big], bundling=True)
    assert [frames_of(message) for message in messages] == [[first], big[:2], big[2:]]
    assert messages[2] == big[2]
    assert all(len(message) <= MAX_FRAME_BYTES for message in messages)
