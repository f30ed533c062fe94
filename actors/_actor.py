"""Actors, their refs, and the task that runs one incarnation of an actor.

Theory of operation: an actor lives in a *cell* that outlasts its restarts: the cell
holds the path, the mailbox, the counters and the monitors; the ``Actor`` object and the
trio task that runs it make up one *incarnation*. A supervisor starts each incarnation
in its own nursery and is told when it ends; the runner catches every ``Exception``, and
lets nothing but the cancellation out of a cancelled actor, so that one actor's crash
never cancels its siblings. A ref points at the cell, so it stays valid across restarts
and only goes dead when the actor ends for good.

A trace is an operator's window on the messages an actor takes. It hangs off the cell, so
it outlives restarts; the actor's loop records into it without ever waiting (a full
buffer drops and counts), and an actor that nobody traces pays one attribute check per
message.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager, nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import outcome
import trio

from ._errors import ActorCrashed, ActorStopped, AskTimeout, safe_repr
from ._exit import NORMAL, Exit, ExitKind, Failure
from ._mailbox import Mailbox, Overflow
from ._restart import DEFAULT_WORKER_SHUTDOWN, ChildSpec
from ._snapshot import ActorSnapshot, ActorState, SupervisorInfo

if TYPE_CHECKING:
    from ._system import ActorSystem

logger = logging.getLogger("actors")

DEFAULT_ASK_TIMEOUT = 5.0
FAILURES_KEPT = 5
DEFAULT_TRACE_CAPACITY = 100
SUMMARY_LENGTH = 200


class Actor:
    """Base class of all actors: private state, a bounded mailbox, one message at a time.

    Subclass it and override ``receive``; optionally ``started``, ``stopping`` and
    ``release``.
    The runtime sets ``ref`` before ``started`` runs. Class attributes declare the
    mailbox: ``mailbox_capacity`` (default 1000) and ``overflow`` (default
    ``Overflow.BACKPRESSURE``); ``runs_tasks = True`` lets it ``start_soon`` tasks.
    """

    mailbox_capacity: ClassVar[int] = 1000
    overflow: ClassVar[Overflow] = Overflow.BACKPRESSURE
    runs_tasks: ClassVar[bool] = False
    _is_supervisor: ClassVar[bool] = False
    _tasks: trio.Nursery | None = None
    _task_scopes: set[trio.CancelScope] = frozenset()  # type: ignore[assignment]
    _tasks_ended: trio.Event | None = None
    # Around ``started`` and the mailbox loop of an actor that runs tasks: a task that
    # raises cancels it, and the incarnation crashes with ``_task_failure``.
    _work_scope: trio.CancelScope | None = None
    _task_failure: Exception | None = None
    _cell: _Cell

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if not cls.__module__.startswith("actors."):
            taken = sorted(name for name in _RUNTIME_NAMES if name in vars(cls))
            if taken:
                raise TypeError(
                    f"{cls.__qualname__} defines {', '.join(taken)}: the runtime's own names"
                )

    @property
    def ref(self) -> ActorRef:
        """This actor's own ref, to hand to others."""
        return self._cell.ref

    @property
    def path(self) -> str:
        return self._cell.path

    @property
    def system(self) -> ActorSystem:
        return self._cell.system

    async def started(self) -> None:
        """Called once per incarnation before the first message. Raising here is a crash."""

    async def receive(self, message: Any) -> Any:
        """Handle one message. The return value is the reply to an ``ask``.

        Raising is a crash: the actor ends and its supervisor decides what comes next;
        an ask being handled fails with ``ActorCrashed``.
        """
        raise TypeError(f"{type(self).__name__} does not handle {type(message).__name__}")

    async def finishing(self, exit: Exit) -> None:
        """Called when the incarnation is stopped in order (by its supervisor, or by
        ``stop``), before its tasks are cancelled: work its tasks have in flight may end
        here, within the child's shutdown deadline. Not called after a crash or a kill;
        a task that raises meanwhile makes the stop a crash, as it would at any time."""

    async def stopping(self, exit: Exit) -> None:
        """Called when the incarnation ends, unless it was killed: release resources here
        (what others count on the actor's behalf goes in ``release``). A supervisor's
        children have stopped by then."""

    def release(self, exit: Exit) -> None:
        """Called last, however the incarnation ended, killed included (``stopping`` then
        did not run): give back here what others count on this actor's behalf.

        Synchronous, so that nothing can cut it short. If it raises, an incarnation that
        ended well is recorded as crashed with that error.
        """

    def stop(self) -> None:
        """End this actor normally once the current message is handled (at once when
        called from one of its tasks while it waits for mail)."""
        cell = self._cell
        if not cell.stop_requested:
            cell.stop_requested = True
            cell.mailbox.put_system(_WAKE)

    def monitor(self, ref: ActorRef) -> Monitor:
        """Watch ``ref``: when it ends for good, a ``Down`` message arrives in ``receive``.

        A restart is not an end. Watching an actor that already ended delivers ``Down``
        at once. The monitor is dropped when this actor ends for good.
        """
        return ref._cell.add_monitor(self._cell)

    def start_soon(self, function: Callable[..., Awaitable[object]], *args: object) -> None:
        """Run ``function(*args)`` as a task that belongs to this incarnation.

        For the I/O an actor waits on besides its mailbox (a socket's reader, a child
        process, a timer). The task is cancelled when the incarnation ends, before
        ``stopping`` runs; if it raises, the actor crashes with that error at once, as if
        ``receive`` had raised it: a ``started`` or ``receive`` under way is cancelled
        (an ask being handled fails with ``ActorCrashed``). Only actors whose class sets
        ``runs_tasks = True`` may start tasks: the others pay for no nursery.
        """
        self._task_nursery_or_raise().start_soon(
            self._run_task, function, args, self._cell.incarnation, self._task_scope()
        )

    async def start(self, function: Callable[..., Awaitable[object]], *args: object) -> Any:
        """Start a task as ``start_soon`` does, and wait until it says it is ready.

        ``function`` is called with a ``task_status`` keyword argument and calls
        ``task_status.started(value)`` once ready (as with ``trio.Nursery.start``);
        ``value`` is returned. An error before that is raised here, so a task started
        from ``started`` that cannot get going fails the actor's start; an error after
        that crashes the actor.
        """
        return await self._task_nursery_or_raise().start(
            self._run_task, function, args, self._cell.incarnation, self._task_scope()
        )

    def _task_nursery_or_raise(self) -> trio.Nursery:
        if self._tasks is None:
            raise RuntimeError(f"{type(self).__name__} must set runs_tasks = True to start tasks")
        return self._tasks

    def _task_scope(self) -> trio.CancelScope:
        """A new task's scope, counted from the moment it is started: a task that has not
        run yet when the incarnation ends never runs."""
        scope = trio.CancelScope()
        self._task_scopes.add(scope)
        if self._tasks_ended is not None:  # the tasks are ending already
            scope.cancel()
        return scope

    async def _run_task(
        self,
        function: Callable[..., Awaitable[object]],
        args: tuple,
        incarnation: Any,
        scope: trio.CancelScope,
        task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        reporting = None if task_status is trio.TASK_STATUS_IGNORED else _Reporting(task_status)
        try:
            with scope:
                if scope.cancel_called:
                    await trio.lowlevel.checkpoint()  # raises Cancelled: never begun
                if reporting is None:
                    await function(*args)
                else:
                    await function(*args, task_status=reporting)
        except Exception as error:
            if reporting is not None and not reporting.reported:
                raise
            if (
                self._tasks_ended is not None
                or self._task_failure is not None
                or incarnation.scope.cancel_called
            ):
                # Its incarnation is ending already: nobody is left to crash.
                _log_late_error(self._cell, "a task", error)
            else:
                # Not queued as mail: the actor may be waiting on what this task was to
                # produce, and would never read it.
                self._task_failure = error
                assert self._work_scope is not None
                self._work_scope.cancel()
        finally:
            self._task_scopes.discard(scope)
            if not self._task_scopes and self._tasks_ended is not None:
                self._tasks_ended.set()

    async def _end_tasks(self) -> None:
        """Cancel this incarnation's tasks and wait until they have ended; from now on,
        a task started (from ``stopping``, say) never runs."""
        self._tasks_ended = trio.Event()
        if not self._task_scopes:
            self._tasks_ended.set()
            return
        for scope in self._task_scopes:
            scope.cancel()
        await self._tasks_ended.wait()

    def _lifetime(self) -> Any:
        if self.runs_tasks:
            return self._task_nursery()
        return _NO_RESOURCES

    @asynccontextmanager
    async def _task_nursery(self) -> AsyncIterator[None]:
        self._task_scopes = set()
        self._work_scope = trio.CancelScope()
        self._task_failure = None
        async with trio.open_nursery() as nursery:
            self._tasks = nursery
            try:
                yield
            finally:
                self._tasks = None
                nursery.cancel_scope.cancel()

    async def _system_message(self, item: Any) -> Exit | None:
        cell = self._cell
        if item.__class__ is _Stop:
            return item.incarnation.stop_with if item.incarnation is cell.incarnation else None
        if item.__class__ is Down:
            await self.receive(item)
            cell.handled += 1
            return None
        if item is _WAKE:
            return None
        raise TypeError(f"{cell.path} got an unexpected system message {item!r}")

    def _introspect(
        self, depth: int | None, children: int | None
    ) -> tuple[tuple[ActorSnapshot, ...], int, SupervisorInfo | None]:
        """Its children's snapshots (``depth`` levels, at most ``children`` of each),
        how many children it has, and its supervisor flags: none for a worker."""
        return (), 0, None

    async def _serve(self) -> Exit:
        cell = self._cell
        mailbox = cell.mailbox
        receive = self.receive
        while not cell.stop_requested:
            item = await mailbox.get()
            if cell.traces:
                _record(cell, item)
            if item.__class__ is tuple:
                message, reply = item
                if reply is None:
                    await receive(message)
                else:
                    try:
                        result = await receive(message)
                    except BaseException as error:
                        if isinstance(error, Exception):
                            reply.crashed(cell.path, error)
                        elif self._task_failure is not None:
                            # Cut short by one of its tasks: that is the crash.
                            reply.crashed(cell.path, self._task_failure)
                        else:
                            # Killed mid-request: the asker learns now, not at its deadline.
                            reply.fail(
                                ActorCrashed(cell.path, error, "handling the request (cancelled)")
                            )
                        raise
                    reply.succeed(result)
                cell.handled += 1
            else:
                exit = await self._system_message(item)
                if exit is not None:
                    return exit
        return NORMAL


# What the runtime itself defines on Actor: a subclass that defined one would silently
# replace the actor's own machinery (its mailbox loop, its tasks).
_RUNTIME_NAMES = frozenset(
    name for name in vars(Actor) if name.startswith("_") and not name.startswith("__")
) | {"_children", "_window", "_random", "_nursery", "_initial_children"}


class _NoResources:
    async def __aenter__(self) -> None:
        return None

    async def __aexit__(self, *exc_info: object) -> None:
        return None


_NO_RESOURCES = _NoResources()
_NO_SCOPE = nullcontext()


@dataclass(frozen=True)
class Down:
    """Sent to a monitoring actor when the actor behind ``ref`` ended for good."""

    ref: ActorRef
    exit: Exit


@dataclass(frozen=True)
class TracedMessage:
    """One message an actor took from its mailbox, as a trace records it.

    ``at`` is ``trio.current_time()`` when the actor took it; ``kind`` is ``"tell"``,
    ``"ask"`` or ``"system"`` (a ``Down`` delivered to ``receive``); ``message_type`` is
    the qualified name of the message's class; ``summary`` is its repr cut to at most 200
    characters, or a stand-in when its ``__repr__`` fails.
    """

    at: float
    path: str
    kind: str
    message_type: str
    summary: str


class Trace:
    """A bounded stream of the messages one actor takes, made by ``ActorRef.trace``.

    Use it as an async context manager and iterate it inside the block; it records from
    the moment the block is entered and is removed from the actor when the block exits,
    however it exits. Iteration ends once the actor ended for good (after what was
    recorded before the end) or once the block exited. A restart does not end it.

    Recording never makes the actor wait: when ``capacity`` messages are waiting to be
    read, further ones are not recorded and are counted in ``dropped`` instead.
    """

    __slots__ = ("_cell", "capacity", "dropped", "_buffer", "_readers", "_state")

    def __init__(self, cell: _Cell, capacity: int) -> None:
        self._cell = cell
        self.capacity = capacity
        self.dropped = 0
        self._buffer: deque[TracedMessage] = deque()
        self._readers = trio.lowlevel.ParkingLot()
        self._state = "new"

    @property
    def path(self) -> str:
        """The path of the traced actor."""
        return self._cell.path

    async def __aenter__(self) -> Trace:
        if self._state != "new":
            raise RuntimeError("a trace can be entered only once")
        # Before registering: a cancellation here must not leave a trace no exit removes.
        await trio.lowlevel.checkpoint()
        cell = self._cell
        if cell.exit is None:
            self._state = "open"
            cell.traces = (*cell.traces, self)
        else:
            self._state = "ended"
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        # No checkpoint here: a cancelled tracer must still leave nothing behind.
        cell = self._cell
        if self in cell.traces:
            cell.traces = tuple(trace for trace in cell.traces if trace is not self)
        self._buffer.clear()
        self._state = "closed"
        self._readers.unpark_all()

    def __aiter__(self) -> Trace:
        return self

    async def __anext__(self) -> TracedMessage:
        if self._state == "new":
            raise RuntimeError("enter the trace with 'async with' before iterating it")
        await trio.lowlevel.checkpoint_if_cancelled()
        if self._buffer or self._state != "open":
            await trio.lowlevel.cancel_shielded_checkpoint()
        while not self._buffer and self._state == "open":
            await self._readers.park()
        if self._buffer:
            return self._buffer.popleft()
        raise StopAsyncIteration

    def _end(self) -> None:
        if self._state == "open":
            self._state = "ended"
            self._readers.unpark_all()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self._cell.path} {self._state}, dropped {self.dropped}>"


def _record(cell: _Cell, item: Any) -> None:
    """Record a message the actor just took into each of its traces that has room."""
    if item.__class__ is tuple:
        message, reply = item
        kind = "tell" if reply is None else "ask"
    elif item.__class__ is Down:
        message, kind = item, "system"
    else:
        return  # stop requests, child exits and the like never reach ``receive``
    traced = None
    for trace in cell.traces:
        if len(trace._buffer) >= trace.capacity:
            trace.dropped += 1
            continue
        if traced is None:
            summary = safe_repr(message)
            if len(summary) > SUMMARY_LENGTH:
                summary = summary[: SUMMARY_LENGTH - 3] + "..."
            traced = TracedMessage(
                trio.current_time(), cell.path, kind, type(message).__qualname__, summary
            )
        trace._buffer.append(traced)
        if trace._readers:
            trace._readers.unpark_all()


async def _stopping(actor: Actor, exit: Exit) -> Exit:
    """Run the actor's ``stopping``; returns the exit, a crash if it raised."""
    try:
        await actor.stopping(exit)
    except Exception as error:
        if exit.kind is ExitKind.CRASHED:
            _log_late_error(actor._cell, "stopping", error)
        else:
            return Exit(ExitKind.CRASHED, error)
    return exit


def _let_go_of_tracebacks(exit: Exit) -> None:
    """Drop the traceback of an actor's last error, and those of the errors it was raised
    while handling and of those it groups: its exit outlives it (in its ref, in a
    ``Down``), and their frames held the actor and all it had. Its snapshot has the
    traceback as text (``Failure``), the log too. The frames are not cleared: one may
    be a coroutine's that still runs (an error caught there, raised again here), which
    clearing would end. Nor is the error it was raised from followed: that may be
    another actor's, whose own failure is still to be recorded."""
    pending = [] if exit.error is None else [exit.error]
    seen: set[int] = set()
    while pending:
        error = pending.pop()
        if id(error) in seen:
            continue
        seen.add(id(error))
        error.__traceback__ = None
        if error.__context__ is not None:
            pending.append(error.__context__)
        if isinstance(error, BaseExceptionGroup):
            pending.extend(error.exceptions)


# Wakes an actor waiting for mail, to see that one of its tasks asked it to stop.
_WAKE = object()


def _log_late_error(cell: _Cell, where: str, error: Exception) -> None:
    """An error raised where it can no longer change how the incarnation ends."""
    logger.warning("%s: %s raised after its end was decided: %s", cell.path, where,
                   safe_repr(error), exc_info=error)


class _Stop:
    """Stop in order, with the ``SHUTDOWN`` exit in the incarnation's ``stop_with``."""

    __slots__ = ("incarnation",)

    def __init__(self, incarnation: _Incarnation) -> None:
        self.incarnation = incarnation


class _Reporting:
    """A task's status that remembers whether the task said it was ready."""

    __slots__ = ("status", "reported")

    def __init__(self, status: trio.TaskStatus[Any]) -> None:
        self.status = status
        self.reported = False

    def started(self, value: Any = None) -> None:
        self.reported = True
        self.status.started(value)


class ChildExited:
    """System message to a supervisor: one incarnation of a child ended."""

    __slots__ = ("incarnation",)

    def __init__(self, incarnation: _Incarnation) -> None:
        self.incarnation = incarnation


class Control:
    """System message to a supervisor: start, terminate or restart a child."""

    __slots__ = ("operation", "argument", "reply")

    def __init__(self, operation: str, argument: Any, reply: Reply) -> None:
        self.operation = operation
        self.argument = argument
        self.reply = reply


class Reply:
    """The pending answer to one ask; resolved at most once, by the receiving actor."""

    __slots__ = ("_task", "_outcome")

    def __init__(self) -> None:
        self._task: trio.lowlevel.Task | None = None
        self._outcome: outcome.Outcome | None = None

    def succeed(self, value: Any) -> None:
        self._resolve(outcome.Value(value))

    def fail(self, error: BaseException) -> None:
        self._resolve(outcome.Error(error))

    def crashed(self, path: str, error: BaseException) -> None:
        crash = ActorCrashed(path, error)
        crash.__cause__ = error
        self.fail(crash)

    def _resolve(self, result: outcome.Outcome) -> None:
        if self._outcome is not None:
            return
        self._outcome = result
        task = self._task
        if task is not None:
            self._task = None
            trio.lowlevel.reschedule(task)

    async def wait(self) -> Any:
        if self._outcome is None:
            self._task = trio.lowlevel.current_task()

            def abort(_: Any) -> trio.lowlevel.Abort:
                self._task = None
                return trio.lowlevel.Abort.SUCCEEDED

            await trio.lowlevel.wait_task_rescheduled(abort)
        assert self._outcome is not None
        return self._outcome.unwrap()


class ActorRef:
    """The only handle others hold on an actor. Valid across restarts; dead once it stopped."""

    __slots__ = ("_cell",)

    def __init__(self, cell: _Cell) -> None:
        self._cell = cell

    @property
    def path(self) -> str:
        return self._cell.path

    @property
    def alive(self) -> bool:
        """False once the actor ended for good."""
        return self._cell.exit is None

    async def tell(self, message: Any) -> None:
        """Send ``message`` without waiting for it to be handled.

        Returns as soon as the message is in the mailbox. On a full mailbox the
        receiver's overflow policy applies: backpressure waits for room, drop drops and
        counts, fail raises ``MailboxFull``. A message to a stopped actor is counted as a
        dead letter and otherwise ignored.
        """
        await self._cell.mailbox.put((message, None))

    def tell_nowait(self, message: Any) -> None:
        """Like ``tell``, but never waits: a full backpressure mailbox raises ``MailboxFull``."""
        self._cell.mailbox.put_nowait((message, None))

    async def ask(self, message: Any, *, timeout: float = DEFAULT_ASK_TIMEOUT) -> Any:
        """Send ``message`` and wait for the value the receiver's ``receive`` returns.

        Raises:
            AskTimeout: no reply within ``timeout`` seconds (waiting for mailbox room
                included).
            ActorCrashed: the receiver raised while handling this message.
            ActorStopped: the receiver ended for good before handling it.
            MailboxFull: the mailbox is full and its policy is drop or fail.
        """
        reply = Reply()
        with trio.move_on_after(timeout):
            await self._cell.mailbox.put((message, reply))
            return await reply.wait()
        raise AskTimeout(self._cell.path, timeout)

    def snapshot(self, *, depth: int | None = None, children: int | None = None
                 ) -> ActorSnapshot:
        """The actor (and, for a supervisor, its subtree) as data, now.

        ``depth`` levels of children below it (None: all; 0: none), and at most
        ``children`` of each supervisor's (None: all; the first in start order): a
        snapshot costs the broker's thread for each actor in it. ``child_count`` still
        says how many children each has.
        """
        return self._cell.snapshot(depth, children)

    def kill(self, reason: str = "killed") -> None:
        """Cancel the actor's current run at once; its supervisor sees it as killed."""
        self._cell.kill(reason)

    def trace(self, capacity: int = DEFAULT_TRACE_CAPACITY) -> Trace:
        """A trace of the messages this actor takes, to use with ``async with``.

        ``capacity`` is how many recorded messages may wait to be read; beyond that the
        trace drops and counts them, so a slow reader never slows the actor. Messages are
        recorded when the actor takes them from its mailbox: ``tell``, ``ask`` and
        ``Down``. Several traces of one actor may be open at once.

        Raises:
            ValueError: ``capacity`` is not a positive integer.
        """
        if not isinstance(capacity, int) or capacity < 1:
            raise ValueError(f"trace capacity must be a positive integer, not {capacity!r}")
        return Trace(self._cell, capacity)

    async def join(self) -> Exit:
        """Wait until the actor ended for good; return how it ended."""
        cell = self._cell
        if cell.exit is None:
            if cell.ended is None:
                cell.ended = trio.Event()
            await cell.ended.wait()
        else:
            await trio.lowlevel.checkpoint()
        assert cell.exit is not None
        return cell.exit

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ActorRef) and other._cell is self._cell

    def __hash__(self) -> int:
        return id(self._cell)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self._cell.path}>"


class SupervisorRef(ActorRef):
    """A ref to a supervisor, with OTP's child management calls.

    Each call waits up to ``timeout`` seconds (default: as long as it takes, since
    starting and stopping children run user code with deadlines of their own).
    """

    __slots__ = ()

    async def start_child(self, spec: ChildSpec, *, timeout: float = math.inf) -> ActorRef:
        """Start a new child and return its ref once its ``started`` hook returned.

        Raises:
            ValueError: a child with that name exists.
            ActorCrashed: the child failed to start (it is not kept).
            ActorStopped: the supervisor is gone.
        """
        result: ActorRef = await self._control("start", spec, timeout)
        return result

    async def terminate_child(self, name: str, *, timeout: float = math.inf) -> Exit:
        """Stop a child in order and remove it; return how it ended.

        Raises ``LookupError`` for an unknown name.
        """
        result: Exit = await self._control("terminate", name, timeout)
        return result

    async def restart_child(self, name: str, *, timeout: float = math.inf) -> ActorRef:
        """Stop a child in order and start it again (counted as a restart).

        Raises ``LookupError`` for an unknown name.
        """
        result: ActorRef = await self._control("restart", name, timeout)
        return result

    def which_children(self) -> tuple[ActorSnapshot, ...]:
        """Snapshots of the children (without theirs), in start order."""
        return self.snapshot(depth=1).children

    async def _control(self, operation: str, argument: Any, timeout: float) -> Any:
        reply = Reply()
        await trio.lowlevel.checkpoint_if_cancelled()
        if not self._cell.mailbox.put_system(Control(operation, argument, reply)):
            raise ActorStopped(self.path)
        with trio.move_on_after(timeout):
            return await reply.wait()
        raise AskTimeout(self.path, timeout)


class Monitor:
    """A watch of one actor by another; ``cancel`` ends it."""

    __slots__ = ("target", "watcher")

    def __init__(self, target: _Cell, watcher: _Cell) -> None:
        self.target = target
        self.watcher = watcher

    def cancel(self) -> None:
        if self.target.monitors is not None:
            self.target.monitors.discard(self)
        if self.watcher.monitoring is not None:
            self.watcher.monitoring.discard(self)


class _Incarnation:
    __slots__ = (
        "cell",
        "scope",
        "done",
        "exit",
        "handled",
        "started_at",
        "kill_reason",
        "stop_with",
    )

    def __init__(self, cell: _Cell) -> None:
        self.cell = cell
        self.scope = trio.CancelScope()
        self.done = trio.Event()
        self.exit: Exit | None = None
        # Set once the supervisor has dealt with this incarnation's end, so that a late
        # ChildExited for it is ignored.
        self.handled = False
        self.started_at: float | None = None
        self.kill_reason = ""
        # The ``SHUTDOWN`` exit, with its reason, once its supervisor asks it to stop.
        self.stop_with: Exit | None = None


class _Cell:
    __slots__ = (
        "name",
        "path",
        "spec",
        "parent",
        "system",
        "mailbox",
        "ref",
        "actor",
        "actor_class",
        "incarnation",
        "state",
        "stop_requested",
        "handled",
        "restarts",
        "consecutive_failures",
        "failures",
        "monitors",
        "monitoring",
        "exit",
        "ended",
        "traces",
        "restart_at",
    )

    def __init__(self, spec: ChildSpec, parent: _Cell | None, system: ActorSystem) -> None:
        self.name = spec.name
        self.path = f"{parent.path if parent else ''}/{spec.name}"
        self.spec = spec
        self.parent = parent
        self.system = system
        self.mailbox = Mailbox(self.path, system.dead_letters)
        self.ref: ActorRef = ActorRef(self)
        self.actor: Actor | None = None
        self.actor_class = ""
        self.incarnation: _Incarnation | None = None
        self.state = ActorState.STARTING
        self.stop_requested = False
        self.handled = 0
        self.restarts = 0
        self.consecutive_failures = 0
        # Made on first use: most actors are never watched, never fail and never joined,
        # and a hundred thousand idle actors should not pay for empty containers.
        self.failures: tuple[Failure, ...] = ()
        self.monitors: set[Monitor] | None = None
        self.monitoring: set[Monitor] | None = None
        self.exit: Exit | None = None
        self.ended: trio.Event | None = None
        # Replaced, never mutated, so the actor's loop may go through it while a trace
        # is entered or exited.
        self.traces: tuple[Trace, ...] = ()
        # When a restart waiting out its backoff is due (trio time), else None.
        self.restart_at: float | None = None
        system._register(self)

    def new_incarnation(self) -> _Incarnation:
        self.incarnation = incarnation = _Incarnation(self)
        self.stop_requested = False
        return incarnation

    def shutdown_deadline(self) -> float:
        if self.spec.shutdown is not None:
            return self.spec.shutdown
        actor_class = self.actor.__class__ if self.actor is not None else None
        if actor_class is not None and actor_class._is_supervisor:
            return math.inf
        return DEFAULT_WORKER_SHUTDOWN

    def kill(self, reason: str) -> None:
        incarnation = self.incarnation
        if incarnation is not None and not incarnation.done.is_set():
            incarnation.kill_reason = reason
            incarnation.scope.cancel()

    def add_monitor(self, watcher: _Cell) -> Monitor:
        monitor = Monitor(self, watcher)
        if self.exit is not None:
            watcher.mailbox.put_system(Down(self.ref, self.exit))
        else:
            if self.monitors is None:
                self.monitors = set()
            if watcher.monitoring is None:
                watcher.monitoring = set()
            self.monitors.add(monitor)
            watcher.monitoring.add(monitor)
        return monitor

    def finish(self, exit: Exit) -> None:
        """End this actor for good: forget it, fail what waits on it, tell its watchers."""
        if self.exit is not None:
            return
        self.exit = exit
        self.state = ActorState.STOPPED
        self.actor = None
        _let_go_of_tracebacks(exit)
        if self.incarnation is not None and self.incarnation.exit is not None:
            _let_go_of_tracebacks(self.incarnation.exit)
        self.system._forget(self)
        user, system = self.mailbox.close()
        for _message, reply in user:
            if reply is None:
                self.system.dead_letters.count += 1
            else:
                reply.fail(ActorStopped(self.path))
        for item in system:
            if item.__class__ is Control:
                item.reply.fail(ActorStopped(self.path))
        for monitor in list(self.monitoring or ()):
            monitor.cancel()
        if self.monitors:
            down = Down(self.ref, exit)
            for monitor in list(self.monitors):
                monitor.watcher.mailbox.put_system(down)
                monitor.cancel()
        if self.ended is not None:
            self.ended.set()
        traces, self.traces = self.traces, ()
        for trace in traces:
            trace._end()

    def record_failure(self, exit: Exit) -> None:
        recent = self.failures[-(FAILURES_KEPT - 1) :] if FAILURES_KEPT > 1 else ()
        self.failures = (*recent, Failure.of(exit, trio.current_time()))

    def snapshot(self, depth: int | None = None, children: int | None = None
                 ) -> ActorSnapshot:
        actor = self.actor
        below: tuple[ActorSnapshot, ...] = ()
        child_count = 0
        supervisor = None
        if actor is not None:
            below, child_count, supervisor = actor._introspect(depth, children)
        incarnation = self.incarnation
        uptime = 0.0
        if (
            self.state is ActorState.RUNNING
            and incarnation is not None
            and incarnation.started_at is not None
        ):
            uptime = trio.current_time() - incarnation.started_at
        restart_in = None
        if self.restart_at is not None:
            restart_in = max(0.0, self.restart_at - trio.current_time())
        return ActorSnapshot(
            path=self.path,
            name=self.name,
            actor_class=self.actor_class,
            state=self.state,
            mailbox_depth=len(self.mailbox),
            mailbox_capacity=self.mailbox.capacity,
            overflow=self.mailbox.overflow.value,
            messages_handled=self.handled,
            messages_dropped=self.mailbox.dropped,
            restarts=self.restarts,
            uptime=uptime,
            failures=self.failures,
            children=below,
            child_count=child_count,
            supervisor=supervisor,
            restart_in=restart_in,
            traces=len(self.traces),
        )


async def run_incarnation(
    incarnation: _Incarnation,
    delay: float,
    task_status: trio.TaskStatus[Exit | None] = trio.TASK_STATUS_IGNORED,
) -> bool:
    """Run one incarnation of a cell's actor to its end, then report the end to the parent.

    ``task_status.started`` gets None once the actor's ``started`` hook returned, or the
    ``Exit`` if the incarnation ended before that. Returns whether it had started.
    """
    cell = incarnation.cell
    exit: Exit | None = None
    reported_start = False
    actor: Actor | None = None
    try:
        with incarnation.scope:
            if delay > 0:
                cell.state = ActorState.RESTARTING
                cell.restart_at = trio.current_time() + delay
                try:
                    await trio.sleep(delay)
                finally:
                    cell.restart_at = None
            else:
                # A stop or kill that came before this runner first ran ends it here,
                # before a fresh actor is built and started under cancellation.
                await trio.lowlevel.checkpoint_if_cancelled()
            cell.state = ActorState.STARTING
            try:
                made = cell.spec.start()
                if not isinstance(made, Actor):
                    raise TypeError(
                        f"the start function of {cell.path} returned {made!r}, not an Actor"
                    )
                actor = made
                actor._cell = cell
                actor_class = actor.__class__
                if actor_class._is_supervisor and cell.ref.__class__ is ActorRef:
                    cell.ref = SupervisorRef(cell)
                cell.mailbox.configure(actor_class.mailbox_capacity, actor_class.overflow)
                cell.actor = actor
                cell.actor_class = actor_class.__qualname__
                incarnation.started_at = trio.current_time()
                async with actor._lifetime():
                    try:
                        with actor._work_scope or _NO_SCOPE:
                            await actor.started()
                            cell.state = ActorState.RUNNING
                            task_status.started(None)
                            reported_start = True
                            # Let go of the start-up nursery trio keeps behind task_status.
                            task_status = trio.TASK_STATUS_IGNORED
                            exit = await actor._serve()
                            await actor.finishing(exit)
                    except Exception as error:
                        exit = Exit(ExitKind.CRASHED, error)
                    if actor._task_failure is not None:
                        # One of its tasks raised and cut ``started`` or ``receive`` short.
                        exit = Exit(ExitKind.CRASHED, actor._task_failure)
                    cell.state = ActorState.STOPPING
                    await actor._end_tasks()
                    exit = await _stopping(actor, exit)
            except Exception as error:
                exit = Exit(ExitKind.CRASHED, error)
                if actor is not None and cell.state is ActorState.STARTING:
                    # Its lifetime did not begin: a supervisor whose children did not start.
                    exit = await _stopping(actor, exit)
            except BaseExceptionGroup as group:
                # Cancelled while a nursery of its own had a task raise on the way out. The
                # cancellation decides the end; the errors must not escape into the
                # parent's nursery, where they would take the siblings down with them.
                errors, cancelled = group.split(Exception)
                if cancelled is None:
                    raise  # not cancelled at all: as any other error here, it escapes
                if errors is not None:
                    _log_late_error(cell, "its code unwinding from a cancellation", errors)
                raise cancelled from None
        if incarnation.scope.cancelled_caught:
            if actor is None and incarnation.stop_with is not None:
                exit = incarnation.stop_with
            else:
                exit = Exit(ExitKind.KILLED, detail=incarnation.kill_reason or "cancelled")
    finally:
        if exit is None:
            exit = Exit(ExitKind.KILLED, detail="cancelled with its parent")
        if actor is not None:
            try:
                actor.release(exit)
            except Exception as error:
                if exit.abnormal:
                    _log_late_error(cell, "release", error)
                else:
                    exit = Exit(ExitKind.CRASHED, error)
        incarnation.exit = exit
        # An abandoned incarnation that ends late must not touch its successor's state.
        if cell.incarnation is incarnation:
            cell.actor = None
            if cell.exit is None:
                cell.state = ActorState.RESTARTING
            if exit.abnormal:
                cell.record_failure(exit)
        incarnation.done.set()
        if not reported_start:
            task_status.started(exit)
        if cell.parent is not None:
            cell.parent.mailbox.put_system(ChildExited(incarnation))
    return reported_start
