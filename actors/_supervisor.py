"""Supervisors: actors that start, watch, restart and stop other actors, as in Erlang/OTP.

Theory of operation: a supervisor runs its children in a nursery of its own; each
child's runner catches the child's crash and sends the supervisor a ``ChildExited``
system message. The supervisor handles those one at a time with the pure decisions of
``_restart`` (restart or not, which group, intensity, backoff) and carries them out.
Children start in order and stop in reverse, before the supervisor's own ``stopping``
runs. When the intensity is exceeded the
supervisor raises ``RestartIntensityExceeded``: it crashes, stops its children on the
way out, and its own supervisor decides what comes next.

A supervisor's control requests (start, terminate, restart a child) travel as system
messages, ahead of its ordinary mailbox, so a subclass is free to use ``receive`` for
its own messages; a plain supervisor logs and ignores them. That ``receive`` must not
wait on the supervisor's own children (a ``tell`` that waits for room in a child's
mailbox, an ``ask``): a child's exit is only handled between two messages, so a crashed
child would never be restarted to take its mail. Dynamic children are not kept across
a restart of the supervisor itself: a restarted supervisor starts with the children it
was built with.
"""

from __future__ import annotations

import itertools
import logging
import random
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from typing import Any

import trio

from ._actor import (
    Actor,
    ActorRef,
    ChildExited,
    Control,
    _Cell,
    _Incarnation,
    _Stop,
    run_incarnation,
)
from ._errors import ActorCrashed, RestartIntensityExceeded
from ._exit import Exit, ExitKind, shutdown
from ._restart import (
    DEFAULT_WORKER_SHUTDOWN,
    ChildSpec,
    Restart,
    RestartWindow,
    Strategy,
    SupervisorFlags,
    restart_group,
    should_restart,
)
from ._snapshot import ActorSnapshot, ActorState, SupervisorInfo

logger = logging.getLogger("actors")


class Supervisor(Actor):
    """An actor whose job is to keep its children running.

    Args:
        children: the child specs started, in order, whenever the supervisor starts.
        flags: strategy, restart intensity and period, backoff (see ``SupervisorFlags``).
    """

    _is_supervisor = True

    def __init__(
        self, children: Iterable[ChildSpec] = (), flags: SupervisorFlags = SupervisorFlags()
    ) -> None:
        self.flags = flags
        self._initial_children = tuple(children)
        names = [spec.name for spec in self._initial_children]
        if len(set(names)) != len(names):
            raise ValueError(f"child names must be unique: {names}")
        self._children: dict[str, _Cell] = {}
        self._window = RestartWindow(flags.intensity, flags.period)
        self._random = random.Random()
        self._nursery: trio.Nursery | None = None

    @asynccontextmanager
    async def _lifetime(self) -> AsyncIterator[None]:
        # An exception raised inside a trio nursery comes out wrapped in an exception
        # group; a child's start failure is kept aside and raised after the nursery so
        # that the supervisor's crash reason is the failure itself.
        start_failure: Exception | None = None
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                try:
                    try:
                        for spec in self._initial_children:
                            await self._start_new_child(spec)
                    except Exception as error:
                        start_failure = error
                        await self._stop_all_children(shutdown(f"{self.path} failed to start"))
                    else:
                        yield  # its children stop in ``_end_tasks``
                finally:
                    nursery.cancel_scope.cancel()
        finally:
            # Whatever is still here did not stop in order (this supervisor was killed):
            # it ended with the nursery.
            for cell in list(self._children.values()):
                incarnation = cell.incarnation
                exit = incarnation.exit if incarnation and incarnation.exit else None
                cell.finish(exit or Exit(ExitKind.KILLED, detail="its supervisor ended"))
            self._children.clear()
        if start_failure is not None:
            raise start_failure

    async def _end_tasks(self) -> None:
        """Stop the children, in reverse order, before its own tasks end and its
        ``stopping`` runs: as in OTP, a supervisor ends after what it supervises, so that
        its ``stopping`` sees them gone (stopped in order, they stop for the same reason;
        crashed, they stop as shut down)."""
        incarnation = self._cell.incarnation
        why = incarnation.stop_with if incarnation is not None else None
        await self._stop_all_children(why or shutdown(f"{self.path} stopped"))
        await super()._end_tasks()

    async def receive(self, message: Any) -> Any:
        """Log a message nobody expects a plain supervisor to get, and carry on, as OTP's
        supervisor does: a stray message must not take the children down. An ask of it
        gets None."""
        logger.warning("%s ignored an unexpected %s", self.path, type(message).__qualname__)

    def forget_restarts(self) -> None:
        """Start counting restarts (and backoff) afresh, as if none had happened yet.

        For a subclass whose child is about to start over somewhere new (a session
        placed on another tower): the old place's failures say nothing about the new.
        """
        self._window = RestartWindow(self.flags.intensity, self.flags.period)
        for cell in self._children.values():
            cell.consecutive_failures = 0

    async def escalate(self, child: str, exit: Exit) -> bool:
        """Decide what happens when restarting ``child`` would exceed the restart intensity.

        The default is OTP's: give up by raising ``RestartIntensityExceeded``, so that this
        supervisor crashes and its own supervisor decides. A subclass that can do better
        itself (a session moving to another tower) returns True to restart the child
        under a fresh restart window, or False to leave it ended and removed (members of
        its group that a restart of that group left waiting then start without it).
        """
        raise RestartIntensityExceeded(self.path, self.flags.intensity, self.flags.period)

    async def _system_message(self, item: Any) -> Exit | None:
        if item.__class__ is ChildExited:
            await self._child_exited(item.incarnation)
            return None
        if item.__class__ is _GroupDue:
            await self._restart_group(item.group, item.due)
            return None
        if item.__class__ is Control:
            await self._control(item)
            return None
        return await super()._system_message(item)

    def _introspect(
        self, depth: int | None, children: int | None
    ) -> tuple[tuple[ActorSnapshot, ...], int, SupervisorInfo | None]:
        below: tuple[ActorSnapshot, ...] = ()
        if depth != 0:
            cells = itertools.islice(self._children.values(), children)
            deeper = None if depth is None else depth - 1
            below = tuple(cell.snapshot(deeper, children) for cell in cells)
        flags = self.flags
        info = SupervisorInfo(flags.strategy.value, flags.intensity, flags.period)
        return below, len(self._children), info

    async def _start_new_child(self, spec: ChildSpec) -> ActorRef:
        if not isinstance(spec, ChildSpec):
            raise TypeError(f"expected a ChildSpec, not {spec!r}")
        if spec.name in self._children:
            raise ValueError(f"{self.path} already has a child named {spec.name!r}")
        cell = _Cell(spec, parent=self._cell, system=self._cell.system)
        self._children[spec.name] = cell
        incarnation = cell.new_incarnation()
        assert self._nursery is not None
        failed: Exit | None = await self._nursery.start(run_incarnation, incarnation, 0.0)
        if failed is not None:
            incarnation.handled = True
            self._remove(cell, failed)
            error = failed.error or RuntimeError(str(failed))
            raise ActorCrashed(cell.path, error, "starting") from error
        return cell.ref

    async def _child_exited(self, incarnation: _Incarnation) -> None:
        cell = incarnation.cell
        if (
            incarnation.handled
            or cell.incarnation is not incarnation
            or self._children.get(cell.name) is not cell
        ):
            return
        incarnation.handled = True
        exit = incarnation.exit
        assert exit is not None
        if exit.abnormal:
            # One line per failure; the traceback is in the actor's snapshot, and in the
            # log at debug level: clients can make negotiations fail at will.
            logger.warning("%s %s", cell.path, exit)
            logger.debug("%s failed", cell.path, exc_info=exit.error)
        if not should_restart(cell.spec.restart, exit.kind):
            self._remove(cell, exit)
            return
        now = trio.current_time()
        if not self._window.allow(now):
            if not await self.escalate(cell.name, exit):
                self._remove(cell, exit)
                if self.flags.strategy is not Strategy.ONE_FOR_ONE:
                    await self._start_left_waiting(now)
                return
            # The escalated restart starts afresh: it is not counted against the new window.
            self.forget_restarts()
        delay = self._backoff_delay(cell, incarnation, now)
        if self.flags.strategy is Strategy.ONE_FOR_ONE:
            # The common case, with thousands of siblings: no need to list them.
            self._restart_soon(cell, delay)
            return
        group = restart_group(self.flags.strategy, tuple(self._children), cell.name)
        siblings = [self._children[name] for name in group if name != cell.name]
        why = shutdown(f"restarted with {cell.path}")
        for sibling in reversed(siblings):
            stopped = await self._stop_child(sibling, why)
            if sibling.spec.restart is Restart.TEMPORARY:
                self._remove(sibling, stopped)
        group = tuple(name for name in group if name in self._children)
        # Each member is marked with its group restart's time: a later group restart
        # that takes it over marks it again, and the earlier one leaves it alone.
        due = now + delay
        for name in group:
            self._children[name].restart_at = due
        if delay > 0:
            # The backoff is waited out in a task: stop requests and control calls are
            # still handled meanwhile.
            assert self._nursery is not None
            self._nursery.start_soon(self._restart_group_after, group, due)
        else:
            await self._restart_group(group, due)

    async def _restart_group_after(self, group: tuple[str, ...], due: float) -> None:
        await trio.sleep_until(due)
        self._cell.mailbox.put_system(_GroupDue(group, due))

    async def _restart_group(self, group: tuple[str, ...], due: float) -> None:
        """Start again, in order, the members of the group restart due at ``due``."""
        for name in group:
            member = self._children.get(name)
            if member is None:
                continue  # terminated meanwhile
            if member.restart_at != due:
                if member.restart_at is not None:
                    break  # a later group restart has it, and those after it
                continue  # started again meanwhile (an operator's restart)
            if await self._restart_now(member) is not None:
                # Its queued ChildExited restarts the group again, counted, as OTP's
                # try_again does: those after it do not start without it meanwhile.
                break

    async def _start_left_waiting(self, now: float) -> None:
        """Start, in order, the members still waiting for a group restart that is due:
        one that a member failing to start broke off, when that member is given up on
        instead of restarting the group again."""
        for member in list(self._children.values()):
            incarnation = member.incarnation
            if (
                member.restart_at is not None
                and member.restart_at <= now
                and incarnation is not None
                and incarnation.done.is_set()
            ):
                if await self._restart_now(member) is not None:
                    break  # its queued ChildExited decides, as in ``_restart_group``

    def _backoff_delay(self, cell: _Cell, incarnation: _Incarnation, now: float) -> float:
        backoff = self.flags.backoff
        started_at = incarnation.started_at
        if started_at is not None and now - started_at >= backoff.reset_after:
            cell.consecutive_failures = 0
        cell.consecutive_failures += 1
        return backoff.delay(cell.consecutive_failures, self._random.random())

    def _restart_soon(self, cell: _Cell, delay: float) -> None:
        _count_restart(cell)
        assert self._nursery is not None
        self._nursery.start_soon(run_incarnation, cell.new_incarnation(), delay)

    async def _restart_now(self, cell: _Cell) -> Exit | None:
        _count_restart(cell)
        cell.restart_at = None
        assert self._nursery is not None
        failed: Exit | None = await self._nursery.start(
            run_incarnation, cell.new_incarnation(), 0.0
        )
        return failed

    async def _stop_child(self, cell: _Cell, why: Exit) -> Exit:
        """Stop one child in order: ask, wait its deadline, cancel, wait again, abandon.

        ``why`` is the ``SHUTDOWN`` exit it ends with if it stops in time.
        """
        incarnation = cell.incarnation
        assert incarnation is not None
        incarnation.handled = True
        if incarnation.done.is_set():
            assert incarnation.exit is not None
            return incarnation.exit
        cell.state = ActorState.STOPPING
        deadline = cell.shutdown_deadline()
        incarnation.stop_with = why
        if cell.actor is None:
            incarnation.scope.cancel()
        elif deadline > 0:
            cell.mailbox.put_system(_Stop(incarnation))
            with trio.move_on_after(deadline):
                await incarnation.done.wait()
        if not incarnation.done.is_set():
            incarnation.kill_reason = f"missed its shutdown deadline of {deadline:g} s"
            incarnation.scope.cancel()
            with trio.move_on_after(deadline if deadline > 0 else DEFAULT_WORKER_SHUTDOWN):
                await incarnation.done.wait()
        if incarnation.exit is None:
            return Exit(ExitKind.KILLED, detail="abandoned: still running after cancellation")
        return incarnation.exit

    async def _stop_all_children(self, why: Exit) -> None:
        for cell in reversed(list(self._children.values())):
            self._remove(cell, await self._stop_child(cell, why))

    def _remove(self, cell: _Cell, exit: Exit) -> None:
        if self._children.get(cell.name) is cell:
            del self._children[cell.name]
        cell.finish(exit)

    def _child(self, name: str) -> _Cell:
        try:
            return self._children[name]
        except KeyError:
            raise LookupError(f"{self.path} has no child named {name!r}") from None

    async def _terminate_child(self, name: str) -> Exit:
        cell = self._child(name)
        exit = await self._stop_child(cell, shutdown("terminated on request"))
        self._remove(cell, exit)
        await self._resume_group_restart()
        return exit

    async def _restart_child(self, name: str) -> ActorRef:
        cell = self._child(name)
        await self._stop_child(cell, shutdown("restarted on request"))
        failed = await self._restart_now(cell)
        if failed is not None:
            # Its ChildExited is still queued and decides, as for any crash, what next.
            error = failed.error or RuntimeError(str(failed))
            raise ActorCrashed(cell.path, error, "restarting") from error
        await self._resume_group_restart()
        return cell.ref

    async def _resume_group_restart(self) -> None:
        """After an operator's restart or terminate: a group restart that a member failing
        to start had broken off waited for that member's exit, which the operation took
        over (``_stop_child``): those after it would have stayed down for good."""
        if self.flags.strategy is not Strategy.ONE_FOR_ONE:
            await self._start_left_waiting(trio.current_time())

    async def _control(self, request: Control) -> None:
        handler = {
            "start": self._start_new_child,
            "terminate": self._terminate_child,
            "restart": self._restart_child,
        }[request.operation]
        try:
            result = await handler(request.argument)
        except (ValueError, LookupError, TypeError, ActorCrashed) as error:
            request.reply.fail(error)
        except BaseException as error:
            request.reply.crashed(self.path, error)
            raise
        else:
            request.reply.succeed(result)


class _GroupDue:
    """A group restart's backoff is over."""

    __slots__ = ("group", "due")

    def __init__(self, group: tuple[str, ...], due: float) -> None:
        self.group = group
        self.due = due


def _count_restart(cell: _Cell) -> None:
    cell.restarts += 1
    cell.system._restarted()
