"""One writer per link: frames queue here and a single task writes them.

A WebSocket over TLS must never have a write cancelled half-way: ``trio.SSLStream`` is
broken from then on, and with it the link and every session on it. So no sender writes
to the socket itself. Senders put encoded frames in the outbox (waiting, cancellably,
while it is full) and the link's writer task sends them in order, uncancelled until the
link itself ends, or until the other side has not read for ``WRITE_TIMEOUT``: then the
writer gives up and the link must be dropped.

Bundling, the frames waiting when the writer comes round go as one message (a
``link.Bundle``), up to what one frame holds: the other side then takes them in one pass
of its scheduler, not one pass each. The first frame goes alone: a link's first is the
tower's hello, which the broker reads on its own.
"""

from __future__ import annotations

import trio
from trio_websocket import ConnectionClosed, WebSocketConnection

from .link import BUNDLE_BYTES, BUNDLE_FRAMES, bundle

# Frames waiting to be written; a sender waits (its own deadline applies) beyond this.
CAPACITY = 4096
# A frame not written within this long: the other side has stopped reading.
WRITE_TIMEOUT = 10.0


class OutboxClosed(Exception):
    """The link behind the outbox has ended."""


class OutboxStalled(Exception):
    """The other side stopped reading: the link is of no use, and must be dropped (the
    frame was cut off half-way)."""


class Outbox:
    def __init__(self, websocket: WebSocketConnection, capacity: int = CAPACITY, *,
                 bundling: bool = False) -> None:
        self.websocket = websocket
        self.bundling = bundling
        self._send, self._receive = trio.open_memory_channel[bytes](capacity)
        # A frame taken from the queue that did not fit the last bundle: the next goes
        # with it first.
        self._held: bytes | None = None
        self._first = True

    async def put(self, frame: bytes) -> None:
        """Queue ``frame``; waits while the outbox is full (safe to cancel).

        Raises:
            OutboxClosed: the link has ended.
        """
        try:
            await self._send.send(frame)
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            raise OutboxClosed() from None

    def put_nowait(self, frame: bytes) -> bool:
        """Queue ``frame`` if there is room now; False if the outbox is full or closed."""
        try:
            self._send.send_nowait(frame)
        except (trio.WouldBlock, trio.ClosedResourceError, trio.BrokenResourceError):
            return False
        return True

    async def write_all(self) -> None:
        """The writer task: write frames in order until the link ends.

        Raises:
            OutboxStalled: a frame could not be written within ``WRITE_TIMEOUT``.
        """
        try:
            while True:
                message = await self._next_message()
                with trio.move_on_after(WRITE_TIMEOUT) as writing:
                    await self.websocket.send_message(message)
                if writing.cancelled_caught:
                    raise OutboxStalled(f"a frame waited over {WRITE_TIMEOUT:g} s to be "
                                        "written: the other side does not read")
        except (ConnectionClosed, trio.BrokenResourceError, trio.ClosedResourceError,
                trio.EndOfChannel):
            pass
        finally:
            self._send.close()
            self._receive.close()

    async def _next_message(self) -> bytes:
        """The next frame, or, bundling, the frames waiting now in one message."""
        if self._held is not None:
            frames, self._held = [self._held], None
        else:
            frames = [await self._receive.receive()]
        size = len(frames[0])
        while self.bundling and not self._first and len(frames) < BUNDLE_FRAMES:
            try:
                frame = self._receive.receive_nowait()
            except trio.WouldBlock:
                break
            if size + len(frame) > BUNDLE_BYTES:
                self._held = frame
                break
            frames.append(frame)
            size += len(frame)
        self._first = False
        return bundle(frames)
