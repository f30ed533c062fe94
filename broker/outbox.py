"""One writer per link: frames queue here and a single task writes them.

A WebSocket over TLS must never have a write cancelled half-way: ``trio.SSLStream`` is
broken from then on, and with it the link and every session on it. So no sender writes
to the socket itself. Senders put encoded frames in the outbox (waiting, cancellably,
while it is full) and the link's writer task sends them in order, uncancelled until the
link itself ends.
"""

from __future__ import annotations

import trio
from trio_websocket import ConnectionClosed, WebSocketConnection

# Frames waiting to be written; a sender waits (its own deadline applies) beyond this.
CAPACITY = 4096


class OutboxClosed(Exception):
    """The link behind the outbox has ended."""


class Outbox:
    def __init__(self, websocket: WebSocketConnection, capacity: int = CAPACITY) -> None:
        self.websocket = websocket
        self._send, self._receive = trio.open_memory_channel[bytes](capacity)

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
        """The writer task: write frames in order until the link ends."""
        try:
            async for frame in self._receive:
                await self.websocket.send_message(frame)
        except (ConnectionClosed, trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            self._send.close()
            self._receive.close()
