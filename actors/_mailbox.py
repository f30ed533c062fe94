"""A bounded mailbox with one reader.

Theory of operation: user messages wait in a bounded queue; system messages (stop
requests, child exits, monitor notices, supervisor control) wait in a separate unbounded
queue and are always taken first, so that a flooded actor can still be stopped and a
supervisor still hears about its children. Only the actor's own task reads, so a waiting
reader is a single task that a writer reschedules directly.
"""

from __future__ import annotations

import enum
from collections import deque
from typing import Any

import trio

from ._errors import ActorStopped, MailboxFull


class Overflow(enum.Enum):
    """What happens to a message sent to a full mailbox.

    - ``BACKPRESSURE``: ``tell`` and ``ask`` wait for room; ``tell_nowait`` raises
      ``MailboxFull`` because it cannot wait.
    - ``DROP``: a told message is dropped and counted; an ask fails with ``MailboxFull``
      (a request is never dropped silently).
    - ``FAIL``: the sender gets ``MailboxFull`` at once.
    """

    BACKPRESSURE = "backpressure"
    DROP = "drop"
    FAIL = "fail"


class DeadLetters:
    """Counts messages told to actors that had already stopped for good."""

    __slots__ = ("count",)

    def __init__(self) -> None:
        self.count = 0


class Mailbox:
    __slots__ = (
        "path",
        "capacity",
        "overflow",
        "dropped",
        "closed",
        "_user",
        "_system",
        "_reader",
        "_senders",
        "_dead_letters",
    )

    def __init__(self, path: str, dead_letters: DeadLetters) -> None:
        self.path = path
        self.capacity = 1
        self.overflow = Overflow.BACKPRESSURE
        self.dropped = 0
        self.closed = False
        self._user: deque[tuple[Any, Any]] = deque()
        # System messages are few and rare: a list is a fraction of an empty deque's size.
        self._system: list[Any] = []
        self._reader: trio.lowlevel.Task | None = None
        self._senders = trio.lowlevel.ParkingLot()
        self._dead_letters = dead_letters

    def __len__(self) -> int:
        return len(self._user) + len(self._system)

    def configure(self, capacity: int, overflow: Overflow) -> None:
        if not isinstance(capacity, int) or capacity < 1:
            raise ValueError(f"mailbox capacity must be a positive integer, not {capacity!r}")
        if not isinstance(overflow, Overflow):
            raise TypeError(f"overflow must be an Overflow, not {overflow!r}")
        self.capacity = capacity
        self.overflow = overflow

    def put_nowait(self, item: tuple[Any, Any]) -> None:
        """Queue a user message now, or apply the overflow policy. Never blocks."""
        if self.closed:
            self._reject_closed(item)
            return
        if len(self._user) >= self.capacity:
            if self.overflow is Overflow.DROP and item[1] is None:
                self.dropped += 1
                return
            raise MailboxFull(self.path, self.capacity)
        self._user.append(item)
        self._wake_reader()

    async def put(self, item: tuple[Any, Any]) -> None:
        """Queue a user message, waiting for room if the policy is backpressure."""
        await trio.lowlevel.checkpoint_if_cancelled()
        while len(self._user) >= self.capacity and not self.closed:
            if self.overflow is not Overflow.BACKPRESSURE:
                break
            await self._senders.park()
        self.put_nowait(item)
        await trio.lowlevel.cancel_shielded_checkpoint()

    def put_system(self, item: Any) -> bool:
        """Queue a system message ahead of user messages. False if the mailbox is closed."""
        if self.closed:
            return False
        self._system.append(item)
        self._wake_reader()
        return True

    async def get(self) -> Any:
        """Take the next message: system messages first. Only the owning actor calls this."""
        await trio.lowlevel.checkpoint_if_cancelled()
        if not self._system and not self._user:
            self._reader = trio.lowlevel.current_task()

            def abort(_: Any) -> trio.lowlevel.Abort:
                self._reader = None
                return trio.lowlevel.Abort.SUCCEEDED

            await trio.lowlevel.wait_task_rescheduled(abort)
        else:
            await trio.lowlevel.cancel_shielded_checkpoint()
        if self._system:
            return self._system.pop(0)
        item = self._user.popleft()
        if self._senders:
            self._senders.unpark()
        return item

    def close(self) -> tuple[list[tuple[Any, Any]], list[Any]]:
        """Refuse all further messages; return the user and system messages never handled."""
        self.closed = True
        user, system = list(self._user), list(self._system)
        self._user.clear()
        self._system.clear()
        self._senders.unpark_all()
        return user, system

    def _wake_reader(self) -> None:
        reader = self._reader
        if reader is not None:
            self._reader = None
            trio.lowlevel.reschedule(reader)

    def _reject_closed(self, item: tuple[Any, Any]) -> None:
        if item[1] is not None:
            raise ActorStopped(self.path)
        self._dead_letters.count += 1
