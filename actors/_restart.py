"""Supervision decisions, without I/O.

Everything a supervisor decides when a child ends lives here as plain data and
functions, tested by direct calls: whether the child is restarted (its restart type and
how it ended), which siblings go down and come back with it (the strategy), whether the
supervisor has seen too many restarts (intensity within period), and how long to wait
first (backoff). The supervisor actor only carries the decisions out.

Child specs and supervisor flags follow Erlang/OTP; every field, default and invalid
combination is documented on the class that holds it.
"""

from __future__ import annotations

import enum
import math
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ._exit import ExitKind

if TYPE_CHECKING:
    from ._actor import Actor


class Restart(enum.Enum):
    """When a child that ended is started again.

    - ``PERMANENT``: always (it should never end).
    - ``TRANSIENT``: only if it ended abnormally (crashed or killed); a normal end or a
      shutdown is final.
    - ``TEMPORARY``: never; it is removed from its supervisor when it ends, however it
      ends. A temporary child stopped because a sibling failed (``one_for_all``,
      ``rest_for_one``) is not restarted either.
    """

    PERMANENT = "permanent"
    TRANSIENT = "transient"
    TEMPORARY = "temporary"


class Strategy(enum.Enum):
    """Which children a supervisor restarts when one of them must be restarted.

    - ``ONE_FOR_ONE``: only that child.
    - ``ONE_FOR_ALL``: all children: the others are stopped (in reverse start order),
      then all are started again in order.
    - ``REST_FOR_ONE``: that child and every child started after it, the same way.
    """

    ONE_FOR_ONE = "one_for_one"
    ONE_FOR_ALL = "one_for_all"
    REST_FOR_ONE = "rest_for_one"


DEFAULT_WORKER_SHUTDOWN = 5.0


@dataclass(frozen=True)
class ChildSpec:
    """How a supervisor starts, restarts and stops one child.

    Args:
        name: unique among the supervisor's children; the last segment of the child's
            path. Non-empty, at most 200 characters, printable, without ``/``.
        start: called with no arguments for every (re)start; returns a fresh ``Actor``.
            The child's state never survives a restart; its mailbox does.
        restart: see ``Restart``. Default ``PERMANENT``.
        shutdown: seconds the child gets to stop in order (finish its current message,
            run ``stopping``) before it is cancelled; ``0`` cancels at once (OTP's
            ``brutal_kill``); ``math.inf`` waits as long as it takes. ``None`` (default)
            means 5 s for workers and ``math.inf`` for supervisors, as in OTP. A child
            that ignores cancellation too is abandoned after a second deadline of the
            same length and reported as killed.
    """

    name: str
    start: Callable[[], Actor]
    restart: Restart = Restart.PERMANENT
    shutdown: float | None = None

    def __post_init__(self) -> None:
        validate_name(self.name)
        if not callable(self.start):
            raise TypeError(f"child {self.name!r}: start must be callable, not {self.start!r}")
        if not isinstance(self.restart, Restart):
            raise TypeError(f"child {self.name!r}: restart must be a Restart, not {self.restart!r}")
        if self.shutdown is not None and not (
            isinstance(self.shutdown, (int, float)) and self.shutdown >= 0
        ):
            raise ValueError(f"child {self.name!r}: shutdown must be >= 0 seconds or None")


def validate_name(name: object) -> None:
    """Raise ValueError unless ``name`` can be one segment of an actor path."""
    if not isinstance(name, str) or not name or len(name) > 200:
        raise ValueError(f"an actor name is 1 to 200 characters, not {name!r}")
    if "/" in name or not name.isprintable():
        raise ValueError(f"an actor name has no '/' and only printable characters: {name!r}")


@dataclass(frozen=True)
class Backoff:
    """The wait before a child is restarted: exponential, with jitter, capped.

    The n-th consecutive restart of a child waits
    ``min(maximum, initial * multiplier ** (n - 1)) * (1 + jitter * r)``, with ``r``
    uniform in [0, 1), and never more than ``maximum``. A child that ran at least
    ``reset_after`` seconds before it ended starts counting from 1 again.

    ``initial`` 0 (the default) means no wait, which is OTP's behaviour. Invalid:
    negative ``initial``, ``maximum`` below ``initial``, ``multiplier`` below 1,
    ``jitter`` outside [0, 1], negative ``reset_after``.
    """

    initial: float = 0.0
    maximum: float = 30.0
    multiplier: float = 2.0
    jitter: float = 0.2
    reset_after: float = 30.0

    def __post_init__(self) -> None:
        if not self.initial >= 0:
            raise ValueError("backoff initial must be >= 0")
        if not self.maximum >= self.initial:
            raise ValueError("backoff maximum must be >= initial")
        if not self.multiplier >= 1:
            raise ValueError("backoff multiplier must be >= 1")
        if not 0 <= self.jitter <= 1:
            raise ValueError("backoff jitter must be within [0, 1]")
        if not self.reset_after >= 0:
            raise ValueError("backoff reset_after must be >= 0")

    def delay(self, consecutive: int, random: float) -> float:
        """Seconds to wait before restart number ``consecutive`` (from 1); ``random`` in [0, 1)."""
        if self.initial == 0 or consecutive < 1:
            return 0.0
        base = self.initial
        for _ in range(consecutive - 1):
            if base >= self.maximum:
                break
            base *= self.multiplier
        return min(self.maximum, base * (1 + self.jitter * random))


@dataclass(frozen=True)
class SupervisorFlags:
    """How a supervisor reacts to its children ending.

    Args:
        strategy: see ``Strategy``. Default ``ONE_FOR_ONE``.
        intensity: the most restarts allowed within ``period``; one more and the
            supervisor stops all its children and fails with
            ``RestartIntensityExceeded`` to its own parent. Default 1, as in OTP.
            0 means any restart is one too many.
        period: the sliding window for ``intensity``, in seconds (> 0). Default 5.
        backoff: the wait before each restart. Default: none.
    """

    strategy: Strategy = Strategy.ONE_FOR_ONE
    intensity: int = 1
    period: float = 5.0
    backoff: Backoff = Backoff()

    def __post_init__(self) -> None:
        if not isinstance(self.strategy, Strategy):
            raise TypeError(f"strategy must be a Strategy, not {self.strategy!r}")
        if not isinstance(self.intensity, int) or self.intensity < 0:
            raise ValueError("intensity must be an integer >= 0")
        if not (self.period > 0 and math.isfinite(self.period)):
            raise ValueError("period must be a finite number of seconds > 0")
        if not isinstance(self.backoff, Backoff):
            raise TypeError(f"backoff must be a Backoff, not {self.backoff!r}")


def should_restart(restart: Restart, ended: ExitKind) -> bool:
    """Whether a child with restart type ``restart`` that ended as ``ended`` comes back."""
    if restart is Restart.PERMANENT:
        return True
    if restart is Restart.TRANSIENT:
        return ended in (ExitKind.CRASHED, ExitKind.KILLED)
    return False


def restart_group(strategy: Strategy, order: Sequence[str], failed: str) -> tuple[str, ...]:
    """The children, in start order, that are restarted when ``failed`` must be.

    Every child in the group other than ``failed`` is stopped first, in reverse order.
    """
    if strategy is Strategy.ONE_FOR_ONE:
        return (failed,)
    if strategy is Strategy.ONE_FOR_ALL:
        return tuple(order)
    index = order.index(failed)
    return tuple(order[index:])


class RestartWindow:
    """Counts restarts within a sliding period and says when there were too many."""

    __slots__ = ("intensity", "period", "_times")

    def __init__(self, intensity: int, period: float) -> None:
        self.intensity = intensity
        self.period = period
        self._times: deque[float] = deque()

    def allow(self, now: float) -> bool:
        """Record a restart at ``now``; False if it is one more than the intensity allows."""
        times = self._times
        while times and times[0] <= now - self.period:
            times.popleft()
        times.append(now)
        return len(times) <= self.intensity
