"""The one module that touches both asyncio and trio.

aiortc and asyncssh are asyncio libraries; actors and supervisors are trio code. Every
process of ours therefore runs an asyncio event loop as the host with trio as a guest
inside it (``trio.lowlevel.start_guest_run``): asyncio keeps its full speed, trio keeps
its cancel scopes and clock, and nobody imports trio-asyncio (which swaps the global
event loop policy and slows every asyncio library in the process down).

Both worlds share one thread but not one run context. Trio's APIs only work while trio
itself is stepping a task; asyncio callbacks (``Task.add_done_callback``, aiortc's
``connectionstatechange``, a data channel's ``message``) run between trio's steps, so
they must never touch trio objects directly. Every crossing is funnelled through here
and handed over with ``TrioToken.run_sync_soon``:

- :func:`run` starts the host loop and the trio guest and turns SIGINT/SIGTERM into a
  clean cancellation of the trio main function.
- :func:`call_asyncio` runs an asyncio coroutine from trio, with results, exceptions
  and cancellation carried in both directions.
- :func:`post_to` gives asyncio callbacks a plain function that delivers a message into
  an actor's mailbox.

Only control events should cross: the per-message data path (data-channel messages,
media frames) stays on the asyncio side, where it runs measurably faster than trio code
driving aiortc message by message.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
from collections.abc import Awaitable, Callable
from typing import Generic, Protocol, TypeVar

import outcome
import trio

from ._errors import ActorStopped, MailboxFull

__all__ = [
    "AsyncioTaskCancelled",
    "Interrupted",
    "SupportsTellNowait",
    "call_asyncio",
    "post_to",
    "run",
]

logger = logging.getLogger(__name__)

T = TypeVar("T")
MessageT_contra = TypeVar("MessageT_contra", contravariant=True)

_HANDLED_SIGNALS = (signal.SIGINT, signal.SIGTERM)

_host_loop: trio.lowlevel.RunVar[asyncio.AbstractEventLoop] = trio.lowlevel.RunVar(
    "actors.bridge.host_loop"
)


class Interrupted(Exception):
    """:func:`run` was stopped by a signal; the trio main function has fully unwound.

    Attributes:
        signal_number: The number of the signal that arrived first (``signal.SIGINT``
            or ``signal.SIGTERM``).
    """

    def __init__(self, signal_number: int) -> None:
        super().__init__(f"interrupted by {signal.Signals(signal_number).name}")
        self.signal_number = signal_number


class AsyncioTaskCancelled(Exception):
    """The asyncio task behind :func:`call_asyncio` was cancelled from the asyncio side.

    Raised in trio instead of ``asyncio.CancelledError``, which is a ``BaseException``
    that trio code would mistake for a cancellation of its own. The original
    ``CancelledError`` is the ``__cause__``.
    """


class SupportsTellNowait(Protocol[MessageT_contra]):
    """Anything with a synchronous, trio-only ``tell_nowait``, such as an actor's ref."""

    def tell_nowait(self, message: MessageT_contra, /) -> None:
        """Put ``message`` into the mailbox without waiting, or raise ``MailboxFull``."""


class _GuestRun(Generic[T]):
    """What the host side needs to know about the trio guest it started."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.finished: asyncio.Future[outcome.Outcome[T]] = loop.create_future()
        self.trio_token: trio.lowlevel.TrioToken | None = None
        self.main_scope: trio.CancelScope | None = None
        self.signal_number: int | None = None
        self.cancel_requested = False

    def on_done(self, run_outcome: outcome.Outcome[T]) -> None:
        self.finished.set_result(run_outcome)

    def on_signal(self, signal_number: int) -> None:
        if self.signal_number is None:
            self.signal_number = signal_number
        self.cancel_main()

    def cancel_main(self) -> None:
        # Runs as an asyncio callback, outside trio's run context, so the cancel itself
        # has to be handed to trio. Before the guest main has started there is no token
        # yet; the guest main then sees `cancel_requested` and cancels itself.
        self.cancel_requested = True
        if self.trio_token is None or self.main_scope is None:
            return
        try:
            self.trio_token.run_sync_soon(self.main_scope.cancel)
        except trio.RunFinishedError:
            pass

    def wait(self) -> outcome.Outcome[T]:
        try:
            return self.loop.run_until_complete(self.finished)
        except BaseException as broke_out:
            # Something broke out of the host loop itself (loop.stop(), or a
            # KeyboardInterrupt when signals are not ours). Trio's state is undefined if
            # its host stops under it, so let the guest unwind before giving up, however
            # often the loop is stopped again meanwhile.
            while not self.finished.done():
                self.cancel_main()
                try:
                    self.loop.run_until_complete(self.finished)
                except BaseException:
                    continue
            unwound = self.finished.result()
            if isinstance(unwound, outcome.Error):
                # What main raised while it unwound is not lost.
                broke_out.__context__ = unwound.error
            raise


async def _guest_main(
    guest: _GuestRun[T], main: Callable[..., Awaitable[T]], args: tuple[object, ...]
) -> T:
    _host_loop.set(guest.loop)
    guest.trio_token = trio.lowlevel.current_trio_token()
    with trio.CancelScope() as scope:
        guest.main_scope = scope
        if guest.cancel_requested:
            scope.cancel()
        return await main(*args)
    # Reached only when `main` was cancelled through its scope and has unwound.
    if guest.signal_number is None:
        # The host loop broke out from under the guest; `run` raises that error instead.
        raise RuntimeError("the asyncio host loop stopped before the trio run finished")
    raise Interrupted(guest.signal_number)


def run(
    main: Callable[..., Awaitable[T]],
    *args: object,
    handle_signals: bool = True,
    clock: trio.abc.Clock | None = None,
) -> T:
    """Run ``main(*args)`` as a trio guest on a fresh asyncio event loop.

    Like ``asyncio.run`` for the host side: a new loop is created and set as the current
    event loop, and when ``main`` has finished every asyncio task still pending is
    cancelled and awaited, async generators and the default executor are shut down and
    the loop is closed.

    Args:
        main: The trio async function to run.
        *args: Positional arguments for ``main``.
        handle_signals: When true and called from the main thread, SIGINT and SIGTERM
            cancel ``main`` (its ``finally`` blocks run, including asyncio work it is
            waiting for through :func:`call_asyncio`) and then raise
            :class:`Interrupted`. The previous signal handlers are restored afterwards.
            When false, signals are left to trio's and Python's defaults.
        clock: A trio clock for the guest run, e.g. ``trio.testing.MockClock``. It only
            governs trio's time; asyncio keeps real time.

    Returns:
        What ``main`` returned, even if a signal arrived after ``main``'s last
        checkpoint.

    Raises:
        Interrupted: A handled signal cancelled ``main``.
        BaseException: Whatever ``main`` raised, unchanged (also when ``main`` raised
            something else while unwinding from a signal).
    """
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    try:
        guest: _GuestRun[T] = _GuestRun(loop)
        previous_handlers: dict[int, Callable[..., object] | int | None] = {}
        if handle_signals and threading.current_thread() is threading.main_thread():
            # Installed before the guest starts, so trio sees a non-default SIGINT
            # handler and does not install its own KeyboardInterrupt delivery.
            for signal_number in _HANDLED_SIGNALS:
                previous_handlers[signal_number] = signal.getsignal(signal_number)
                loop.add_signal_handler(signal_number, guest.on_signal, signal_number)
        try:
            trio.lowlevel.start_guest_run(
                _guest_main,
                guest,
                main,
                args,
                run_sync_soon_threadsafe=loop.call_soon_threadsafe,
                run_sync_soon_not_threadsafe=loop.call_soon,
                done_callback=guest.on_done,
                host_uses_signal_set_wakeup_fd=True,
                clock=clock,
            )
            run_outcome = guest.wait()
        finally:
            for signal_number, previous in previous_handlers.items():
                loop.remove_signal_handler(signal_number)
                # None means a handler not installed from Python; it cannot be put back.
                if previous is not None:
                    signal.signal(signal_number, previous)
    finally:
        try:
            _cancel_remaining_tasks(loop)
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.run_until_complete(loop.shutdown_default_executor())
        finally:
            asyncio.set_event_loop(None)
            loop.close()
    return run_outcome.unwrap()


def _cancel_remaining_tasks(loop: asyncio.AbstractEventLoop) -> None:
    tasks = asyncio.all_tasks(loop)
    if not tasks:
        return
    for task in tasks:
        task.cancel()
    loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
    for task in tasks:
        if not task.cancelled() and task.exception() is not None:
            loop.call_exception_handler(
                {
                    "message": "unhandled exception in an asyncio task during shutdown",
                    "exception": task.exception(),
                    "task": task,
                }
            )


async def call_asyncio(function: Callable[..., Awaitable[T]], *args: object) -> T:
    """Run ``function(*args)`` as an asyncio task on the host loop and wait for it.

    Must be called from trio code running under :func:`run`. The awaitable runs with a
    copy of the calling trio task's context variables.

    If the calling trio code is cancelled, the asyncio task is cancelled and awaited
    (its ``finally`` blocks have run) before ``trio.Cancelled`` propagates; an asyncio
    task that suppresses its cancellation therefore keeps the trio side waiting. If the
    task finished anyway, its result is returned (or its exception raised) as with any
    trio operation that completes despite a cancel; the next checkpoint raises
    ``trio.Cancelled``.

    Args:
        function: An async function (or any callable returning an awaitable) that
            belongs to the asyncio world, e.g. ``RTCPeerConnection.createOffer``.
        *args: Positional arguments for ``function``.

    Returns:
        What the awaitable returned.

    Raises:
        AsyncioTaskCancelled: The task was cancelled from the asyncio side.
        RuntimeError: Not called under :func:`run` (e.g. under plain ``trio.run``).
        Exception: Whatever the awaitable raised, unchanged.
    """
    loop = _host_loop.get(None)
    if loop is None:
        raise RuntimeError(
            "call_asyncio needs an asyncio host loop: run the trio code with "
            "actors.bridge.run, not trio.run"
        )
    await trio.lowlevel.checkpoint_if_cancelled()
    token = trio.lowlevel.current_trio_token()
    done = trio.Event()

    def on_task_done(_task: asyncio.Future[T]) -> None:
        # An asyncio callback: outside trio's run context, so hand over to trio.
        try:
            token.run_sync_soon(done.set)
        except trio.RunFinishedError:
            pass

    task = asyncio.ensure_future(function(*args), loop=loop)
    task.add_done_callback(on_task_done)
    try:
        await done.wait()
    except BaseException as interruption:
        task.cancel()
        with trio.CancelScope(shield=True):
            await done.wait()
        if task.cancelled() or not isinstance(interruption, trio.Cancelled):
            if not task.cancelled():
                # Marks the exception retrieved, so asyncio does not log it as lost.
                task.exception()
            raise
    try:
        return task.result()
    except asyncio.CancelledError as error:
        raise AsyncioTaskCancelled(
            f"the asyncio task of {_name(function)} was cancelled from the asyncio side: "
            f"{_origin(error)}"
        ) from error


def _name(function: Callable[..., object]) -> str:
    inner = getattr(function, "func", function)  # through functools.partial
    return getattr(inner, "__qualname__", None) or repr(inner)


def _origin(error: BaseException) -> str:
    """Where the cancellation surfaced: the awaits it went through, innermost last."""
    names, traceback, line = [], error.__traceback__, ""
    while traceback is not None:
        code = traceback.tb_frame.f_code
        names.append(code.co_name)
        line = f"{code.co_filename}:{traceback.tb_lineno}"
        traceback = traceback.tb_next
    return f"in {' > '.join(names)} ({line})" if names else "no traceback"


def post_to(ref: SupportsTellNowait[MessageT_contra]) -> Callable[[MessageT_contra], None]:
    """Return a function that asyncio code may call to post messages to ``ref``.

    Must be called from trio code (it captures the current trio run). The returned
    function is safe to call at any time from asyncio callbacks or any thread: it hands
    the message to trio with ``TrioToken.run_sync_soon``, where ``ref.tell_nowait`` runs.
    Messages posted from one thread arrive in the order they were posted. A message
    refused because the mailbox is full or the actor has stopped is dropped with a
    warning on the ``actors.bridge`` logger (the content is never logged; an actor's ref
    also counts it as a dead letter); after the trio run has finished, messages are
    dropped silently.

    Args:
        ref: The receiver; its ``tell_nowait`` is only ever called inside trio.

    Returns:
        A plain function taking one message and returning ``None``; it never raises.

    Raises:
        RuntimeError: Not called from inside a trio run.
    """
    token = trio.lowlevel.current_trio_token()

    def deliver(message: MessageT_contra) -> None:
        # An exception escaping a run_sync_soon callback would crash the whole trio run.
        try:
            ref.tell_nowait(message)
            if getattr(ref, "alive", True) is False:
                # An actor's ref takes a message for a stopped actor quietly, as a dead
                # letter (already counted): the warning is ours to give.
                raise ActorStopped(getattr(ref, "path", repr(ref)))
        except (MailboxFull, ActorStopped) as error:
            logger.warning(
                "dropped a %s posted from asyncio: %s", type(message).__name__, error
            )
        except Exception:
            logger.exception(
                "dropped a %s posted from asyncio: tell_nowait failed",
                type(message).__name__,
            )

    def post(message: MessageT_contra) -> None:
        try:
            token.run_sync_soon(deliver, message)
        except trio.RunFinishedError:
            pass

    return post
