"""The operators' shell: its commands, parsed and formatted, without SSH and without I/O.

Theory of operation: the SSH server hands every line an operator types to ``Shell``
and prints what comes back. ``Shell.run`` answers one command with an ``Output`` (text
and an exit status); ``Shell.stream`` answers the two commands that keep printing
(``top``, ``trace``) with chunks of text as they come. The shell keeps no state of the
system: every command reads the live introspection data through a ``BrokerView`` (the
actor tree's frozen snapshots, the towers, the sessions) and formats it, as Erlang's
observer and aiomonitor do; admin commands ask the view to act. Provisioning is the
same: ``jobs`` formats the host board the view reads, and ``provision``, ``cancel`` and
``scale`` ask the view, which asks the provisioning and scaler actors and passes their
answers on. Every command takes ``--json`` for one JSON document instead of text.

Lines are split into words as a POSIX shell does (``shlex``). Nothing the operator
types raises: a bad line is answered with a message and a status (``Status``). Text
from the system (failure reasons, tracebacks, session reasons) is printed with its
control characters escaped, so it cannot drive the operator's terminal.

Times: the runtime stamps failures and traced messages with trio's clock
(``trio.current_time()``); the shell shows them as wall-clock times in UTC, through the
``clock`` it is given.
"""

from __future__ import annotations

import bisect
import enum
import heapq
import json
import math
import re
import shlex
import time
from collections import Counter
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Collection
from contextlib import AbstractAsyncContextManager, AsyncExitStack, aclosing
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

import trio

from actors import (
    ActorActivity,
    ActorCrashed,
    ActorSnapshot,
    ActorState,
    ActorStopped,
    AskTimeout,
)
from broker.lifecycle import SessionState
from broker.metrics import ProcessUsage


class Role(enum.Enum):
    """What an operator's key allows: reading everything, or acting too."""

    READ_ONLY = "read-only"
    ADMIN = "admin"


class Status(enum.IntEnum):
    """The exit status of a command, for non-interactive use (``ssh broker ps``).

    ``CLOSE`` is no failure: the operator asked to leave (``exit``, ``quit``), and the
    server ends the SSH session after printing the output's text.
    """

    OK = 0
    ERROR = 1  # the command was understood but could not be done (no such actor, ...)
    USAGE = 2  # the line was not understood: unknown command, bad arguments, bad quoting
    REFUSED = 3  # the operator's role does not allow the command; the server logs it
    CLOSE = -1


@dataclass(frozen=True)
class Output:
    """What one command printed, and its exit status (a ``Status`` value).

    ``text`` ends with a newline unless it is empty. Errors are text even under
    ``--json``; the status tells them apart.
    """

    text: str
    status: int = Status.OK


@dataclass(frozen=True)
class TowerView:
    """One tower as the broker sees it.

    ``state`` is "ready", "draining" or "stale"; ``heartbeat_age`` is the seconds since
    the tower was last heard from (None: never); ``certificate_expires`` is when its
    link certificate expires (a naive datetime is taken as UTC); ``usage`` is what its
    agent process costs, as it last reported (None: not reported); ``used`` how much of
    its capacity the sessions take, a session with video counting as several (None: one
    each); ``unanswered_offers`` the offers of this broker's sessions it has not answered,
    of which ``waiting_offers`` wait their turn to be sent.
    """

    name: str
    state: str
    sessions: int
    capacity: int
    heartbeat_age: float | None
    certificate_expires: datetime | None
    usage: ProcessUsage | None = None
    used: int | None = None
    unanswered_offers: int = 0
    waiting_offers: int = 0


@dataclass(frozen=True)
class SessionView:
    """One session, as ``Session.describe()`` reports it; ``age`` in seconds."""

    id: str
    state: str
    tower: str
    negotiation: int
    placements: int
    reason: str
    age: float


@dataclass(frozen=True)
class HostView:
    """One inventory host and where its provisioning stands.

    ``address`` is where the broker reaches its SSH server (``address:port``);
    ``state`` is "free", "provisioning", "ready", "draining", "decommissioning",
    "failed" or "cancelled"; ``plan`` ("provision", "decommission"), ``step`` and
    ``attempts`` are those of its last job (empty and 0 before any); ``error`` is the
    last failure ("" when none); ``restart_in`` is the seconds until a job waiting out
    its backoff tries its steps again (None: no job, or not waiting); ``provisioned_in``
    the seconds its last provisioning took to the tower's hand-over (None: never);
    ``step_seconds`` how long each step of its last attempt took.
    """

    name: str
    address: str
    state: str
    plan: str
    step: str
    attempts: int
    error: str
    restart_in: float | None
    provisioned_in: float | None
    step_seconds: dict[str, float] = field(default_factory=dict)


class TraceEvent(Protocol):
    """One traced message.

    ``at`` is trio's clock when it happened; ``kind`` how it came ("tell", "ask",
    "system", ...); ``summary`` a short repr of the message (``SomeMessage(...)``),
    printed as it is (``message_type`` when the summary is empty).
    """

    at: float
    path: str
    kind: str
    message_type: str
    summary: str


class BrokerView(Protocol):
    """What the shell reads and what admin commands ask for; the server implements it over
    the live system."""

    def tree(self, depth: int | None = None, children: int | None = None) -> ActorSnapshot:
        """The system's snapshot from the root supervisor, bounded as ``snapshot_of``."""
        ...

    def snapshot_of(self, path: str, depth: int | None = None, children: int | None = None
                    ) -> ActorSnapshot | None:
        """The snapshot of the live actor at ``path`` and of what is under it: ``depth``
        levels (None: all), at most ``children`` of each actor (None: all); or None."""
        ...

    def activity(self) -> list[ActorActivity]:
        """Every live actor's counters, without a snapshot of each."""
        ...

    def towers(self) -> list[TowerView]: ...

    async def sessions(self) -> list[SessionView]: ...

    def actor_paths(self) -> list[str]:
        """The paths of the live actors, sorted, for completion."""
        ...

    async def kill(self, path: str, reason: str) -> None:
        """Kill the actor at ``path``; its supervisor decides what follows.

        Raises:
            LookupError: no actor at ``path``.
            ValueError: the actor has no supervisor (the root: the whole system ends),
                or it is the shell itself (every operator's session would end); the
                error says which.
        """
        ...

    async def restart(self, path: str) -> None:
        """Have the actor's supervisor stop it in order and start it again.

        Raises:
            LookupError: no actor at ``path``.
            ValueError: the actor has no supervisor (the root), or it is the shell.
            ActorCrashed: it stopped and did not start again.
            AskTimeout: it is still restarting past the deadline.
            ActorStopped: its supervisor ended.
        """
        ...

    async def drain(self, tower: str) -> None:
        """Place no new sessions on ``tower``.

        Raises:
            LookupError: no tower of that name.
        """
        ...

    async def undrain(self, tower: str) -> None:
        """Place new sessions on ``tower`` again (a drain by mistake, or the scaler's).

        Raises:
            LookupError: no tower of that name.
            ValueError: it cannot take sessions again (it is being decommissioned, or it
                drains itself).
        """
        ...

    def has_inventory(self) -> bool:
        """Whether the broker has inventory hosts to provision towers on."""
        ...

    def hosts(self) -> list[HostView]:
        """Every inventory host, in the inventory's order (may be called outside trio,
        for completion)."""
        ...

    def events(self) -> list[tuple[datetime, str]]:
        """The events of provisioning and scaling the broker keeps, oldest first."""
        ...

    async def provision(self, host: str) -> str:
        """Start provisioning a tower on ``host``; returns the one-line answer.

        Raises:
            LookupError: no host of that name in the inventory.
            ValueError: refused (the host's state does not allow it, ...); the message
                says why.
        """
        ...

    async def decommission(self, host: str) -> str:
        """Start decommissioning ``host``'s tower; returns the one-line answer.

        Raises:
            LookupError: no host of that name in the inventory.
            ValueError: refused (free, or busy with a job); the message says why.
        """
        ...

    async def cancel(self, host: str) -> str:
        """Cancel the job running for ``host``; returns the one-line answer.

        Raises:
            LookupError: no host of that name in the inventory.
            ValueError: refused (no job runs for it, ...); the message says why.
        """
        ...

    async def scale(self, count: int) -> str:
        """Keep ``count`` towers (provision or drain to get there); returns the answer.

        Raises:
            ValueError: refused; the message says why.
        """
        ...

    def trace(self, path: str, capacity: int) -> AbstractAsyncContextManager[Any]:
        """Trace the messages of the actor at ``path`` while the context is entered.

        The context yields an async iterator of ``TraceEvent``s that ends when the actor
        ends; it buffers at most ``capacity`` events and counts the rest in an attribute
        ``dropped`` (read once the trace is over; 0 when absent). The shell yields its
        lines from inside the context, so the context must not open a nursery or a cancel
        scope around its body.

        Raises:
            LookupError: no actor at ``path`` (on the call or on entering the context).
        """
        ...


class CommandStream:
    """The output of one command as chunks of text, for ``async for``; see ``Shell.stream``.

    ``status`` is None until the last chunk was taken, then the command's exit status.
    ``is_error`` says whether the chunk just taken is an error message (unknown command,
    bad usage, refused, a command that could not be done) rather than output. Close it
    (``aclose``, or ``contextlib.aclosing``) when it is left before its end, so what the
    command holds (a trace) is released at once.
    """

    def __init__(self, chunks: Callable[[CommandStream], AsyncGenerator[str, None]]) -> None:
        self.status: int | None = None
        self.is_error = False
        self._chunks = chunks(self)

    def __aiter__(self) -> CommandStream:
        return self

    async def __anext__(self) -> str:
        return await self._chunks.__anext__()

    async def aclose(self) -> None:
        await self._chunks.aclose()


class _CommandError(Exception):
    """A command could not be done; the message is printed with the status."""

    def __init__(self, message: str, status: int = Status.ERROR) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


class _UsageError(Exception):
    """The arguments do not fit the command's usage."""


class _HelpAsked(Exception):
    """``--help`` or ``-h`` among a command's arguments."""


DEFAULT_KILL_REASON = "killed from the operators' shell"
PS_LIMIT = 20
TOP_INTERVAL = 1.0
TOP_MINIMUM_INTERVAL = 0.2
TOP_MAXIMUM_INTERVAL = 3600.0
# Every ``top`` refresh reads, rates and sorts every actor: about 2 us of the broker's
# thread per actor here (the read alone 0.8 us). All ``top`` views running together
# take at most TOP_SHARE of that thread: each refreshes less often, if need be, than
# it was asked to (24 of them at 5 refreshes a second each had timers 2.6 s late).
TOP_COST_PER_ACTOR = 2e-6
TOP_SHARE = 0.1
TRACE_SECONDS = 10.0
TRACE_MAXIMUM_SECONDS = 60.0
TRACE_LIMIT = 1000
TRACE_MAXIMUM_LIMIT = 10_000
INSPECT_CHILDREN_SHOWN = 50
# Children ``tree`` shows of each actor unless told: a broker's sessions supervisor may
# have tens of thousands, a megabyte of text.
TREE_CHILDREN_SHOWN = 50
NO_INVENTORY = "not available: this broker has no host inventory"
# The state ``sessions`` lists a session in that did not answer in time.
UNANSWERED = "unanswered"
SESSION_STATES = (*(state.value for state in SessionState), UNANSWERED)
JOBS_EVENTS = 10
JOBS_ERROR_WIDTH = 60
PS_ORDERS = ("depth", "handled", "restarts")
TOP_ORDERS = (*PS_ORDERS, "rate")


# Options and arguments: a small parser that never exits and never prints.


# Numbers as an operator types them: ASCII digits (int() and float() also take other
# scripts' digits, underscores, a plus sign, and float() "nan" and "inf").
_WHOLE = re.compile(r"-?[0-9]+")
# (Each digit matched one way only: an ambiguous pattern takes quadratic time.)
_DECIMAL = re.compile(r"-?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:e[-+]?[0-9]+)?", re.IGNORECASE)


def _whole_number(minimum: int, maximum: int | None = None) -> Callable[[str], int]:
    def parse(text: str) -> int:
        if not _WHOLE.fullmatch(text):
            raise ValueError(f"expected a whole number, not {text!r}")
        value = int(text)
        if value < minimum or (maximum is not None and value > maximum):
            raise ValueError(f"must be {_bounds(minimum, maximum)}, not {value}")
        return value

    return parse


def _seconds(minimum: float, maximum: float | None = None) -> Callable[[str], float]:
    def parse(text: str) -> float:
        if not _DECIMAL.fullmatch(text):
            raise ValueError(f"expected a number of seconds, not {text!r}")
        value = float(text)
        if not math.isfinite(value) or value < minimum or (maximum is not None and value > maximum):
            raise ValueError(f"must be {_bounds(minimum, maximum)} seconds, not {text}")
        return value

    return parse


def _one_of(choices: tuple[str, ...]) -> Callable[[str], str]:
    def parse(text: str) -> str:
        if text not in choices:
            raise ValueError(f"expected one of {', '.join(choices)}, not {text!r}")
        return text

    return parse


def _bounds(minimum: float, maximum: float | None) -> str:
    if maximum is None:
        return f"at least {minimum:g}"
    return f"from {minimum:g} to {maximum:g}"


@dataclass(frozen=True)
class _Option:
    """``--name VALUE`` (or ``--name=VALUE``); the last one given wins."""

    name: str
    metavar: str
    help: str
    parse: Callable[[str], Any]
    default: Any = None
    choices: tuple[str, ...] = ()

    @property
    def key(self) -> str:
        return self.name.removeprefix("--").replace("-", "_")

    @property
    def usage(self) -> str:
        value = "|".join(self.choices) if self.choices else self.metavar
        return f"[{self.name} {value}]"


@dataclass(frozen=True)
class _Argument:
    """A positional argument; ``rest`` takes every word left (at least one when
    ``required``); ``parse`` turns a word into its value (ValueError: a usage error);
    ``completes`` names what completion offers for it: "actor" (paths), "tower" (names),
    "host" (inventory hosts), "command"."""

    metavar: str
    required: bool = True
    rest: bool = False
    completes: str = ""
    parse: Callable[[str], Any] | None = None

    def value(self, word: str) -> Any:
        if self.parse is None:
            return word
        try:
            return self.parse(word)
        except ValueError as error:
            raise _UsageError(f"{self.metavar}: {_printable(str(error))}") from None

    @property
    def key(self) -> str:
        return self.metavar.lower()

    @property
    def usage(self) -> str:
        text = f"{self.metavar}..." if self.rest else self.metavar
        return text if self.required else f"[{text}]"


_JSON_USAGE = "[--json]"


@dataclass(frozen=True)
class _Command:
    name: str
    summary: str
    details: str
    handler: Callable[[Shell, dict[str, Any]], Any]
    arguments: tuple[_Argument, ...] = ()
    options: tuple[_Option, ...] = ()
    admin: bool = False
    streaming: bool = False

    @property
    def usage(self) -> str:
        words = [self.name]
        words += [argument.usage for argument in self.arguments]
        words += [option.usage for option in self.options]
        words.append(_JSON_USAGE)
        return " ".join(words)

    def option(self, name: str) -> _Option | None:
        for option in self.options:
            if option.name == name:
                return option
        return None

    def parse(self, words: list[str]) -> dict[str, Any]:
        """The arguments by key (``json`` included), or ``_UsageError``/``_HelpAsked``."""
        values: dict[str, Any] = {option.key: option.default for option in self.options}
        values["json"] = False
        positionals: list[str] = []
        words_left = list(words)
        only_positionals = False
        while words_left:
            word = words_left.pop(0)
            if only_positionals or not word.startswith("-") or word == "-":
                positionals.append(word)
                continue
            if word == "--":
                only_positionals = True
                continue
            if word in ("--help", "-h"):
                raise _HelpAsked
            if not word.startswith("--"):
                positionals.append(word)
                continue
            name, has_value, value = word.partition("=")
            if name == "--json":
                if has_value:
                    raise _UsageError("--json takes no value")
                values["json"] = True
                continue
            option = self.option(name)
            if option is None:
                raise _UsageError(f"unknown option {_printable(name)!r}")
            if not has_value:
                if not words_left:
                    raise _UsageError(f"{name} needs a value ({option.metavar})")
                value = words_left.pop(0)
            try:
                values[option.key] = option.parse(value)
            except ValueError as error:
                raise _UsageError(f"{name}: {_printable(str(error))}") from None
        for argument in self.arguments:
            if argument.rest:
                if argument.required and not positionals:
                    raise _UsageError(f"missing {argument.metavar}")
                values[argument.key] = tuple(argument.value(word) for word in positionals)
                positionals = []
            elif positionals:
                values[argument.key] = argument.value(positionals.pop(0))
            elif argument.required:
                raise _UsageError(f"missing {argument.metavar}")
            else:
                values[argument.key] = None
        if positionals:
            raise _UsageError(f"unexpected argument {_printable(positionals[0])!r}")
        return values


# The shell.


class Shell:
    """One operator's shell: runs command lines against a ``BrokerView``.

    Args:
        view: the live system, as the server exposes it.
        role: what the operator's key allows; admin commands are refused to
            ``Role.READ_ONLY`` with ``Status.REFUSED``.
        clock: wall-clock seconds since the epoch, for the times shown.
    """

    # The ``top`` views running in this process, all shells together (``TOP_SHARE``).
    tops_running = 0

    def __init__(
        self, view: BrokerView, role: Role, *, clock: Callable[[], float] = time.time
    ) -> None:
        self._view = view
        self._role = role
        self._clock = clock

    async def run(self, line: str) -> Output:
        """Run one command line and return all it printed, with its exit status.

        Never raises for a bad line: unknown command (``Status.USAGE``), bad arguments or
        quoting (``Status.USAGE``), no such actor or tower, or a request provisioning or
        the scaler refused (``Status.ERROR``), an admin command for a read-only role
        (``Status.REFUSED``). An empty line gives an empty
        ``Output``; ``exit`` gives ``Status.CLOSE``. A streaming command (``top``,
        ``trace``) is run to its end first: ``top`` without ``--count`` only ends when
        the caller is cancelled, so use ``stream`` for those. Errors the view raises
        beyond those its methods document are not caught.
        """
        stream = self.stream(line)
        async with aclosing(stream):
            chunks = [chunk async for chunk in stream]
        assert stream.status is not None
        return Output("".join(chunks), stream.status)

    def stream(self, line: str) -> CommandStream:
        """Run one command line, yielding its output as it comes.

        ``top`` yields one whole frame per refresh and ``trace`` one line per traced
        message (under ``--json``: one JSON document per line); any other command, and
        any error, yields its whole output as one chunk. The stream's ``status`` is the
        exit status once it ended.
        """
        return CommandStream(lambda stream: self._chunks(line, stream))

    def is_streaming(self, line: str) -> bool:
        """Whether ``line`` runs a command that keeps printing (``top``, ``trace``)."""
        try:
            words = shlex.split(line)
        except ValueError:
            return False
        command = _COMMANDS.get(words[0]) if words else None
        return command is not None and command.streaming

    def complete(self, line: str) -> list[str]:
        """Candidates for the last word of a partial ``line`` (the empty word after a
        trailing space), sorted, quoted for the shell when they need it. Of actor paths,
        a bounded few (``_path_segments``): enough for what all share, and whether one.

        The first word completes to the commands the role may run; then a command's
        options (after ``-``), an option's choices, actor paths one segment at a time
        (``/broker/se`` gives ``/broker/sessions``), tower names for ``drain`` and
        ``undrain``, inventory hosts for ``provision`` and ``cancel`` (those not typed
        already) and command names for ``help``.
        """
        try:
            words = shlex.split(line)
        except ValueError:
            return []
        if not words or line[-1].isspace():
            words.append("")
        current, before = words[-1], words[:-1]
        if not before:
            names = [name for name, command in _COMMANDS.items() if self._may_run(command)]
            return _matching(names, current)
        command = _COMMANDS.get(before[0])
        if command is None or not self._may_run(command):
            return []
        arguments = before[1:]
        if "--" not in arguments and current.startswith("--") and "=" in current:
            name = current.partition("=")[0]
            option = command.option(name)
            if option is None:
                return []
            return _matching([f"{name}={choice}" for choice in option.choices], current)
        if "--" not in arguments and current.startswith("-"):
            names = [option.name for option in command.options] + ["--json"]
            return _matching(names, current)
        if arguments and "--" not in arguments:
            option = command.option(arguments[-1])
            if option is not None:
                return _matching(list(option.choices), current)
        argument = _argument_at(command, _positional_count(command, arguments))
        if argument is None:
            return []
        if argument.completes == "actor":
            return _matching(_path_segments(self._view.actor_paths(), current), current)
        if argument.completes == "tower":
            return _matching([tower.name for tower in self._view.towers()], current)
        if argument.completes == "host":
            typed = set(arguments)
            names = [host.name for host in self._view.hosts() if host.name not in typed]
            return _matching(names, current)
        if argument.completes == "command":
            return _matching(list(_COMMANDS), current)
        return []

    def _may_run(self, command: _Command) -> bool:
        return not command.admin or self._role is Role.ADMIN

    async def _chunks(self, line: str, stream: CommandStream) -> AsyncGenerator[str, None]:
        try:
            try:
                words = shlex.split(line)
            except ValueError as error:
                raise _CommandError(
                    f"cannot split the line into words: {str(error).lower()}", Status.USAGE
                ) from None
            if not words:
                stream.status = Status.OK
                return
            command = _COMMANDS.get(words[0])
            if command is None:
                raise _CommandError(
                    f"unknown command {_printable(words[0])!r}; try help", Status.USAGE
                )
            if not self._may_run(command):
                raise _CommandError(f"refused: {command.name!r} needs an admin key", Status.REFUSED)
            try:
                arguments = command.parse(words[1:])
            except _HelpAsked:
                yield _command_help(command)
                stream.status = Status.OK
                return
            except _UsageError as error:
                raise _CommandError(
                    f"{command.name}: {error}\nusage: {command.usage}", Status.USAGE
                ) from None
            if command.streaming:
                async with aclosing(command.handler(self, arguments)) as chunks:
                    async for chunk in chunks:
                        yield chunk
                stream.status = Status.OK
            else:
                output = await command.handler(self, arguments)
                if output.text:
                    yield output.text
                stream.status = output.status
        except _CommandError as error:
            stream.status = error.status
            stream.is_error = True
            yield _ended(error.message)

    # Reading the tree.

    def _find(self, path: str, depth: int | None = None, children: int | None = None
              ) -> ActorSnapshot:
        snapshot = self._view.snapshot_of(path, depth, children)
        if snapshot is None:
            raise _CommandError(f"no actor at {_printable(path)}")
        return snapshot

    def _wall(self, trio_time: float) -> float:
        """A time on trio's clock, as wall-clock seconds since the epoch."""
        return self._clock() - (trio.current_time() - trio_time)

    # Commands.

    async def _tree(self, arguments: dict[str, Any]) -> Output:
        path = arguments["path"]
        shape = _TreeShape(arguments["depth"], arguments["children"])
        # Only what is shown is taken: a snapshot of 50,000 actors holds the broker's
        # thread for a third of a second.
        if path is None:
            top = self._view.tree(shape.depth, shape.children)
        else:
            top = self._find(_actor_path(path), shape.depth, shape.children)
        if arguments["json"]:
            return _json(_tree_json(top, shape, 0))
        lines = [_tree_label(top, top.path, shape.hidden(top, 0))]
        _tree_lines(top, shape, 0, "", lines)
        return _text("\n".join(lines))

    async def _ps(self, arguments: dict[str, Any]) -> Output:
        actors = self._view.activity()
        shown = self._busiest(actors, arguments["sort"], {}, arguments["limit"])
        if arguments["json"]:
            return _json([_actor_json(actor) for actor in shown])
        return _text(_actor_table(shown, None)
                     + _more(len(shown), len(actors), arguments["limit"]))

    def _busiest(self, actors: list[ActorActivity], order: str, rates: dict[str, float],
                 limit: int) -> list[ActorSnapshot]:
        """The snapshots of the first ``limit`` actors in ``order``: only those are taken,
        as a snapshot of every actor would cost the broker's thread milliseconds for each
        thousand."""
        shown = (self._view.snapshot_of(actor.path, depth=0)
                 for actor in _sorted_actors(actors, order, rates, limit))
        return [snapshot for snapshot in shown if snapshot is not None]

    async def _top(self, arguments: dict[str, Any]) -> AsyncIterator[str]:
        Shell.tops_running += 1
        try:
            async for frame in self._top_frames(arguments):
                yield frame
        finally:
            Shell.tops_running -= 1

    async def _top_frames(self, arguments: dict[str, Any]) -> AsyncIterator[str]:
        interval, count = arguments["interval"], arguments["count"]
        previous: dict[str, int] = {}
        previous_at: float | None = None
        refresh = 0
        every = interval
        while count is None or refresh < count:
            if refresh:
                await trio.sleep(every)
            refresh += 1
            now = trio.current_time()
            actors = self._view.activity()
            every = max(interval, len(actors) * Shell.tops_running * TOP_COST_PER_ACTOR
                        / TOP_SHARE)
            rates: dict[str, float] = {}
            if previous_at is not None and now > previous_at:
                for actor in actors:
                    before = previous.get(actor.path, 0)
                    handled = actor.messages_handled
                    delta = handled - before if handled >= before else handled
                    rates[actor.path] = delta / (now - previous_at)
            previous = {actor.path: actor.messages_handled for actor in actors}
            previous_at = now
            shown = self._busiest(actors, arguments["sort"], rates, arguments["limit"])
            wall = self._clock()
            if arguments["json"]:
                document = {
                    "at": _iso(wall),
                    "refresh": refresh,
                    "actors": [
                        {**_actor_json(actor), "rate": rates.get(actor.path)} for actor in shown
                    ],
                }
                yield json.dumps(document) + "\n"
                continue
            of = f" of {count}" if count is not None else ""
            header = f"top at {_clock_time(wall)}: refresh {refresh}{of}, every {interval:g}s"
            if every > interval:
                header += (f" (every {every:.1f}s for now: {len(actors)} actors, "
                           f"{Shell.tops_running} top views open)")
            frame = (header + "\n" + _actor_table(shown, rates)
                     + _more(len(shown), len(actors), arguments["limit"]))
            yield ("\n" if refresh > 1 else "") + frame + "\n"

    async def _inspect(self, arguments: dict[str, Any]) -> Output:
        actor = self._find(_actor_path(arguments["path"]), 1, INSPECT_CHILDREN_SHOWN)
        if arguments["json"]:
            document = _actor_json(actor)
            document["traces"] = actor.traces
            document["child_count"] = actor.child_count
            document["children"] = [child.name for child in actor.children]
            document["failures"] = [
                {
                    "at": _iso(self._wall(failure.time)),
                    "age": trio.current_time() - failure.time,
                    "kind": failure.kind.value,
                    "reason": failure.reason,
                    "traceback": failure.traceback,
                }
                for failure in actor.failures
            ]
            return _json(document)
        fields = [
            ("path", actor.path),
            ("name", actor.name),
            ("class", actor.actor_class),
            ("kind", actor.kind),
            ("state", actor.state.value),
            ("mailbox", f"{actor.mailbox_depth} of {actor.mailbox_capacity}"),
            ("overflow", actor.overflow),
            ("messages handled", str(actor.messages_handled)),
            ("messages dropped", str(actor.messages_dropped)),
            ("restarts", str(actor.restarts)),
            ("uptime", _duration(actor.uptime)),
            ("traces open", str(actor.traces)),
        ]
        if actor.supervisor is not None:
            fields.append(("supervisor", _supervisor_flags(actor)))
        fields.append(("children", str(actor.child_count)))
        fields.append(("failures", str(len(actor.failures))))
        width = max(len(name) for name, _ in fields)
        lines = [f"{name.ljust(width)}  {_printable(value)}" for name, value in fields]
        if actor.children:
            lines += ["", "children:"]
            rows = [
                [child.name, child.actor_class, child.state.value, str(child.restarts)]
                for child in actor.children[:INSPECT_CHILDREN_SHOWN]
            ]
            table = _table(["NAME", "CLASS", "STATE", "RESTARTS"], rows, right={3})
            lines += ["  " + row for row in table.splitlines()]
            hidden = actor.child_count - len(actor.children)
            if hidden > 0:
                lines.append(f"  and {hidden} more (tree {actor.path} --depth 1 "
                             f"--children {actor.child_count})")
        now = trio.current_time()
        for number, failure in enumerate(actor.failures, start=1):
            when = _date_time(self._wall(failure.time))
            ago = _duration(now - failure.time)
            lines += ["", f"failure {number} of {len(actor.failures)}, {when} ({ago} ago):"]
            lines.append(f"  {_printable(failure.reason)}")
            lines += [f"  {_printable(row)}" for row in failure.traceback.splitlines()]
        return _text("\n".join(lines))

    async def _sessions(self, arguments: dict[str, Any]) -> Output:
        sessions = await self._view.sessions()
        wanted = arguments["state"]
        if wanted is not None:
            sessions = [session for session in sessions if session.state == wanted]
        sessions = sorted(sessions, key=lambda session: (-session.age, session.id))
        if arguments["json"]:
            return _json([_session_json(session) for session in sessions])
        if not sessions:
            return _text("no sessions" if wanted is None else f"no sessions {wanted}")
        rows = [
            [
                session.id,
                session.state,
                session.tower or "-",
                str(session.negotiation),
                str(session.placements),
                _duration(session.age),
                session.reason or "-",
            ]
            for session in sessions
        ]
        headers = ["ID", "STATE", "TOWER", "NEGOTIATION", "PLACEMENTS", "AGE", "REASON"]
        return _text(_table(headers, rows, right={3, 4, 5}))

    async def _towers(self, arguments: dict[str, Any]) -> Output:
        towers = sorted(self._view.towers(), key=lambda tower: tower.name)
        now = self._clock()
        if arguments["json"]:
            return _json([_tower_json(tower, now) for tower in towers])
        if not towers:
            return _text("no towers")
        rows = [
            [
                tower.name,
                tower.state,
                f"{tower.sessions}/{tower.capacity}" + (
                    "" if tower.used in (None, tower.sessions) else f" ({tower.used} used)"),
                f"{tower.unanswered_offers}" + (
                    f" ({tower.waiting_offers} waiting)" if tower.waiting_offers else ""),
                "-" if tower.heartbeat_age is None else f"{_duration(tower.heartbeat_age)} ago",
                "-" if tower.usage is None else _duration(tower.usage.cpu_seconds),
                "-" if tower.usage is None else f"{tower.usage.resident_bytes / 2**20:.0f} MiB",
                _expiry(tower.certificate_expires, now),
            ]
            for tower in towers
        ]
        headers = ["NAME", "STATE", "SESSIONS", "OFFERS", "HEARTBEAT", "CPU TIME", "MEMORY",
                   "CERTIFICATE EXPIRES"]
        return _text(_table(headers, rows, right={2, 3, 4, 5, 6}))

    async def _stats(self, arguments: dict[str, Any]) -> Output:
        actors = self._view.activity()
        sessions = await self._view.sessions()
        towers = self._view.towers()
        actor_states = Counter(actor.state.value for actor in actors)
        by_state = {state.value: actor_states[state.value] for state in ActorState}
        deepest = min(actors, key=lambda actor: (-actor.mailbox_depth, actor.path))
        document = {
            "actors": {"total": len(actors), "by_state": by_state},
            "restarts": sum(actor.restarts for actor in actors),
            "mailbox": {
                "total": sum(actor.mailbox_depth for actor in actors),
                "max": deepest.mailbox_depth,
                "max_path": deepest.path if deepest.mailbox_depth else None,
            },
            "messages": {
                "handled": sum(actor.messages_handled for actor in actors),
                "dropped": sum(actor.messages_dropped for actor in actors),
            },
            "sessions": {
                "total": len(sessions),
                "by_state": dict(Counter(session.state for session in sessions)),
            },
            "towers": {
                "total": len(towers),
                "by_state": dict(Counter(tower.state for tower in towers)),
            },
        }
        if arguments["json"]:
            return _json(document)
        mailbox = document["mailbox"]
        queued = f"{mailbox['total']} queued"
        if mailbox["max"]:
            queued += f", deepest {mailbox['max']} at {mailbox['max_path']}"
        messages = document["messages"]
        rows = [
            ("actors", _breakdown(len(actors), by_state)),
            ("restarts", str(document["restarts"])),
            ("mailboxes", queued),
            ("messages", f"{messages['handled']} handled, {messages['dropped']} dropped"),
            ("sessions", _breakdown(len(sessions), document["sessions"]["by_state"])),
            ("towers", _breakdown(len(towers), document["towers"]["by_state"])),
        ]
        return _text("\n".join(f"{name.ljust(9)}  {_printable(value)}" for name, value in rows))

    async def _trace(self, arguments: dict[str, Any]) -> AsyncIterator[str]:
        path, seconds, limit = (
            _actor_path(arguments["path"]),
            arguments["seconds"],
            arguments["limit"],
        )
        as_json = arguments["json"]
        async with AsyncExitStack() as stack:
            try:
                events = await stack.enter_async_context(self._view.trace(path, limit))
            except LookupError:
                raise _CommandError(f"no actor at {_printable(path)}") from None
            if not as_json:
                yield f"tracing {_printable(path)} for {seconds:g}s, at most {limit} messages\n"
            offset = self._clock() - trio.current_time()
            deadline = trio.current_time() + seconds
            iterator = aiter(events)
            shown = 0
            end = "deadline"
            while shown < limit:
                with trio.move_on_at(deadline) as waiting:
                    try:
                        event = await anext(iterator)
                    except StopAsyncIteration:
                        end = "actor ended"
                        break
                if waiting.cancelled_caught:
                    break
                shown += 1
                yield _trace_line(event, path, offset + event.at, as_json)
            else:
                end = "limit"
            dropped = getattr(events, "dropped", 0)
        if as_json:
            yield json.dumps({"end": end, "messages": shown, "dropped": dropped}) + "\n"
            return
        why = {
            "deadline": f"{seconds:g}s elapsed",
            "actor ended": f"{_printable(path)} ended",
            "limit": f"limit of {limit} reached",
        }[end]
        yield f"-- {why}: {shown} {_plural(shown, 'message')}, {dropped} dropped\n"

    def _need_inventory(self) -> None:
        if not self._view.has_inventory():
            raise _CommandError(NO_INVENTORY)

    async def _jobs(self, arguments: dict[str, Any]) -> Output:
        self._need_inventory()
        hosts = self._view.hosts()
        events = self._view.events()
        wanted = arguments["events"]
        if wanted is None:
            wanted = len(events) if arguments["json"] else JOBS_EVENTS
        shown = events[-wanted:] if wanted else []
        if arguments["json"]:
            return _json({
                "hosts": [_host_json(host) for host in hosts],
                "events": [{"at": _iso(_utc(at).timestamp()), "text": text} for at, text in shown],
            })  # fmt: skip
        rows = [
            [
                host.name,
                host.address,
                host.state,
                host.plan or "-",
                host.step or "-",
                str(host.attempts),
                "-" if host.restart_in is None else f"in {_duration(host.restart_in)}",
                _shortened(_printable(host.error), JOBS_ERROR_WIDTH) if host.error else "-",
            ]
            for host in hosts
        ]
        headers = ["NAME", "ADDRESS", "STATE", "PLAN", "STEP", "ATTEMPTS", "NEXT RETRY", "ERROR"]
        lines = [_table(headers, rows, right={5})]
        if shown:
            of = f"last {len(shown)} of {len(events)}" if len(shown) < len(events) else "all"
            lines += ["", f"events ({of}):"]
            lines += [
                f"{_date_time(_utc(at).timestamp())}  {_printable(text)}" for at, text in shown
            ]
        elif wanted:
            lines += ["", "no events"]
        return _text("\n".join(lines))

    async def _kill(self, arguments: dict[str, Any]) -> Output:
        path = _actor_path(arguments["path"])
        reason = " ".join(arguments["reason"]) or DEFAULT_KILL_REASON
        try:
            await self._view.kill(path, reason)
        except LookupError:
            raise _CommandError(f"no actor at {_printable(path)}") from None
        except ValueError as refused:
            raise _CommandError(f"cannot kill {_printable(path)}: {refused}") from None
        if arguments["json"]:
            return _json({"killed": path, "reason": reason})
        return _text(f"killed {_printable(path)}: {_printable(reason)}")

    async def _restart(self, arguments: dict[str, Any]) -> Output:
        path = _actor_path(arguments["path"])
        try:
            await self._view.restart(path)
        except LookupError:
            raise _CommandError(f"no actor at {_printable(path)}") from None
        except ValueError as refused:
            raise _CommandError(f"cannot restart {_printable(path)}: {refused}") from None
        except ActorCrashed as crashed:
            error = crashed.error
            raise _CommandError(
                f"{_printable(path)} stopped and did not start again: "
                f"{_printable(f'{type(error).__name__}: {error}')}"
            ) from None
        except AskTimeout as waited:
            raise _CommandError(
                f"{_printable(path)} is still restarting after {waited.timeout:g} s; "
                "its supervisor goes on with it"
            ) from None
        except ActorStopped:
            raise _CommandError(
                f"cannot restart {_printable(path)}: its supervisor ended"
            ) from None
        if arguments["json"]:
            return _json({"restarted": path})
        return _text(f"restarted {_printable(path)}")

    async def _drain(self, arguments: dict[str, Any]) -> Output:
        tower = arguments["tower"]
        try:
            await self._view.drain(tower)
        except LookupError:
            raise _CommandError(f"no tower named {_printable(tower)}") from None
        if arguments["json"]:
            return _json({"draining": tower})
        return _text(f"draining {_printable(tower)}: it takes no new sessions")

    async def _undrain(self, arguments: dict[str, Any]) -> Output:
        tower = arguments["tower"]
        try:
            await self._view.undrain(tower)
        except LookupError:
            raise _CommandError(f"no tower named {_printable(tower)}") from None
        except ValueError as refused:
            raise _CommandError(
                f"cannot undrain {_printable(tower)}: {_printable(str(refused))}"
            ) from None
        if arguments["json"]:
            return _json({"undrained": tower})
        return _text(f"undrained {_printable(tower)}: it takes new sessions again")

    async def _provision(self, arguments: dict[str, Any]) -> Output:
        self._need_inventory()
        results = []
        for host in arguments["host"]:
            try:
                results.append((host, True, await self._view.provision(host)))
            except (LookupError, ValueError) as error:
                results.append((host, False, str(error)))
        status = Status.OK if all(ok for _, ok, _ in results) else Status.ERROR
        if arguments["json"]:
            documents = [{"host": host, "ok": ok, "answer": text} for host, ok, text in results]
            return Output(_json(documents).text, status)
        lines = [
            _printable(text if ok else f"cannot provision {host}: {text}")
            for host, ok, text in results
        ]
        return _text("\n".join(lines), status)

    async def _cancel(self, arguments: dict[str, Any]) -> Output:
        return await self._one_host("cancel", self._view.cancel, arguments)

    async def _decommission(self, arguments: dict[str, Any]) -> Output:
        return await self._one_host("decommission", self._view.decommission, arguments)

    async def _one_host(
        self, verb: str, request: Callable[[str], Awaitable[str]], arguments: dict[str, Any]
    ) -> Output:
        self._need_inventory()
        host = arguments["host"]
        try:
            answer = await request(host)
        except (LookupError, ValueError) as error:
            raise _CommandError(
                f"cannot {verb} {_printable(host)}: {_printable(str(error))}"
            ) from None
        if arguments["json"]:
            return _json({"host": host, "answer": answer})
        return _text(_printable(answer))

    async def _scale(self, arguments: dict[str, Any]) -> Output:
        self._need_inventory()
        count = arguments["n"]
        try:
            answer = await self._view.scale(count)
        except ValueError as error:
            raise _CommandError(f"cannot scale to {count}: {_printable(str(error))}") from None
        if arguments["json"]:
            return _json({"scale": count, "answer": answer})
        return _text(_printable(answer))

    async def _help(self, arguments: dict[str, Any]) -> Output:
        name = arguments["command"]
        if name is not None:
            command = _COMMANDS.get(name)
            if command is None:
                raise _CommandError(f"unknown command {_printable(name)!r}; try help", Status.USAGE)
            if arguments["json"]:
                return _json(_command_json(command, details=True))
            return Output(_command_help(command))
        if arguments["json"]:
            return _json([_command_json(command, details=False) for command in _COMMANDS.values()])
        width = max(len(command.name) for command in _COMMANDS.values())
        lines = ["commands (* needs an admin key):"]
        for command in _COMMANDS.values():
            mark = "*" if command.admin else " "
            lines.append(f" {mark}{command.name.ljust(width)}  {command.summary}")
        lines += [
            "",
            "help COMMAND shows a command's usage; every command takes --json for one JSON",
            "document instead of text.",
        ]
        return _text("\n".join(lines))

    async def _exit(self, arguments: dict[str, Any]) -> Output:
        return Output("", Status.CLOSE)


# Formatting.


def _actor_path(text: str) -> str:
    """An actor path as typed, without the trailing slash completion may leave."""
    return text.rstrip("/") or text


def _text(text: str, status: int = Status.OK) -> Output:
    return Output(_ended(text), status)


def _ended(text: str) -> str:
    return text if not text or text.endswith("\n") else text + "\n"


def _json(document: Any) -> Output:
    return Output(json.dumps(document, indent=2) + "\n")


def _printable(text: str) -> str:
    """``text`` with control characters (and other unprintable ones) escaped."""
    if text.isprintable():
        return text
    return "".join(char if char.isprintable() else repr(char)[1:-1] for char in text)


def _table(headers: list[str], rows: list[list[str]], right: Collection[int] = ()) -> str:
    """Plain aligned columns; the columns in ``right`` are aligned right (numbers)."""
    cells = [headers] + [[_printable(cell) for cell in row] for row in rows]
    widths = [max(len(row[column]) for row in cells) for column in range(len(headers))]
    lines = []
    for row in cells:
        padded = [
            cell.rjust(width) if column in right else cell.ljust(width)
            for column, (cell, width) in enumerate(zip(row, widths))
        ]
        lines.append("  ".join(padded).rstrip())
    return "\n".join(lines)


def _duration(seconds: float) -> str:
    """A short human duration: ``4.2s``, ``5m03s``, ``2h05m``, ``3d04h``."""
    seconds = max(seconds, 0.0)
    if seconds < 60:
        return f"{seconds:.1f}s"
    whole = int(seconds)
    if whole < 3600:
        return f"{whole // 60}m{whole % 60:02d}s"
    if whole < 86400:
        return f"{whole // 3600}h{whole % 3600 // 60:02d}m"
    return f"{whole // 86400}d{whole % 86400 // 3600:02d}h"


def _moment(wall: float) -> datetime:
    return datetime.fromtimestamp(wall, UTC)


def _clock_time(wall: float) -> str:
    moment = _moment(wall)
    return moment.strftime("%H:%M:%S") + f".{moment.microsecond // 1000:03d}"


def _date_time(wall: float) -> str:
    return _moment(wall).strftime("%Y-%m-%d ") + _clock_time(wall) + " UTC"


def _iso(wall: float) -> str:
    return _moment(wall).isoformat(timespec="milliseconds")


def _plural(count: int, noun: str) -> str:
    return noun if count == 1 else noun + "s"


def _breakdown(total: int, by_state: dict[str, int]) -> str:
    parts = [f"{count} {state}" for state, count in by_state.items() if count]
    return f"{total}: {', '.join(parts)}" if parts else str(total)


def _more(shown: int, total: int, limit: int) -> str:
    """Says so when ``--limit`` left actors out (not when some ended meanwhile)."""
    if total <= limit:
        return ""
    return f"\n{shown} of {total} actors shown; --limit shows more"


def _supervisor_flags(actor: ActorSnapshot) -> str:
    info = actor.supervisor
    assert info is not None
    return f"{info.strategy}, intensity {info.intensity} in {info.period:g}s"


def _actor_json(actor: ActorSnapshot) -> dict[str, Any]:
    info = actor.supervisor
    return {
        "path": actor.path,
        "name": actor.name,
        "class": actor.actor_class,
        "kind": actor.kind,
        "state": actor.state.value,
        "mailbox_depth": actor.mailbox_depth,
        "mailbox_capacity": actor.mailbox_capacity,
        "overflow": actor.overflow,
        "messages_handled": actor.messages_handled,
        "messages_dropped": actor.messages_dropped,
        "restarts": actor.restarts,
        "uptime": actor.uptime,
        "supervisor": None
        if info is None
        else {"strategy": info.strategy, "intensity": info.intensity, "period": info.period},
    }


@dataclass(frozen=True)
class _TreeShape:
    """What ``tree`` shows: ``depth`` levels below the top (None: all), and at most
    ``children`` of each actor."""

    depth: int | None
    children: int

    def hidden(self, actor: ActorSnapshot, level: int) -> int:
        """How many children ``--depth`` hides below an actor at ``level`` (the top is 0)."""
        return actor.child_count if self.depth is not None and level >= self.depth else 0

    def shown(self, actor: ActorSnapshot, level: int) -> tuple[ActorSnapshot, ...]:
        return () if self.hidden(actor, level) else actor.children[:self.children]


def _tree_label(actor: ActorSnapshot, label: str, hidden: int) -> str:
    parts = [f"{label} ({actor.actor_class}, {actor.state.value})"]
    if actor.supervisor is not None:
        parts.append(f"[{_supervisor_flags(actor)}]")
    if actor.restarts:
        parts.append(f"restarts {actor.restarts}")
    if actor.mailbox_depth:
        parts.append(f"mailbox {actor.mailbox_depth}/{actor.mailbox_capacity}")
    if actor.messages_dropped:
        parts.append(f"dropped {actor.messages_dropped}")
    if hidden:
        parts.append(f"+{hidden} {'child' if hidden == 1 else 'children'}")
    return _printable("  ".join(parts))


def _tree_lines(
    actor: ActorSnapshot, shape: _TreeShape, level: int, prefix: str, lines: list[str]
) -> None:
    shown = shape.shown(actor, level)
    more = actor.child_count - len(shown) if shown else 0
    for index, child in enumerate(shown):
        last = index == len(shown) - 1 and not more
        hidden = shape.hidden(child, level + 1)
        lines.append(prefix + ("└── " if last else "├── ") + _tree_label(child, child.name, hidden))
        _tree_lines(child, shape, level + 1, prefix + ("    " if last else "│   "), lines)
    if more:
        lines.append(f"{prefix}└── and {more} more (tree {_printable(actor.path)} --depth 1 "
                     f"--children {actor.child_count})")


def _tree_json(actor: ActorSnapshot, shape: _TreeShape, level: int) -> dict[str, Any]:
    document = _actor_json(actor)
    document["failures"] = len(actor.failures)
    document["last_failure"] = actor.last_failure.reason if actor.last_failure else None
    document["child_count"] = actor.child_count
    document["children"] = [_tree_json(child, shape, level + 1)
                            for child in shape.shown(actor, level)]
    return document


def _sorted_actors(
    actors: list[ActorActivity], order: str, rates: dict[str, float], limit: int
) -> list[ActorActivity]:
    def key(actor: ActorActivity) -> tuple[Any, ...]:
        depth, handled = -actor.mailbox_depth, -actor.messages_handled
        if order == "handled":
            return (handled, depth, actor.path)
        if order == "restarts":
            return (-actor.restarts, depth, handled, actor.path)
        if order == "rate":
            return (-rates.get(actor.path, 0.0), depth, handled, actor.path)
        return (depth, handled, actor.path)

    return heapq.nsmallest(limit, actors, key=key)


def _actor_table(actors: list[ActorSnapshot], rates: dict[str, float] | None) -> str:
    headers = ["PATH", "CLASS", "STATE", "MAILBOX", "HANDLED", "RESTARTS", "UPTIME"]
    if rates is not None:
        headers.insert(5, "RATE")
    rows = []
    for actor in actors:
        row = [
            actor.path,
            actor.actor_class,
            actor.state.value,
            f"{actor.mailbox_depth}/{actor.mailbox_capacity}",
            str(actor.messages_handled),
            str(actor.restarts),
            _duration(actor.uptime),
        ]
        if rates is not None:
            rate = rates.get(actor.path)
            row.insert(5, "-" if rate is None else f"{rate:.1f}/s")
        rows.append(row)
    return _table(headers, rows, right=set(range(3, len(headers))))


def _session_json(session: SessionView) -> dict[str, Any]:
    return {
        "id": session.id,
        "state": session.state,
        "tower": session.tower,
        "negotiation": session.negotiation,
        "placements": session.placements,
        "reason": session.reason,
        "age": session.age,
    }


def _utc(moment: datetime) -> datetime:
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def _expiry(expires: datetime | None, now: float) -> str:
    if expires is None:
        return "-"
    moment = _utc(expires)
    left = moment.timestamp() - now
    when = moment.strftime("%Y-%m-%d %H:%M UTC")
    return (
        f"{when} (in {_duration(left)})" if left > 0 else f"{when} (expired {_duration(-left)} ago)"
    )


def _tower_json(tower: TowerView, now: float) -> dict[str, Any]:
    expires = None if tower.certificate_expires is None else _utc(tower.certificate_expires)
    return {
        "name": tower.name,
        "state": tower.state,
        "sessions": tower.sessions,
        "used": tower.sessions if tower.used is None else tower.used,
        "capacity": tower.capacity,
        "unanswered_offers": tower.unanswered_offers,
        "waiting_offers": tower.waiting_offers,
        "heartbeat_age": tower.heartbeat_age,
        "cpu_seconds": None if tower.usage is None else tower.usage.cpu_seconds,
        "resident_bytes": None if tower.usage is None else tower.usage.resident_bytes,
        "certificate_expires": None if expires is None else expires.isoformat(),
        "certificate_expires_in": None if expires is None else expires.timestamp() - now,
    }


def _host_json(host: HostView) -> dict[str, Any]:
    return {
        "name": host.name,
        "address": host.address,
        "state": host.state,
        "plan": host.plan,
        "step": host.step,
        "attempts": host.attempts,
        "error": host.error,
        "restart_in": host.restart_in,
        "provisioned_in": host.provisioned_in,
        "step_seconds": host.step_seconds,
    }


def _shortened(text: str, width: int) -> str:
    """``text`` cut to ``width`` characters, ``...`` at the end when it was cut."""
    return text if len(text) <= width else text[: width - 3].rstrip() + "..."


def _trace_line(event: TraceEvent, traced: str, wall: float, as_json: bool) -> str:
    if as_json:
        document = {
            "at": _iso(wall),
            "path": event.path,
            "kind": event.kind,
            "message_type": event.message_type,
            "summary": event.summary,
        }
        return json.dumps(document) + "\n"
    words = [_clock_time(wall)]
    if event.path != traced:
        words.append(event.path)
    words += [event.kind, event.summary or event.message_type]
    return _printable(" ".join(words)) + "\n"


def _command_json(command: _Command, *, details: bool) -> dict[str, Any]:
    document: dict[str, Any] = {
        "name": command.name,
        "usage": command.usage,
        "summary": command.summary,
        "admin": command.admin,
        "streaming": command.streaming,
    }
    if details:
        document["details"] = command.details
        document["options"] = [
            {"name": option.name, "value": option.metavar, "help": option.help}
            for option in command.options
        ]
    return document


def _command_help(command: _Command) -> str:
    summary = command.summary[0].upper() + command.summary[1:] + "."
    lines = [f"usage: {command.usage}", "", summary]
    if command.details:
        lines.append(command.details)
    options = [(f"{option.name} {option.metavar}", option.help) for option in command.options]
    options.append(("--json", "one JSON document instead of text"))
    width = max(len(name) for name, _ in options)
    lines += ["", "options:"]
    lines += [f"  {name.ljust(width)}  {text}" for name, text in options]
    if command.admin:
        lines += ["", "Needs an admin key."]
    return "\n".join(lines) + "\n"


# Completion.


# Actor paths looked at for one completion (``_path_segments``).
COMPLETION_PATHS = 200
_LAST_CHARACTER = chr(0x10FFFF)


def _matching(candidates: list[str], prefix: str) -> list[str]:
    return sorted({shlex.quote(name) for name in candidates if name.startswith(prefix)})


def _path_segments(paths: list[str], prefix: str) -> list[str]:
    """The paths under ``prefix`` (``paths`` sorted), cut after their next segment; one
    with actors under it ends in ``/``, so that completion goes on into them.

    Only the first ``COMPLETION_PATHS`` of them and the last are looked at: a key must
    cost the broker's thread little however many actors there are (20,000 sessions under
    one supervisor), and in sorted order those say what all candidates share, and
    whether there is only one.
    """
    first = bisect.bisect_left(paths, prefix)
    end = bisect.bisect_left(paths, prefix + _LAST_CHARACTER, first)
    looked_at = paths[first : min(end, first + COMPLETION_PATHS)]
    if end > first + COMPLETION_PATHS:
        looked_at.append(paths[end - 1])
    segments = set()
    start = 0 if prefix else 1
    for path in looked_at:
        rest = path[len(prefix) :]
        cut = rest.find("/", start)
        segments.add(prefix + (rest if cut < 0 else rest[: cut + 1]))
    # "/broker/" stands for "/broker" too.
    return [segment for segment in segments if segment + "/" not in segments]


def _positional_count(command: _Command, words: list[str]) -> int:
    """How many positional arguments ``words`` (after the command name) hold."""
    count = 0
    words_left = list(words)
    only_positionals = False
    while words_left:
        word = words_left.pop(0)
        if only_positionals or not word.startswith("--"):
            count += 1
        elif word == "--":
            only_positionals = True
        elif "=" not in word and command.option(word) is not None and words_left:
            words_left.pop(0)
    return count


def _argument_at(command: _Command, index: int) -> _Argument | None:
    for position, argument in enumerate(command.arguments):
        if argument.rest or position == index:
            return argument if position <= index else None
    return None


# The commands, in the order help lists them.

_PATH = _Argument("PATH", completes="actor")

_COMMANDS: dict[str, _Command] = {
    command.name: command
    for command in (
        _Command(
            "tree",
            "the live supervision tree, with states",
            "Each actor as name (class, state), with a supervisor's strategy and restart\n"
            "intensity, its restarts, and its mailbox when messages wait. PATH shows a\n"
            "subtree.",
            Shell._tree,
            (_Argument("PATH", required=False, completes="actor"),),
            (
                _Option("--depth", "N", "levels shown below the top", _whole_number(0)),
                _Option("--children", "N",
                        f"children shown of each actor (default {TREE_CHILDREN_SHOWN})",
                        _whole_number(1), TREE_CHILDREN_SHOWN),
            ),
        ),
        _Command(
            "ps",
            "actors as a table, busiest mailboxes first",
            "Sorted by mailbox depth, then messages handled (both descending).",
            Shell._ps,
            options=(
                _Option(
                    "--sort",
                    "ORDER",
                    "depth (default), handled or restarts",
                    _one_of(PS_ORDERS),
                    "depth",
                    PS_ORDERS,
                ),
                _Option(
                    "--limit", "N", f"rows shown (default {PS_LIMIT})", _whole_number(1), PS_LIMIT
                ),
            ),
        ),
        _Command(
            "top",
            "the ps table, refreshed, with messages handled per second",
            "RATE is the messages an actor handled per second since the last refresh.\n"
            "Runs until interrupted unless --count is given.",
            Shell._top,
            options=(
                _Option(
                    "--interval",
                    "SECONDS",
                    f"between refreshes (default {TOP_INTERVAL:g}, from "
                    f"{TOP_MINIMUM_INTERVAL:g} to {TOP_MAXIMUM_INTERVAL:g})",
                    _seconds(TOP_MINIMUM_INTERVAL, TOP_MAXIMUM_INTERVAL),
                    TOP_INTERVAL,
                ),
                _Option("--count", "N", "refreshes, then stop", _whole_number(1)),
                _Option(
                    "--sort",
                    "ORDER",
                    "depth (default), handled, restarts or rate",
                    _one_of(TOP_ORDERS),
                    "depth",
                    TOP_ORDERS,
                ),
                _Option(
                    "--limit", "N", f"rows shown (default {PS_LIMIT})", _whole_number(1), PS_LIMIT
                ),
            ),
            streaming=True,
        ),
        _Command(
            "inspect",
            "everything about one actor, its failures with tracebacks",
            "Every field of the actor's snapshot, its first 50 children (and how many it\n"
            "has), its supervisor flags and its last failures (oldest first), each with\n"
            "its traceback.",
            Shell._inspect,
            (_PATH,),
        ),
        _Command(
            "sessions",
            "the sessions, oldest first",
            "Each session's state, tower, negotiation number, towers it was placed on,\n"
            "age and the reason for its state.",
            Shell._sessions,
            options=(
                _Option(
                    "--state",
                    "STATE",
                    "only sessions in this state",
                    _one_of(SESSION_STATES),
                    choices=SESSION_STATES,
                ),
            ),
        ),
        _Command(
            "towers",
            "the towers: state, load, heartbeat, certificate expiry",
            "HEARTBEAT is how long ago the tower was last heard from.",
            Shell._towers,
        ),
        _Command(
            "stats",
            "totals: actors, restarts, mailboxes, sessions, towers",
            "Actors by state, restarts, queued messages and the deepest mailbox, messages\n"
            "handled and dropped, sessions and towers by state.",
            Shell._stats,
        ),
        _Command(
            "trace",
            "the messages one actor receives, as they come",
            "One line per message: time (UTC), how it came, the message. Stops after\n"
            "--seconds, after --limit messages, or when the actor ends, and says how many\n"
            "messages the trace dropped because they came faster than they were printed.",
            Shell._trace,
            (_PATH,),
            (
                _Option(
                    "--seconds",
                    "N",
                    f"how long (default {TRACE_SECONDS:g}, at most {TRACE_MAXIMUM_SECONDS:g})",
                    _seconds(0.1, TRACE_MAXIMUM_SECONDS),
                    TRACE_SECONDS,
                ),
                _Option(
                    "--limit",
                    "M",
                    f"messages at most (default {TRACE_LIMIT})",
                    _whole_number(1, TRACE_MAXIMUM_LIMIT),
                    TRACE_LIMIT,
                ),
            ),
            streaming=True,
        ),
        _Command(
            "jobs",
            "inventory hosts, their provisioning jobs, and recent events",
            "Every inventory host: its SSH address, state, the plan and step of its last\n"
            "job, its attempts, when a failing job tries again (NEXT RETRY) and its last\n"
            f"error (cut to {JOBS_ERROR_WIDTH} characters; --json has it whole). Then the last\n"
            "events of provisioning and scaling, oldest first, with UTC times.",
            Shell._jobs,
            options=(
                _Option(
                    "--events",
                    "N",
                    f"events shown (default {JOBS_EVENTS}, all with --json; 0 for none)",
                    _whole_number(0),
                ),
            ),
        ),
        _Command(
            "kill",
            "kill an actor; its supervisor decides what follows",
            f"The actor's run is cancelled at once and its supervisor sees it as killed\n"
            f"with REASON (default: {DEFAULT_KILL_REASON}).",
            Shell._kill,
            (_PATH, _Argument("REASON", required=False, rest=True)),
            admin=True,
        ),
        _Command(
            "restart",
            "have an actor's supervisor restart it",
            "The actor is stopped in order and started again; it counts as a restart.",
            Shell._restart,
            (_PATH,),
            admin=True,
        ),
        _Command(
            "drain",
            "place no new sessions on a tower",
            "Its sessions stay; new ones go to other towers.",
            Shell._drain,
            (_Argument("TOWER", completes="tower"),),
            admin=True,
        ),
        _Command(
            "undrain",
            "place new sessions on a drained tower again",
            "Undoes a drain, the operator's or the scaler's; not a tower being\n"
            "decommissioned, nor one that drains itself.",
            Shell._undrain,
            (_Argument("TOWER", completes="tower"),),
            admin=True,
        ),
        _Command(
            "provision",
            "provision a tower on each inventory host given",
            "A job is asked for each HOST in turn; one line per host gives the answer: the\n"
            "job started, or why it was refused (the host is ready, or busy with a job).\n"
            "The status is 1 if any was refused. jobs shows how the jobs go.",
            Shell._provision,
            (_Argument("HOST", rest=True, completes="host"),),
            admin=True,
        ),
        _Command(
            "cancel",
            "cancel the job running for a host",
            "The host's provisioning or decommission job stops where it is and the host is\n"
            "marked cancelled; what the job did on the host stays (provision it again, or\n"
            "decommission it).",
            Shell._cancel,
            (_Argument("HOST", completes="host"),),
            admin=True,
        ),
        _Command(
            "decommission",
            "take a host's tower out: link, agent, NGINX, credentials",
            "The tower's link is dropped (its sessions are repaired on other towers), its\n"
            "certificates revoked, then the agent and NGINX on the host are stopped and its\n"
            "site and credentials removed. Also for a failed or cancelled host, to clear\n"
            "what a job left there. To let sessions end first, drain the tower before.",
            Shell._decommission,
            (_Argument("HOST", completes="host"),),
            admin=True,
        ),
        _Command(
            "scale",
            "keep N towers, provisioning or draining to get there",
            "N becomes both the floor and the ceiling of the scale policy: free hosts are\n"
            "provisioned while fewer towers are up or coming; while there are more,\n"
            "provisioned towers are drained one at a time and decommissioned once their\n"
            "sessions are gone. Local towers are never drained.",
            Shell._scale,
            (_Argument("N", parse=_whole_number(0)),),
            admin=True,
        ),
        _Command(
            "help",
            "the commands, or one command's usage",
            "",
            Shell._help,
            (_Argument("COMMAND", required=False, completes="command"),),
        ),
        _Command("exit", "leave the shell", "", Shell._exit),
        _Command("quit", "leave the shell", "", Shell._exit),
    )
}
