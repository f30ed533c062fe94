"""The actor system: the root supervisor, the registry of live actors by path."""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import trio

from ._actor import ActorRef, SupervisorRef, _Cell, _Incarnation, _Stop, run_incarnation
from ._errors import ActorCrashed, ActorError, ActorStopped
from ._exit import SYSTEM_SHUTDOWN, Exit, ExitKind
from ._mailbox import DeadLetters
from ._restart import ChildSpec, SupervisorFlags, validate_name
from ._snapshot import ActorActivity, ActorSnapshot
from ._supervisor import Supervisor

DEFAULT_SHUTDOWN_TIMEOUT = 10.0


@dataclass(frozen=True)
class SystemStatistics:
    """Counts for the whole system, cheap to take at any size (no snapshot of each
    actor): live actors, restarts since the system started (those of actors that ended
    since included: the count only goes up), the messages waiting in live actors'
    mailboxes, and messages told to stopped ones."""

    actors: int
    dead_letters: int
    restarts: int
    mailbox_depth_max: int
    mailbox_depth_total: int


class ActorSystem:
    """A tree of actors under one root supervisor, with lookup by path.

    Made by ``open_system``; not constructed directly.
    """

    def __init__(self, name: str) -> None:
        validate_name(name)
        self.name = name
        self.dead_letters = DeadLetters()
        self._registry: dict[str, _Cell] = {}
        self._root: _Cell | None = None
        self._failure: Exception | None = None
        self._shutting_down = False
        self._restarts = 0

    @property
    def shutting_down(self) -> bool:
        """Whether the system is stopping: from the moment ``open_system``'s block is left,
        so also for an actor cancelled when the shutdown ran out of time."""
        return self._shutting_down

    @property
    def root(self) -> SupervisorRef:
        """The root supervisor, at path ``/<name>``."""
        assert self._root is not None
        ref = self._root.ref
        assert isinstance(ref, SupervisorRef)
        return ref

    async def spawn(self, spec: ChildSpec) -> ActorRef:
        """Start a child of the root supervisor; see ``SupervisorRef.start_child``."""
        return await self.root.start_child(spec)

    def lookup(self, path: str) -> ActorRef | None:
        """The live actor at ``path`` (e.g. ``/broker/sessions/abc``), or None."""
        cell = self._registry.get(path)
        return cell.ref if cell is not None else None

    def paths(self) -> list[str]:
        """The paths of the live actors, in no particular order: what a snapshot of the
        whole tree would walk, without the snapshot's cost."""
        return list(self._registry)

    def activity(self) -> list[ActorActivity]:
        """Every live actor's counters, in no particular order: a few microseconds an
        actor, where a snapshot of the whole tree costs several times that."""
        return [
            ActorActivity(cell.path, cell.state, len(cell.mailbox), cell.handled,
                          cell.mailbox.dropped, cell.restarts)
            for cell in self._registry.values()
        ]

    def snapshot(self, depth: int | None = None, children: int | None = None
                 ) -> ActorSnapshot:
        """The tree as data, from the root: all of it, or as ``ActorRef.snapshot``
        bounds it."""
        assert self._root is not None
        return self._root.snapshot(depth, children)

    def statistics(self) -> SystemStatistics:
        cells = self._registry.values()
        depths = [len(cell.mailbox) for cell in cells]
        return SystemStatistics(
            actors=len(depths),
            dead_letters=self.dead_letters.count,
            restarts=self._restarts,
            mailbox_depth_max=max(depths, default=0),
            mailbox_depth_total=sum(depths),
        )

    def _restarted(self) -> None:
        self._restarts += 1

    def _register(self, cell: _Cell) -> None:
        self._registry[cell.path] = cell

    def _forget(self, cell: _Cell) -> None:
        if self._registry.get(cell.path) is cell:
            del self._registry[cell.path]

    async def _run_root(
        self,
        incarnation: _Incarnation,
        system_scope: trio.CancelScope,
        task_status: trio.TaskStatus[Exit | None],
    ) -> None:
        # Shielded once started: when the body of open_system is cancelled, the tree is
        # still stopped in order, children in reverse, by the shutdown in open_system's
        # finally. Not before: a start cancelled (Ctrl-C while a child starts) leaves no
        # body and no shutdown, and a shielded root would never end.
        with trio.CancelScope() as scope:
            started = await run_incarnation(
                incarnation, 0.0, task_status=_ShieldedOnceStarted(scope, task_status))
        exit = incarnation.exit
        assert exit is not None
        incarnation.cell.finish(exit)
        if started and exit.abnormal and not incarnation.handled:
            if exit.kind is ExitKind.CRASHED and isinstance(exit.error, Exception):
                self._failure = exit.error
            else:
                self._failure = ActorError(f"the root supervisor ended: {exit}")
            system_scope.cancel()

    async def _shutdown(self, timeout: float) -> None:
        assert self._root is not None
        incarnation = self._root.incarnation
        assert incarnation is not None
        incarnation.handled = True
        self._shutting_down = True
        if not incarnation.done.is_set():
            incarnation.stop_with = SYSTEM_SHUTDOWN
            self._root.mailbox.put_system(_Stop(incarnation))
            with trio.move_on_after(timeout):
                await incarnation.done.wait()
        if not incarnation.done.is_set():
            incarnation.kill_reason = f"missed the system's shutdown deadline of {timeout:g} s"
            incarnation.scope.cancel()
            await incarnation.done.wait()


class _ShieldedOnceStarted:
    """A task status whose ``started`` shields ``scope`` once the task has moved to the
    nursery that started it (not when that start was cancelled meanwhile: the task then
    stays where it was, cancelled, and trio lets it end on its own)."""

    def __init__(self, scope: trio.CancelScope, task_status: trio.TaskStatus[Any]) -> None:
        self.scope = scope
        self.task_status = task_status

    def started(self, value: Any = None) -> None:
        self.task_status.started(value)
        if trio.current_effective_deadline() != -math.inf:
            self.scope.shield = True


@asynccontextmanager
async def open_system(
    name: str = "system",
    *,
    children: Iterable[ChildSpec] = (),
    flags: SupervisorFlags = SupervisorFlags(),
    shutdown_timeout: float = DEFAULT_SHUTDOWN_TIMEOUT,
) -> AsyncIterator[ActorSystem]:
    """Run an actor system for the duration of the ``async with`` block.

    The root supervisor ``/<name>`` starts ``children`` in order with ``flags``. Leaving
    the block (normally, by an exception, or by cancellation) stops the whole tree in
    order, children in reverse, within ``shutdown_timeout`` seconds; whatever is still
    running then is cancelled. If the root supervisor itself fails (its restart
    intensity was exceeded), the block is cancelled and the failure is raised from it.

    Raises:
        ActorCrashed: a child failed to start.
        Exception: what the block raised, itself (not in an exception group), once the
            tree has stopped.
    """
    if not shutdown_timeout >= 0 or math.isnan(shutdown_timeout):
        raise ValueError("shutdown_timeout must be >= 0")
    children = tuple(children)
    system = ActorSystem(name)
    root = _Cell(
        ChildSpec(name, lambda: Supervisor(children, flags)), parent=None, system=system
    )
    system._root = root
    body_error: Exception | None = None
    async with trio.open_nursery() as nursery:
        incarnation = root.new_incarnation()
        failed: Exit | None = await nursery.start(
            system._run_root, incarnation, nursery.cancel_scope
        )
        if failed is None:
            try:
                yield system
            except Exception as error:
                body_error = error
            finally:
                with trio.CancelScope(shield=True):
                    await system._shutdown(shutdown_timeout)
    # Raised out here, not inside the nursery, so callers see the error itself rather
    # than an exception group around it.
    if body_error is not None:
        raise body_error
    if failed is not None:
        if isinstance(failed.error, ActorCrashed):
            raise failed.error
        raise ActorCrashed(root.path, failed.error or ActorStopped(root.path), "starting")
    if system._failure is not None:
        raise system._failure
